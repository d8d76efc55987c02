"""The fault-matrix row "client cancelled at each await point", done systematically on the real
server: not a random deadline, which lands wherever the clock happens to be, but after every
scheduling step of the client's task, one after the other.

Why: a cancellation can land at any await of the client: while it waits for a connection, while
a reply is on the wire, in BEGIN, in RELEASE SAVEPOINT, in COMMIT, in a cursor's FETCH or
CLOSE. Each is a different path through the session, the lender and the actor's recovery, and a
random timeout (``test_row_client_cancelled_mid_transaction``) finds only the common ones. Here
one scenario runs again and again on one pool, cancelled after step k = 1, 2, 3, ... of the
client's task, until a run finishes before step k: then every await point of the scenario has
been cancelled once.

How: :class:`CancelAtStep`, a :class:`trio.abc.Instrument`, counts the ``after_task_step``
calls of the client's task while a run is armed and, after step k, calls ``cancel()`` on the
run's own (fresh) cancel scope, from the hook. That is safe in Trio (checked against its run
loop, trio 0.35 ``_core/_run.py``, and by ``test_the_harness_cancels_at_exactly_the_kth_await``):

* the hook runs in the run loop between two steps, which is also where Trio itself cancels a
  scope whose deadline expired (``Deadlines.expire`` calls ``CancelScope._cancel`` outside any
  task). ``cancel()`` marks the scopes and, for each task in them that is parked, calls its
  abort function and reschedules it with ``Cancelled``: synchronous work that Trio does from
  whichever context cancels (another task, the deadline loop);
* by ``after_task_step`` the step's yield has been handled: the task is either rescheduled (a
  schedule point: the cancel is delivered at its next checkpoint, as any cancel would be) or
  parked with its abort function registered (the cancel aborts that very wait: the reply on
  the wire, the queue, the event);
* two differences from a cancel by another task, both handled: ``current_task()`` is still the
  stepped task during the hook, so ``Cancelled`` names the client as its own source (cosmetic:
  the abort functions in play, fd waits, the lender's queue, parking lots, use only their
  closures, never ``current_task()``); and an exception raised in a hook is only logged, the
  instrument silently removed. So the hook catches everything and records it, the test fails
  on any, and ``remove_instrument`` at the end raises ``KeyError`` if Trio had removed it.

``before_task_step`` would be safe too, but late: the task is rescheduled by then, so the cancel
could only land at the *next* await, never abort the wait in flight.

The await points of a run are not quite fixed: psycopg prepares a statement on its 5th run on a
connection, one more round trip. So the uncancelled runs first (``WARMUP``) give the scenario's
reference path, the site of each step (:func:`where`); a cancelled run whose steps before the
cancel left that path is checked like any other, then run again at the same k (bounded), so
that every point of the path is cancelled once. The modes (parametrized), each its own path:

* ``prepared``: the matrix's pool; after the warm-up every statement is prepared, and reused;
* ``preparing``: ``prepare_threshold=0`` and a comment unique to the run before every SQL text,
  so every statement is prepared, on the wire, in every run (the Parse round trip is a point);
* ``thread``: the driver's other I/O mode (``io=thread``). Its await points are the Trio side
  of each call (the engine's queue lock, the thread limiter, the wait for the thread); the
  Trio thread holds the GIL from the park to the hook, so the cancel always finds the call
  not yet begun by its thread (it then never runs). A call abandoned while running in its
  thread is tested in tests/postgres/test_psycopg_driver.py;
* ``guarded``: a ``query_timeout`` that is never reached, so every call runs under the
  session's own cancel scope (the other branch of ``Session.call``).

The scenarios: one-shot ``pool.fetch_val`` then ``pool.execute`` (an autocommitted write of a
ledger row and the counter); a ``pool.run()`` block with two queries; a ``pool.transaction()``
block (:func:`matrix.transfer`'s: a uniquely numbered ledger row and the counter, then COMMIT);
a savepoint nested in a transaction; a server-side cursor (``conn.stream``) left early, then a
query on the same connection.

The invariants, checked after every run (and :func:`matrix.check` once at the end):

* the client got its exact result, or ``trio.Cancelled``; any other exception fails the test
  (the pool, the server and the network are healthy: no ``PoolError`` is justified);
* the pool gets back to full size, every connection idle: ``pool.wait()`` (an event the lender
  sets when a connection becomes idle, so no poll), then the statistics asserted exactly;
* the pool's sessions on the server (found by ``application_name``, :func:`matrix.target`) are
  exactly ``SIZE`` sessions, all idle: none idle in transaction, none still running a cancelled
  statement, none leaked;
* the next use of the pool works, on both connections at once;
* for the scenarios that write: the row is in the ledger once if the client was told it was
  committed, absent if the cancel landed before COMMIT began, once or absent (uncertain) if it
  landed during it; the counter always equals the ledger. The one-shot write has no await
  point of its own before it is sent (a free connection is taken without one), so every
  cancel of it lands with the statement on the wire: uncertain. A write called in a scope
  already cancelled is the guard test's case: it must never be sent.

Found by this file, and fixed, now guarded by
``test_a_statement_called_in_an_already_cancelled_scope_is_not_sent``: with io=trio a statement
called on a held connection in an already-cancelled scope was sent, and in autocommit it
committed, while the client got ``Cancelled`` (the psycopg seam ran the protocol generator,
whose first step writes the query, before its first Trio wait). The enumeration showed it where
a cancel did not land at the point it was fired at (printed as "lands at"): fired at the
checkout's schedule point of a ``pool.run()`` block, it landed at the reply wait of the first
query, which was sent.

Rules: each run has a fresh cancel scope and transaction id; the pool is the fault matrix's
(size 2, fast backoff, the matrix's limits) with ``idle_interval=60``, so that no idle ping
takes a connection out of the idle set while a snapshot is asserted; nothing is synchronised by
a sleep (the one sleep paces the bounded poll of ``pg_stat_activity``, where the backend of a
replaced connection may linger until it has read its EOF); every loop is bounded in count and
time. What is printed (await points per scenario, how long the pool took to be back to full
size after a cancellation) goes into docs/testing.rst.
"""

from __future__ import annotations

import itertools
import os
import statistics
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
import pytest
import trio
from matrix import Outcomes, check, make_tables, target

import actors
import supervisor
from supervisor import Backoff, Pool, SafetyLimits, open_pool

pytestmark = pytest.mark.postgresql

SIZE = 2
FAST = Backoff("exp", 0.02, 0.2)
LIMITS = SafetyLimits(checkout_timeout=10, connect_timeout=2, cleanup_timeout=2, shutdown_grace=2)
MAX_POINTS = 400  # bound of k: no scenario here has a tenth as many
MAX_ATTEMPTS = 6  # runs at one k until one stays on the reference path up to the cancel
WARMUP = 12  # uncancelled runs first: the reference path, past psycopg's 5th-run prepare
TEST_BOUND = 40.0  # seconds, the whole test (pool open and close included)
RECOVERY_BOUND = 10.0  # seconds for the pool to be back to full size after one run
SERVER_BOUND = 5.0  # seconds for the server to show exactly the pool's sessions, all idle
MAX_POLLS = 5_000  # bound of that poll in count (2 ms apart: beyond SERVER_BOUND)

_tids = itertools.count(5_000_000)  # transaction ids, apart from the other rows'
_TESTS = str(Path(__file__).resolve().parent) + os.sep  # this row and matrix.py
_SUPERVISOR = str(Path(supervisor.__file__).resolve().parent) + os.sep
_ACTORS = str(Path(actors.__file__).resolve().parent) + os.sep
_NOTHING: Any = object()  # what a cancelled client got back


# -- the harness ----------------------------------------------------------------------------------


def _site(frames: Iterator[tuple[Any, int]]) -> str:
    """The chain of this project's frames (outermost first): the scenario's line, the pool API
    called, the driver method, the innermost frame."""
    scenario = api = drv = inner = ""
    for frame, line in frames:
        code = frame.f_code
        name = code.co_filename
        if name.startswith(_TESTS):
            scenario = f"{code.co_qualname}:{line}"
        elif name.startswith(_SUPERVISOR):
            api = api or code.co_qualname
            inner = f"{Path(name).name}:{line} {code.co_qualname}"
        elif name.startswith(_ACTORS):
            drv = drv or code.co_qualname
            inner = f"{Path(name).name}:{line} {code.co_qualname}"
    return " > ".join(part for part in (scenario, api, drv, inner) if part) or "?"


def where(task: trio.lowlevel.Task) -> str:
    """Where ``task`` is parked."""
    return _site(task.iter_await_frames())


def raised_at(tb: TracebackType | None) -> str:
    """Where an exception was raised, from its traceback."""
    frames: list[tuple[Any, int]] = []
    while tb is not None:
        frames.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    return _site(iter(frames))


class CancelAtStep(trio.abc.Instrument):
    """Counts the scheduling steps of one armed task, noting where each left it; after step
    ``at``, cancels ``scope``. See the module docstring for why that is safe from this hook."""

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.scope: trio.CancelScope | None = None
        self.at = 0
        self.path: list[str] = []  # where each step left the task
        self.fired = False
        self.fired_at = 0.0
        self.errors: list[BaseException] = []

    def arm(self, scope: trio.CancelScope, at: int) -> None:
        """Count the current task's steps from now on (the current one is step 1 when it
        yields); ``at=0``: never cancel."""
        self.task = trio.lowlevel.current_task()
        self.scope, self.at, self.path, self.fired = scope, at, [], False

    def disarm(self) -> None:
        self.task = self.scope = None

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is not self.task:
            return
        try:
            self.path.append(where(task))
            scope = self.scope
            if len(self.path) == self.at and scope is not None:
                self.fired, self.fired_at = True, trio.current_time()
                scope.cancel()
        except BaseException as exc:  # Trio would only log it and drop the instrument
            self.errors.append(exc)


# -- the scenarios --------------------------------------------------------------------------------


@dataclass
class Client:
    """What a scenario gets: the pool, its tables, this run's transaction id and outcomes."""

    pool: Pool
    table: str
    tid: int
    out: Outcomes
    tag: str  # put before every SQL text: "", or a comment unique to the run

    def sql(self, text: str) -> str:
        return self.tag + text


async def one_shot(c: Client) -> Any:
    """``pool.fetch_val``, then ``pool.execute`` of an autocommitted write: its own COMMIT,
    so cancelled during it, the write is uncertain."""
    t = c.table
    told = c.out.failed
    try:
        value = await c.pool.fetch_val(c.sql("select 40 + 2"))
        told = c.out.uncertain
        write = f"with i as (insert into {t}_ledger values (%s, 0)) update {t}_count set n = n + 1"
        count = await c.pool.execute(c.sql(write), (c.tid,))
    except BaseException as exc:
        c.out.note(exc)
        told.add(c.tid)
        raise
    c.out.committed.add(c.tid)
    return value, count


async def run_block(c: Client) -> Any:
    """A ``pool.run()`` block with two queries."""
    async with c.pool.run() as conn:
        one = await conn.fetch_val(c.sql("select 1"))
        rows = await conn.fetch_all(c.sql("select g from generate_series(1, 3) g"))
    return one, rows


async def transaction(c: Client) -> Any:
    """:func:`matrix.transfer`'s transaction (its SQL tagged): a ledger row and the counter,
    then COMMIT; outcomes recorded by its rule."""
    t = c.table
    committing = False
    try:
        async with c.pool.transaction() as tx:
            await tx.execute(c.sql(f"insert into {t}_ledger values (%s, 0)"), (c.tid,))
            await tx.execute(c.sql(f"update {t}_count set n = n + 1"))
            committing = True  # the block's end sends COMMIT
        c.out.committed.add(c.tid)
    except BaseException as exc:  # cancelled: before COMMIT nothing may show; during, either
        c.out.note(exc)
        (c.out.uncertain if committing else c.out.failed).add(c.tid)
        raise
    return tx.committed


async def savepoint(c: Client) -> Any:
    """A ledger row in a transaction, the counter in a savepoint nested in it, a query after
    RELEASE, then COMMIT."""
    t = c.table
    committing = False
    try:
        async with c.pool.transaction() as tx:
            await tx.execute(c.sql(f"insert into {t}_ledger values (%s, 1)"), (c.tid,))
            async with c.pool.transaction(savepoint=True) as sp:
                await sp.execute(c.sql(f"update {t}_count set n = n + 1"))
            await tx.fetch_val(c.sql(f"select n from {t}_count"))
            committing = True
        c.out.committed.add(c.tid)
    except BaseException as exc:
        c.out.note(exc)
        (c.out.uncertain if committing else c.out.failed).add(c.tid)
        raise
    return tx.committed, sp.committed


async def stream(c: Client) -> Any:
    """A server-side cursor over 50 rows, 5 per FETCH, left after 12 (closing it commits the
    transaction it opened); then a query on the same connection."""
    got: list[int] = []
    async with c.pool.run() as conn:
        query = c.sql("select g from generate_series(1, 50) g")
        async with conn.stream(query, batch_size=5) as rows:
            async for (g,) in rows:  # bounded: 50 rows
                got.append(g)
                if len(got) == 12:
                    break
        status = conn.status()
        after = await conn.fetch_val(c.sql("select 2"))
    return got, status, after


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Client], Awaitable[Any]]
    expected: Any
    writes: bool


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("one-shot", one_shot, (42, 1), writes=True),
        Scenario("run block", run_block, (1, [(1,), (2,), (3,)]), writes=False),
        Scenario("transaction", transaction, True, writes=True),
        Scenario("savepoint", savepoint, (True, True), writes=True),
        Scenario("stream left early", stream, (list(range(1, 13)), "idle", 2), writes=False),
    )
}


@dataclass(frozen=True)
class Mode:
    query: str  # added to the target URL (the driver's own query parameters)
    unique: bool  # a comment unique to the run before every SQL text (never prepared before)
    limits: SafetyLimits = LIMITS


MODES = {
    # The matrix's pool: psycopg prepares each statement on its 5th run, reused after.
    "prepared": Mode("", unique=False),
    # Every statement prepared in every run: the Parse round trip is an await point of its own.
    "preparing": Mode("&prepare_threshold=0", unique=True),
    # libpq in worker threads (abandoned on cancel).
    "thread": Mode("&io=thread", unique=False),
    # A query_timeout (never reached): every call runs under the session's own cancel scope.
    "guarded": Mode("", unique=False, limits=replace(LIMITS, query_timeout=30)),
}


@dataclass
class Run:
    """What one run of a scenario gave."""

    value: Any
    cancelled: bool
    fired: bool
    path: list[str]
    landed: str | None  # where Cancelled was raised
    fired_at: float
    returned_at: float


async def run_once(
    instrument: CancelAtStep, scenario: Scenario, client: Client, at: int
) -> Run:
    """One run of ``scenario`` as the client, cancelled after its step ``at`` (0: never)."""
    value = _NOTHING
    landed = None
    with trio.CancelScope() as scope:
        instrument.arm(scope, at)
        try:
            value = await scenario.run(client)
        except trio.Cancelled as exc:
            landed = raised_at(exc.__traceback__)
            raise
        except Exception as exc:
            fired = instrument.path[at - 1] if instrument.fired else None
            raise AssertionError(
                f"cancel point {at} of {scenario.name}: the client got {exc!r}, not its result "
                f"or Cancelled (the cancel was fired at {fired})"
            ) from exc
        finally:
            instrument.disarm()
    return Run(value, scope.cancelled_caught, instrument.fired, instrument.path, landed,
               instrument.fired_at, trio.current_time())


# -- the invariants -------------------------------------------------------------------------------


async def back_to_full_size(pool: Pool, since: float) -> float:
    """Wait (bounded) until the pool is at full size, all idle; assert the snapshot exactly;
    return how long it took since ``since``."""
    await pool.wait(timeout=RECOVERY_BOUND)
    took = trio.current_time() - since
    s = pool.statistics()
    assert (s.size, s.idle, s.busy, s.connecting, s.waiting) == (SIZE, SIZE, 0, 0, 0), s
    return took


async def sessions_all_idle(admin: psycopg.Connection[Any], table: str) -> None:
    """The pool's sessions on the server: exactly ``SIZE``, all idle (a bounded poll: the
    backend of a replaced connection may linger until it has read its EOF)."""
    states: list[str] = []
    with trio.move_on_after(SERVER_BOUND):
        for _ in range(MAX_POLLS):
            rows = admin.execute(
                "select coalesce(state, '?') from pg_stat_activity where application_name = %s",
                (table,),
            ).fetchall()
            states = sorted(str(r[0]) for r in rows)
            if states == ["idle"] * SIZE:
                return
            await trio.sleep(0.002)
    raise AssertionError(f"the pool's sessions on the server are {states}, not {SIZE} idle ones")


async def next_use_works(pool: Pool) -> None:
    """Both connections at once: idle, and each answers a query."""
    with trio.fail_after(RECOVERY_BOUND):
        async with pool.run(queue=False) as first:
            assert first.status() == "idle"
            other: list[int] = []

            async def second() -> None:
                async with pool.run(queue=False) as conn:  # a child task: its own connection
                    assert conn.status() == "idle"
                    other.append(await conn.fetch_val("select pg_backend_pid()"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(second)
            mine = await first.fetch_val("select pg_backend_pid()")
    assert len(other) == 1 and other[0] != mine


def ledger_agrees(admin: psycopg.Connection[Any], table: str, tid: int, out: Outcomes) -> bool:
    """The run's row is there as often as the client was told, and the counter equals the
    ledger. Returns whether the row is there."""
    row = admin.execute(
        f"select (select count(*) from {table}_ledger where id = %s),"
        f" (select count(*) from {table}_ledger), (select n from {table}_count)",
        (tid,),
    ).fetchone()
    assert row is not None
    mine, rows, counter = (int(v) for v in row)
    assert counter == rows, f"counter {counter} and ledger {rows} disagree"
    if tid in out.committed:
        assert mine == 1, f"transaction {tid}: told committed, {mine} rows"
    elif tid in out.failed:
        assert mine == 0, f"transaction {tid}: cancelled before it could commit, {mine} rows"
    else:
        assert tid in out.uncertain, f"transaction {tid}: the client recorded no outcome"
        assert mine in (0, 1)
    return mine == 1


# -- the row --------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one enumeration found (printed, for the docs)."""

    reference: list[str] = field(default_factory=list)  # the path: where each step parks
    warmup_paths: int = 0  # distinct paths among the uncancelled runs
    runs: int = 0
    off_path: int = 0  # cancelled runs that left the reference path before the cancel
    cancelled: int = 0
    late: int = 0  # the cancel fired after the client's last checkpoint: it got its result
    moved: dict[str, str] = field(default_factory=dict)  # fired at -> landed at, when not there
    recovery: list[float] = field(default_factory=list)  # after each cancellation, seconds
    released: list[float] = field(default_factory=list)  # from the cancel to the client's return
    replaced: int = 0  # connections replaced after a cancellation
    uncertain: int = 0
    uncertain_committed: int = 0
    seconds: float = 0.0

    def recovery_ms(self) -> tuple[float, float]:
        rec = sorted(self.recovery)
        return (statistics.median(rec) * 1000, rec[-1] * 1000) if rec else (0.0, 0.0)

    def lines(self, name: str) -> Iterator[str]:
        med, top = self.recovery_ms()
        yield (
            f"[cancel points] {name}: {len(self.reference)} await points at"
            f" {len(set(self.reference))} distinct sites ({self.warmup_paths} paths in the"
            f" warm-up); {self.runs} runs, {self.cancelled}"
            f" cancelled ({self.off_path} off the reference path), {self.late} after the last"
            f" checkpoint; the cancelled client back within {max(self.released) * 1000:.2f} ms;"
            f" back to full size after a cancellation: median {med:.2f} ms, max"
            f" {top:.2f} ms; connections replaced {self.replaced}; uncertain writes"
            f" {self.uncertain} ({self.uncertain_committed} committed); {self.seconds:.1f} s"
        )
        for k, site in enumerate(self.reference, 1):
            moved = self.moved.get(site)
            yield f"    {k:>2}: {site}" + (f"\n        lands at {moved}" if moved else "")


@pytest.fixture(scope="module")
def tallies() -> Iterator[dict[str, Tally]]:
    found: dict[str, Tally] = {}
    yield found
    if found:
        print("\n[cancel points] summary (for docs/testing.rst):")
        by_mode: dict[str, Tally] = {}
        for name, tally in found.items():
            med, top = tally.recovery_ms()
            print(f"  {name:<30} {len(tally.reference):>3} await points"
                  f" ({len(set(tally.reference)):>2} sites); the client back within"
                  f" {max(tally.released) * 1000:.2f} ms; the pool back to full size: median"
                  f" {med:.2f} ms, max {top:.2f} ms")
            per_mode = by_mode.setdefault(name.rsplit("(", 1)[-1].rstrip(")"), Tally())
            per_mode.recovery += tally.recovery
            per_mode.released += tally.released
        for mode, tally in by_mode.items():
            med, top = tally.recovery_ms()
            print(f"  {'all (' + mode + ')':<30} {len(tally.recovery):>3} cancellations;"
                  f" the client back within {max(tally.released) * 1000:.2f} ms; the pool back"
                  f" to full size: median {med:.2f} ms, max {top:.2f} ms")


@pytest.fixture
def dsn(pg_dsn: str) -> str:
    return pg_dsn


async def test_the_harness_cancels_at_exactly_the_kth_await() -> None:
    """The instrument itself: three awaits (a checkpoint, a parked sleep, a checkpoint) are
    three cancel points, each cancelled at its own await (the sleep aborted, not slept: 2 is
    never reached), and the fourth run is not cancelled at all."""
    instrument = CancelAtStep()
    trio.lowlevel.add_instrument(instrument)
    try:
        seen: list[tuple[list[int], bool]] = []
        for at in range(1, 10):
            reached: list[int] = []
            with trio.CancelScope() as scope:
                instrument.arm(scope, at)
                try:
                    await trio.lowlevel.checkpoint()
                    reached.append(1)
                    await trio.sleep(0.05)
                    reached.append(2)
                    await trio.lowlevel.checkpoint()
                    reached.append(3)
                finally:
                    instrument.disarm()
            seen.append((reached, scope.cancelled_caught))
            if not instrument.fired:
                break
    finally:
        trio.lowlevel.remove_instrument(instrument)  # KeyError if Trio dropped it
    assert not instrument.errors
    assert seen == [([], True), ([1], True), ([1, 2], True), ([1, 2, 3], False)]


@pytest.mark.parametrize(
    "io",
    ["trio", "thread"],
)
async def test_a_statement_called_in_an_already_cancelled_scope_is_not_sent(
    dsn: str, io: str
) -> None:
    """Trio's rule for an operation called in a cancelled scope: ``Cancelled``, and the operation
    did not happen (Trio's own socket calls check before the system call; the driver protocol
    says every driver method "checks for cancellation"). Found by the enumeration above: in a
    ``pool.run()`` block, the cancel fired at the checkout's schedule point lands only at the
    reply wait of the first query, which was sent. Here, a write on a held connection, in
    autocommit: io=trio sends it (the server shows its text as the session's last query) and
    it usually commits, unless the actor's server-side cancel wins the race, while the client
    gets ``Cancelled``; io=thread never runs it (``ThreadEngine.call`` checks first). One-shot
    calls are not affected: their checkout checks first."""
    table = make_tables(dsn)
    marker = f"/* called cancelled, {table} */ "
    async with open_pool(target(dsn, table) + f"&io={io}", size=SIZE, backoff=FAST,
                         limits=LIMITS, idle_interval=60) as pool:
        await pool.wait()
        async with pool.run() as conn:
            with trio.CancelScope() as scope:
                scope.cancel()
                await conn.execute(marker + f"insert into {table}_ledger values (1, 0)")
        assert scope.cancelled_caught
        await back_to_full_size(pool, trio.current_time())
        with psycopg.connect(dsn, autocommit=True) as c:  # before the next use sends anything
            row = c.execute(
                "select (select count(*) from pg_stat_activity where application_name = %s"
                f" and position(%s in query) > 0), (select count(*) from {table}_ledger)",
                (table, marker),
            ).fetchone()
        await next_use_works(pool)
    assert row is not None
    sent, written = row
    assert (sent, written) == (0, 0), (
        f"the client was cancelled before it called execute, yet the statement was sent"
        f" ({sent}) and committed ({written})"
    )


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_a_client_cancelled_at_each_await_point_gets_its_result_or_cancelled_and_the_pool_recovers(  # noqa: E501
    dsn: str, name: str, mode: str, tallies: dict[str, Tally]
) -> None:
    scenario = SCENARIOS[name]
    how = MODES[mode]
    table = make_tables(dsn)
    tally = Tally()
    total = Outcomes()
    instrument = CancelAtStep()
    started = trio.current_time()
    trio.lowlevel.add_instrument(instrument)
    try:
        with trio.fail_after(TEST_BOUND), psycopg.connect(dsn, autocommit=True) as admin:
            async with open_pool(target(dsn, table) + how.query, size=SIZE, backoff=FAST,
                                 limits=how.limits, idle_interval=60) as pool:
                await pool.wait()

                async def run_at(at: int) -> Run:
                    """One run cancelled after step ``at``, and every invariant after it."""
                    tid = next(_tids)
                    client = Client(pool, table, tid, Outcomes(), f"/* {tid} */ " * how.unique)
                    before = pool.statistics()
                    run = await run_once(instrument, scenario, client, at)
                    out = client.out
                    assert run.fired or not run.cancelled, "cancelled by nobody"
                    if run.cancelled:
                        assert run.value is _NOTHING
                        assert out.errors in ({}, {"Cancelled": 1}), out.errors
                    else:
                        assert run.value == scenario.expected, (at, run.path)
                        assert not out.errors, (at, out.errors)
                    took = await back_to_full_size(pool, run.returned_at)
                    await sessions_all_idle(admin, table)
                    if scenario.writes:
                        there = ledger_agrees(admin, table, tid, out)
                        if tid in out.uncertain:
                            tally.uncertain += 1
                            tally.uncertain_committed += there
                    await next_use_works(pool)
                    total.merge(out)
                    tally.runs += 1
                    if run.cancelled:
                        tally.cancelled += 1
                        tally.recovery.append(took)
                        tally.released.append(run.returned_at - run.fired_at)
                        tally.replaced += pool.statistics().connects - before.connects
                    elif run.fired:
                        tally.late += 1
                    return run

                paths: Counter[tuple[str, ...]] = Counter()
                for _ in range(WARMUP):
                    paths[tuple((await run_at(0)).path)] += 1
                tally.warmup_paths = len(paths)
                reference = list(paths.most_common(1)[0][0])
                tally.reference = reference
                for at in range(1, MAX_POINTS + 1):
                    for _ in range(MAX_ATTEMPTS):
                        run = await run_at(at)
                        if run.path[:at] == reference[:at]:
                            break
                        tally.off_path += run.cancelled
                    else:
                        raise AssertionError(
                            f"{name}: {MAX_ATTEMPTS} runs at cancel point {at} all left the"
                            f" reference path {reference}; the last: {run.path}"
                        )
                    if not run.fired:
                        assert at == len(reference) + 1, (at, reference)
                        break  # finished before step k: every await point was cancelled
                    if run.landed is not None and run.landed != reference[at - 1]:
                        tally.moved[reference[at - 1]] = run.landed
                else:
                    raise AssertionError(f"{name}: more than {MAX_POINTS} await points")
                await check(dsn, pool, table, total)
    finally:
        trio.lowlevel.remove_instrument(instrument)  # KeyError if Trio dropped it
    assert not instrument.errors, instrument.errors
    assert tally.cancelled >= len(tally.reference) >= 1
    tally.seconds = trio.current_time() - started
    label = f"{name} ({mode})"
    tallies[label] = tally
    for line in tally.lines(label):
        print(line)
