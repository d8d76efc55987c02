"""The fault matrix's harness: one load, one set of invariants, checked after every fault.

The load: ``clients`` tasks, each running transactions that insert one uniquely numbered row
into a ledger table (and bump a counter row), for ``duration`` seconds or ``count``
transactions. Each client records, per transaction id, what it was told: committed (the block
ended normally), failed (a ``PoolError`` before ``COMMIT`` was sent: nothing may be visible),
or uncertain (the connection was lost, or the client cancelled, during ``COMMIT``: either
outcome is allowed, but exactly once). A client cancelled before ``COMMIT`` counts as failed.

The invariants (:func:`check`), the same in every row:

* every client got a result or a ``PoolError`` (any other exception fails the row) and no task
  hung (the whole row runs under a deadline);
* every committed transaction is in the ledger exactly once; no failed one is;
* the counter equals the number of ledger rows (nothing half-applied);
* the pool returns to full size with every connection idle;
* no backend of the pool is left idle in transaction.

Besides, :func:`check` prints how long the clients were cut off (:meth:`Outcomes.outage`: the
longest time from an error a client saw to the next commit) and the slowest
transaction, the recovery columns of the testing guide's table.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import trio

from supervisor import ConnectionLost, Pool, PoolError

_ids = itertools.count(1)
_tids = itertools.count(1_000_000)  # transaction ids, unique across the loads of a run


@dataclass
class Outcomes:
    """What the clients were told, by transaction id."""

    committed: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    uncertain: set[int] = field(default_factory=set)
    errors: dict[str, int] = field(default_factory=dict)
    error_times: list[float] = field(default_factory=list)
    commit_times: list[float] = field(default_factory=list)
    slowest: float = 0.0  # the longest any transaction took, whatever its outcome

    def note(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1
        self.error_times.append(trio.current_time())

    def merge(self, earlier: Outcomes) -> None:
        """Add what the clients of an earlier phase of the same row were told."""
        self.committed |= earlier.committed
        self.failed |= earlier.failed
        self.uncertain |= earlier.uncertain
        for name, n in earlier.errors.items():
            self.errors[name] = self.errors.get(name, 0) + n
        self.error_times += earlier.error_times
        self.commit_times += earlier.commit_times
        self.slowest = max(self.slowest, earlier.slowest)

    def outage(self) -> float | None:
        """How long the clients were cut off: for each error a client saw, the time until the
        next commit (of any client); the longest (None: no client saw an error, or none
        committed after one)."""
        commits = sorted(self.commit_times)
        gaps = []
        for at in self.error_times:
            index = bisect.bisect_left(commits, at)
            if index < len(commits):
                gaps.append(commits[index] - at)
        return max(gaps) if gaps else None


def make_tables(dsn: str) -> str:
    """A fresh ledger table and counter; returns the name prefix."""
    name = f"fm_{next(_ids)}_{id(object()) % 100000}"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"create table {name}_ledger (id int primary key, client int)")
        c.execute(f"create table {name}_count (n int not null)")
        c.execute(f"insert into {name}_count values (0)")
    return name


@contextmanager
def told(out: Outcomes, tid: int) -> Iterator[None]:
    """Record what a client running its own transaction ``tid`` in the block was told:
    committed if the block ends normally, failed on a ``PoolError`` (which it swallows)."""
    try:
        yield
    except PoolError as exc:
        out.note(exc)
        out.failed.add(tid)
    else:
        out.committed.add(tid)


async def transfer(pool: Pool, table: str, tid: int, client: int, out: Outcomes) -> None:
    """One transaction of the load, with its outcome recorded."""
    committing = False
    start = trio.current_time()
    try:
        async with pool.transaction() as tx:
            await tx.execute(f"insert into {table}_ledger values (%s, %s)", (tid, client))
            await tx.execute(f"update {table}_count set n = n + 1")
            committing = True  # the block's end sends COMMIT
        out.committed.add(tid)
        out.commit_times.append(trio.current_time())
    except ConnectionLost as exc:
        out.note(exc)
        (out.uncertain if committing else out.failed).add(tid)
    except PoolError as exc:
        out.note(exc)
        (out.uncertain if committing else out.failed).add(tid)
    except BaseException as exc:  # cancelled: before COMMIT nothing may show; during, either
        out.note(exc)
        (out.uncertain if committing else out.failed).add(tid)
        raise
    finally:
        out.slowest = max(out.slowest, trio.current_time() - start)


async def load(
    pool: Pool,
    table: str,
    *,
    clients: int = 6,
    count: int = 20,
    pause: float = 0.0,
    fault: Callable[[], Awaitable[Any]] | None = None,
) -> Outcomes:
    """Run ``clients`` x ``count`` transactions, with ``fault()`` running beside them."""
    out = Outcomes()

    async def client(index: int) -> None:
        for _ in range(count):
            await transfer(pool, table, next(_tids), index, out)
            if pause:
                await trio.sleep(pause)

    async with trio.open_nursery() as nursery:
        if fault is not None:
            nursery.start_soon(fault)
        async with trio.open_nursery() as workers:
            for index in range(clients):
                workers.start_soon(client, index)
        nursery.cancel_scope.cancel()
    return out


async def check(
    dsn: str, pool: Pool, table: str, out: Outcomes, *, timeout: float = 30
) -> float:
    """The invariants of the module docstring (raises AssertionError naming the broken one);
    returns how long the pool took to get back to full size and idle after the load."""
    with psycopg.connect(dsn, autocommit=True) as c:
        ledger = [int(r[0]) for r in c.execute(f"select id from {table}_ledger").fetchall()]
        row = c.execute(f"select n from {table}_count").fetchone()
    seen = set(ledger)
    assert len(ledger) == len(seen), "a transaction was committed twice"
    assert out.committed <= seen, f"committed but missing: {sorted(out.committed - seen)[:10]}"
    assert not (out.failed & seen), f"failed but visible: {sorted(out.failed & seen)[:10]}"
    assert seen <= out.committed | out.uncertain, "a row nobody was told about"
    assert row is not None and row[0] == len(ledger), "counter and ledger disagree"
    size = pool.statistics().size
    start = trio.current_time()
    with trio.fail_after(timeout):
        while True:  # polls the pool's own statistics, bounded by the deadline
            stats = pool.statistics()
            if stats.idle == size == pool.min_size and stats.busy == 0:
                break
            await trio.sleep(0.02)
    recovered = trio.current_time() - start
    with psycopg.connect(dsn, autocommit=True) as c:
        stuck = c.execute(
            "select count(*) from pg_stat_activity where state like 'idle in transaction%%'"
            " and application_name = %s",
            (table,),
        ).fetchone()
    assert stuck is not None and stuck[0] == 0, "a session was left idle in transaction"
    outage = out.outage()
    cut = "n/a" if outage is None else f"{outage * 1000:.0f} ms"
    print(f"[matrix] {table}: clients cut off for {cut} (longest from an error to the next"
          f" commit); slowest transaction {out.slowest * 1000:.0f} ms;"
          f" full size {recovered * 1000:.0f} ms after the load;"
          f" clients saw {dict(sorted(out.errors.items()))}; the pool made"
          f" {stats.connects} connects, {stats.transaction_restarts} transaction restarts,"
          f" {stats.restarts} actor restarts")
    return recovered


def target(dsn: str, table: str) -> str:
    """``dsn`` with ``application_name`` set to the row's table name (to find its backends)."""
    return dsn + ("&" if "?" in dsn else "?") + f"application_name={table}"
