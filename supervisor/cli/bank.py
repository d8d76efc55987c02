"""The bank of ``python -m supervisor demo``: its workload, its fault schedule and its
integrity check.

What the transfers do, which faults are injected and what the check requires is told in
:mod:`supervisor.cli.demo` (that text is the ``demo --help`` description). This module is the
application itself, written against the public API only (:mod:`supervisor`,
:mod:`actors.faults`, :mod:`actors.sqlite`), so that it can serve as a template for a fault
injection check of one's own. It prints nothing: the live display and the summary are in
:mod:`supervisor.cli.display`, plugged in through ``run_demo(monitor=...)``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from actors.driver import Driver
from actors.faults import Fault, FaultDriver, FaultPlan
from supervisor import (
    Backoff,
    ConnectionLost,
    IntegrityError,
    Pool,
    PoolError,
    PoolStatistics,
    QueryError,
    SafetyLimits,
    SerializationFailure,
    Transaction,
    TransactionFailed,
    open_pool,
)

__all__ = [
    "GOOD_OUTCOMES",
    "INITIAL",
    "LEVELS",
    "MAX_ATTEMPTS",
    "SETUP_WAIT",
    "CheckResult",
    "CrashingConfigure",
    "DemoConfig",
    "DemoResult",
    "FaultLevel",
    "FaultsName",
    "Monitor",
    "Planned",
    "SetupError",
    "Stats",
    "Workload",
    "check_integrity",
    "run_demo",
]

INITIAL = 1_000
"""Initial balance of every account."""

FaultsName = Literal["none", "some", "heavy"]
MAX_ATTEMPTS = 8
"""Attempts per transfer when the database says "serialization failure / busy"."""
SETUP_WAIT = 5.0
"""Seconds the setup (creating the tables) keeps trying to reach the database before the demo
gives up with one ``failed: ...`` line: a wrong ``--dsn`` fails in that time, a database still
starting up gets that long to come up."""


class SetupError(Exception):
    """The demo cannot start on the database it was given (a bad ``--dsn`` URL, a driver that
    is not installed); the message is safe to print (no password)."""


@dataclass(frozen=True)
class FaultLevel:
    """What ``--faults`` means: driver faults, client misbehaviour and chaos actions.

    Probabilities are per transfer; ``chaos_every`` is the mean number of seconds between chaos
    actions (``None``: none), chosen among ``chaos``. ``crash_every``: the pool's ``configure``
    hook raises on every ``crash_every``-th connect attempt after the pool's first connections
    (an unexpected exception in an actor: it crashes and the supervisor restarts it).
    """

    plan: FaultPlan
    cancel: float = 0.0
    kill: float = 0.0
    dawdle: float = 0.0
    hold_timeout: float | None = None
    chaos_every: float | None = None
    chaos: tuple[str, ...] = ()
    crash_every: int | None = None


LEVELS: dict[str, FaultLevel] = {
    "none": FaultLevel(plan=FaultPlan()),
    "some": FaultLevel(
        plan=FaultPlan(
            ops={
                "begin": Fault(error=0.01),
                "execute": Fault(error=0.005, lost=0.002),
                "commit": Fault(lost=0.003, lost_after=0.005),
            }
        ),
        cancel=0.03,
        kill=0.005,
        dawdle=0.003,
        hold_timeout=0.25,
        chaos_every=1.0,
        chaos=("disconnect_all", "break_all"),
    ),
    "heavy": FaultLevel(
        plan=FaultPlan(
            ops={
                "connect": Fault(lost=0.05),
                "begin": Fault(error=0.03, lost=0.01),
                "execute": Fault(error=0.02, lost=0.01, latency=0.0005),
                "savepoint": Fault(error=0.01),
                "commit": Fault(error=0.02, lost=0.01, lost_after=0.02),
                "ping": Fault(lost=0.05),
            }
        ),
        cancel=0.08,
        kill=0.02,
        dawdle=0.01,
        hold_timeout=0.2,
        chaos_every=0.4,
        chaos=("disconnect_all", "break_all", "driver_bug"),
        crash_every=8,
    ),
}
"""The fault levels of ``--faults``."""


@dataclass(frozen=True)
class DemoConfig:
    """Options of one demo run (the command-line flags; ``progress`` is read by the display,
    not by :func:`run_demo`)."""

    duration: float = 5.0
    clients: int = 8
    size: int = 4
    accounts: int = 50
    seed: int | None = None
    faults: FaultsName = "some"
    db: str | None = None
    dsn: str | None = None
    progress: Literal["auto", "rich", "plain", "off"] = "auto"


@dataclass
class CheckResult:
    """The integrity check: ``ok`` and what was compared."""

    ok: bool
    expected_total: int
    actual_total: int
    ledger_rows: int
    accounts_off: int
    acked_missing: int
    rolled_back_present: int
    unknown_ids: int
    uncertain: int
    uncertain_committed: int
    problems: list[str] = field(default_factory=list)


GOOD_OUTCOMES = frozenset({"committed", "rolled back", "insufficient funds"})
"""The outcomes of :attr:`Stats.outcomes` that are not failures."""


@dataclass(frozen=True)
class Planned:
    """What one transfer drew from its client's random generator before it started: all of
    it, so that a client's sequence of transfers depends on the seed alone (retry pauses draw
    from another generator: how many retries happen depends on timing)."""

    src: int
    dst: int
    amount: int
    extras: frozenset[str]
    """Among ``fee``, ``veto``, ``kill``, ``dawdle``, ``cancel``."""
    cancel_after: float
    """Seconds after each attempt starts when a ``cancel`` transfer is cancelled."""


@dataclass
class Stats:
    """Live counters of the workload (single Trio thread: no locking needed)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    chaos: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    window: deque[tuple[float, float]] = field(default_factory=deque)
    acked: set[str] = field(default_factory=set)
    rolled_back: set[str] = field(default_factory=set)
    uncertain: set[str] = field(default_factory=set)
    attempted: dict[str, Planned] = field(default_factory=dict)
    """Every transfer started, by id, with what was drawn for it."""

    def committed(self, tid: str, latency: float) -> None:
        """Record a transfer whose client saw its COMMIT succeed."""
        self.acked.add(tid)
        self.outcomes["committed"] += 1
        self.latencies.append(latency)
        self.window.append((time.perf_counter(), latency))


@dataclass
class DemoResult:
    """Everything a run measured; ``exit_status`` is 0 only when the check holds."""

    config: DemoConfig
    seed: int
    elapsed: float
    stats: Stats
    pool: PoolStatistics | None
    injected: dict[str, int]
    check: CheckResult

    @property
    def exit_status(self) -> int:
        """0 when the integrity check holds, 1 otherwise."""
        return 0 if self.check.ok else 1


class _Sql:
    """SQL text for the database at hand: SQLite takes ``?``, psycopg ``%s``."""

    def __init__(self, postgres: bool) -> None:
        self.postgres = postgres

    def __call__(self, query: str) -> str:
        return query.replace("?", "%s") if self.postgres else query


def _drivers(config: DemoConfig, path: str | None) -> tuple[Driver, Callable[[], Driver]]:
    """The workload's driver and a factory of fault-free drivers for setup and checking
    (:class:`SetupError` if there is no driver for ``config.dsn``)."""
    if config.dsn is not None:
        try:
            from actors import psycopg as pg

            dsn = config.dsn
            return pg.from_url(dsn), lambda: pg.from_url(dsn)
        except ImportError as exc:
            raise SetupError(
                f"--dsn needs psycopg ({exc}): pip install 'trio-connection-supervisor[postgresql]'"
            ) from None
        except ValueError as exc:  # its message never echoes the URL
            raise SetupError(f"--dsn: {exc}") from None
    from actors.sqlite import SqliteDriver

    assert path is not None
    return SqliteDriver(path), lambda: SqliteDriver(path)


async def _create_schema(pool: Pool, sql: _Sql, accounts: int) -> None:
    await pool.execute("DROP TABLE IF EXISTS demo_ledger")
    await pool.execute("DROP TABLE IF EXISTS demo_accounts")
    await pool.execute(
        "CREATE TABLE demo_accounts (id INTEGER PRIMARY KEY, "
        "balance BIGINT NOT NULL CHECK (balance >= 0))"
    )
    await pool.execute(
        "CREATE TABLE demo_ledger (transfer_id TEXT PRIMARY KEY, src INTEGER NOT NULL, "
        "dst INTEGER NOT NULL, amount BIGINT NOT NULL)"
    )
    async with pool.transaction() as tx:
        for account in range(1, accounts + 1):
            await tx.execute(sql("INSERT INTO demo_accounts VALUES (?, ?)"), (account, INITIAL))


async def check_integrity(pool: Pool, accounts: int, stats: Stats | None = None) -> CheckResult:
    """Compare balances with the ledger (and, given the run's ``stats``, with what clients were
    told where they can know). Public so that a test can run it on a database it damaged on
    purpose."""
    problems: list[str] = []
    balances: dict[int, int] = {
        int(account): int(balance)
        for account, balance in await pool.fetch_all("SELECT id, balance FROM demo_accounts")
    }
    ledger = await pool.fetch_all("SELECT transfer_id, src, dst, amount FROM demo_ledger")
    expected = {a: INITIAL for a in range(1, accounts + 1)}
    for _, src, dst, amount in ledger:
        expected[src] = expected.get(src, 0) - amount
        expected[dst] = expected.get(dst, 0) + amount
    total = sum(balances.values())
    expected_total = accounts * INITIAL
    if total != expected_total:
        problems.append(f"total balance is {total}, expected {expected_total}")
    off = [a for a in expected.keys() | balances.keys() if balances.get(a) != expected.get(a)]
    if off:
        problems.append(
            f"{len(off)} account(s) disagree with the ledger (e.g. account {off[0]}: balance "
            f"{balances.get(off[0])}, ledger says {expected.get(off[0])})"
        )
    ids = {row[0] for row in ledger}
    acked_missing = rolled_back_present = unknown = uncertain = uncertain_committed = 0
    if stats is not None:
        acked_missing = len(stats.acked - ids)
        rolled_back_present = len(stats.rolled_back & ids)
        unknown = len(ids - stats.attempted.keys())
        uncertain = len(stats.uncertain)
        uncertain_committed = len(stats.uncertain & ids)
        if acked_missing:
            problems.append(f"{acked_missing} acknowledged commit(s) missing from the ledger")
        if rolled_back_present:
            problems.append(f"{rolled_back_present} rolled-back transfer(s) found in the ledger")
        if unknown:
            problems.append(f"{unknown} ledger row(s) for transfers nobody attempted")
    return CheckResult(
        ok=not problems,
        expected_total=expected_total,
        actual_total=total,
        ledger_rows=len(ledger),
        accounts_off=len(off),
        acked_missing=acked_missing,
        rolled_back_present=rolled_back_present,
        unknown_ids=unknown,
        uncertain=uncertain,
        uncertain_committed=uncertain_committed,
        problems=problems,
    )


@dataclass
class _Attempt:
    """How far one attempt got: see :meth:`Workload.transfer_once`."""

    body_done: bool = False


class Workload:
    """The clients, the chaos task and the numbers they produce."""

    def __init__(
        self, config: DemoConfig, level: FaultLevel, pool: Pool, faults: FaultDriver, seed: int
    ) -> None:
        self.config = config
        self.level = level
        self.pool = pool
        self.faults = faults
        self.seed = seed
        self.sql = _Sql(config.dsn is not None)
        self.stats = Stats()
        self.end = 0.0
        self.outer: dict[str, Any] = {} if config.dsn is not None else {"mode": "immediate"}
        self.pauses = random.Random(seed * 31 + 1)
        """Retry pauses: drawn as timing dictates, apart from the clients' generators."""
    async def transfer_once(
        self, attempt: _Attempt, tid: str, src: int, dst: int, amount: int, plan: frozenset[str]
    ) -> Transaction:
        """One attempt: the nested blocks described in :mod:`supervisor.cli.demo`.

        ``attempt.body_done`` is set as the last statement of the outer block's body: if the
        attempt fails before that, COMMIT was never sent, so the transfer is certainly not
        committed; after it, a failure or a cancellation may have hit COMMIT itself.
        """
        sql = self.sql
        async with self.pool.transaction(**self.outer) as tx:
            try:
                async with tx.transaction(savepoint=True) as debit:
                    await debit.execute(
                        sql("UPDATE demo_accounts SET balance = balance - ? WHERE id = ?"),
                        (amount, src),
                    )
            except IntegrityError:
                tx.rollback("insufficient funds")
            if "kill" in plan:
                tx.kill()  # this connection dies now; the actor replaces it
            async with tx.transaction(savepoint=True) as credit:
                await credit.execute(
                    sql("UPDATE demo_accounts SET balance = balance + ? WHERE id = ?"),
                    (amount, dst),
                )
            if "fee" in plan:
                async with tx.transaction(savepoint=True) as fee:
                    # From the credited account, which holds at least `amount` >= 1 now.
                    await fee.execute(
                        sql("UPDATE demo_accounts SET balance = balance - 1 WHERE id = ?"), (dst,)
                    )
                    await fee.execute(
                        sql("UPDATE demo_accounts SET balance = balance + 1 WHERE id = ?"), (src,)
                    )
                    fee.rollback("fee waived")
            async with tx.transaction() as ledger:  # flat: same transaction, no SQL of its own
                await ledger.execute(
                    sql(
                        "INSERT INTO demo_ledger (transfer_id, src, dst, amount) "
                        "VALUES (?, ?, ?, ?)"
                    ),
                    (tid, src, dst, amount),
                )
            if "dawdle" in plan and self.level.hold_timeout is not None:
                # A slow client holds its lease past hold_timeout: the pool revokes it.
                await trio.sleep(self.level.hold_timeout * 1.5)
            if "veto" in plan:
                tx.rollback("audit veto")
            attempt.body_done = True
        return tx

    def _failed(self, tid: str, outcome: str, attempt: _Attempt) -> None:
        self.stats.outcomes[outcome] += 1
        if attempt.body_done:
            self.stats.uncertain.add(tid)  # it may have failed during COMMIT: nobody can know
        else:
            self.stats.rolled_back.add(tid)  # COMMIT was never sent

    def draw(self, rng: random.Random) -> Planned:
        """The next transfer of the client whose generator is ``rng``."""
        level = self.level
        src, dst = rng.sample(range(1, self.config.accounts + 1), 2)
        amount = rng.randint(1, INITIAL // 10)
        extras = frozenset(
            name
            for name, p in (
                ("fee", 0.2),
                ("veto", 0.05),
                ("kill", level.kill),
                ("dawdle", level.dawdle),
                ("cancel", level.cancel),
            )
            if rng.random() < p
        )
        return Planned(src, dst, amount, extras, rng.uniform(0.0, 0.01))

    async def transfer(self, rng: random.Random, tid: str) -> None:
        """Run one transfer to its end (retrying serialization failures) and record it."""
        stats = self.stats
        planned = stats.attempted[tid] = self.draw(rng)
        src, dst, amount, plan = planned.src, planned.dst, planned.amount, planned.extras
        started = time.perf_counter()
        for n in range(MAX_ATTEMPTS):
            attempt = _Attempt()
            scope = trio.CancelScope()
            if "cancel" in plan:
                scope.deadline = trio.current_time() + planned.cancel_after
            try:
                with scope:
                    tx = await self.transfer_once(attempt, tid, src, dst, amount, plan)
            except SerializationFailure:
                # The database refused this attempt (nothing committed): run it again.
                stats.retries += 1
                if n + 1 < MAX_ATTEMPTS:
                    await trio.sleep(self.pauses.uniform(0, 0.002 * 2**n))  # backoff, not sync
                    continue
                stats.errors["SerializationFailure"] += 1
                self._failed(tid, "gave up", attempt)
                return
            except ConnectionLost:
                stats.errors["ConnectionLost"] += 1
                if "kill" in plan:
                    outcome = "killed"
                elif "dawdle" in plan:
                    outcome = "revoked"
                else:
                    outcome = "connection lost"
                self._failed(tid, outcome, attempt)
                return
            except (QueryError, TransactionFailed, PoolError) as exc:
                stats.errors[type(exc).__name__] += 1
                self._failed(tid, "error", attempt)
                return
            if scope.cancelled_caught:
                self._failed(tid, "cancelled", attempt)
                return
            if tx.committed:
                stats.committed(tid, time.perf_counter() - started)
            elif tx.rollback_reason == "insufficient funds":
                stats.outcomes["insufficient funds"] += 1
                stats.rolled_back.add(tid)
            else:
                stats.outcomes["rolled back"] += 1
                stats.rolled_back.add(tid)
            return

    async def client(self, index: int) -> None:
        """Run transfers until the end of the run."""
        rng = random.Random(self.seed * 1009 + index)
        n = 0
        while trio.current_time() < self.end:
            n += 1
            await self.transfer(rng, f"c{index}-{n}")

    async def chaos(self) -> None:
        """Break things now and then, from outside the clients."""
        level = self.level
        if level.chaos_every is None or not level.chaos:
            return
        rng = random.Random(self.seed * 7919)
        while True:
            await trio.sleep(rng.expovariate(1.0 / level.chaos_every))  # a timer, not sync
            if trio.current_time() >= self.end:
                return
            action = rng.choice(level.chaos)
            self.stats.chaos[action] += 1
            if action == "disconnect_all":
                await self.pool.disconnect_all(interval=0.1)
            elif action == "break_all":
                self.faults.break_all()  # like a database server restart
            elif action == "driver_bug":
                # An unexpected exception in a driver call: in a client's call (the client gets
                # ConnectionLost; the connection's actor crashes and the supervisor restarts
                # it), or in one an actor makes while it recovers a connection (it connects a
                # new one).
                op = rng.choice(("execute", "reset"))
                self.faults.fail_next(op, RuntimeError(f"injected driver bug in {op}"))


class CrashingConfigure:
    """The pool's ``configure`` hook with a bug on purpose: past the first ``spare`` connect
    attempts (the pool's own first connections), it raises on the next one and then on every
    ``every``-th (``None``: never). An exception from ``configure`` is an actor crash: the
    supervisor restarts the actor with backoff and counts it in ``statistics().restarts``."""

    def __init__(self, every: int | None, spare: int) -> None:
        self.every = every
        self.spare = spare
        self.attempts = 0
        self.crashes = 0
        self.enabled = True

    def __call__(self, options: Mapping[str, Any], index: int) -> Mapping[str, Any]:
        self.attempts += 1
        late = self.attempts - self.spare - 1  # 0 for the first reconnect
        if self.enabled and self.every is not None and late >= 0 and late % self.every == 0:
            self.crashes += 1
            raise RuntimeError(f"injected bug in configure (connect attempt {self.attempts})")
        return options


Monitor = Callable[[Workload], Awaitable[None]]
"""Something :func:`run_demo` runs beside the clients until they are done (it is cancelled
then), e.g. :meth:`supervisor.cli.display.Progress.run`."""


@contextlib.contextmanager
def _database_path(config: DemoConfig) -> Iterator[str | None]:
    if config.dsn is not None:
        yield None
        return
    if config.db is not None:
        yield config.db
        return
    directory = tempfile.mkdtemp(prefix="tcs-demo-")
    try:
        yield os.path.join(directory, "demo.db")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def run_demo(config: DemoConfig, monitor: Monitor | None = None) -> DemoResult:
    """Run the workload and the integrity check, with ``monitor(workload)`` (if given)
    running alongside the clients."""
    seed = config.seed if config.seed is not None else random.randrange(2**31)
    level = LEVELS[config.faults]
    sql = _Sql(config.dsn is not None)
    with _database_path(config) as path:
        inner, clean = _drivers(config, path)
        async with open_pool(
            clean(),
            size=1,
            name="demo-setup",
            # Wait SETUP_WAIT for the database, not the ~1 s after which CoDel would shed.
            queue_target=SETUP_WAIT,
            queue_interval=SETUP_WAIT,
            limits=SafetyLimits(checkout_timeout=SETUP_WAIT, connect_timeout=SETUP_WAIT),
        ) as setup:
            await _create_schema(setup, sql, config.accounts)
        faults = FaultDriver(inner, level.plan, seed=seed)
        crashing = CrashingConfigure(level.crash_every, spare=config.size)
        limits = SafetyLimits(
            checkout_timeout=10.0,
            hold_timeout=level.hold_timeout,
            connect_timeout=5.0,
            shutdown_grace=2.0,
            cleanup_timeout=2.0,
        )
        started = time.perf_counter()
        pool_stats: PoolStatistics | None = None
        async with open_pool(
            faults,
            size=config.size,
            name="demo",
            backoff=Backoff(kind="rand_exp", min=0.005, max=0.2),
            idle_interval=0.5,
            limits=limits,
            max_restarts=1000,
            seed=seed,
            configure=crashing,
        ) as pool:
            work = Workload(config, level, pool, faults, seed)
            work.end = trio.current_time() + config.duration
            with trio.move_on_after(config.duration + 30.0):  # a safety net, not the plan
                async with trio.open_nursery() as nursery:
                    if monitor is not None:
                        nursery.start_soon(monitor, work)
                    nursery.start_soon(work.chaos)
                    async with trio.open_nursery() as clients:
                        for index in range(config.clients):
                            clients.start_soon(work.client, index)
                    nursery.cancel_scope.cancel()
            faults.enabled = crashing.enabled = False
            pool_stats = pool.statistics()
        elapsed = time.perf_counter() - started
        async with open_pool(clean(), size=1, name="demo-check") as checker:
            check = await check_integrity(checker, config.accounts, work.stats)
    injected: dict[str, int] = {}
    for (_, what), n in faults.injected.items():
        injected[what] = injected.get(what, 0) + n
    if crashing.crashes:
        injected["crash"] = crashing.crashes
    return DemoResult(config, seed, elapsed, work.stats, pool_stats, injected, check)
