"""PostgreSQL, side by side with the peers: ``python tests/bench/bench_postgres.py [--quick]``.

A benchmark, not a test: it asserts nothing about timing and pytest does not collect it
(``tests/bench`` is in ``norecursedirs``). In one run, against one throwaway cluster it starts
itself (``supervisor.testing.cluster``; or the server of ``TCS_POSTGRES_DSN`` when set), over TCP
on 127.0.0.1, it measures:

* the baseline: a plain synchronous :class:`psycopg.Connection` (autocommit) running
  ``select 1`` in a loop, one round trip per operation; the same connection running the small
  transaction; and, for the concurrent cases, ``--size`` threads with one such connection each
  (no pool at all: the floor of what a pool could add);
* ours with ``PsycopgDriver(dsn, io="trio")`` and with ``io="thread"`` (the fallback), default
  pool options;
* psycopg's own pool, ``psycopg_pool.AsyncConnectionPool`` on asyncio, with autocommit
  connections (so ``select 1`` is one round trip, as in ours; its default would add ``BEGIN``
  and ``COMMIT`` around it);
* asyncpg's pool (``asyncpg.create_pool``) on asyncio, with its defaults.

Cases, each sequential (1 client: latency per operation) and concurrent (``--clients`` tasks on
a pool of ``--size`` connections: throughput):

* ``one-shot``: ``await pool.fetch_val("select 1")`` (asyncpg: ``pool.fetchval``; psycopg_pool
  has no one-shot API, see ``run``);
* ``run``: ``async with pool.run() as c: await c.fetch_val("select 1")`` (the peers'
  ``pool.connection()`` / ``pool.acquire()``);
* ``tx``: ``async with pool.transaction() as tx:`` an ``update`` of one row and a ``select`` of
  it (BEGIN, 2 statements, COMMIT: 4 round trips).

Method: each asynchronous implementation runs its own event loop (Trio or asyncio) in its own
thread, with its pool open for the whole run; only one implementation runs at a time (the others
wait, idle). After a warm-up of every case (psycopg prepares statements after 5 executions),
the rounds interleave finely: a *block* (``select 1``: one-shot and run; or ``tx``; sequential
or concurrent) measures the baseline and every implementation back to back (a time slice each,
bounded by a count too, in an order that rotates every round), so noise affects all alike; the
table shows medians over the rounds. Ratios are
time per operation over the baseline's (lower is better); for concurrent cases the time per
operation is the amortised one (1 / throughput). ``x sync same`` is paired: the median over the
rounds of the ratio to the sync row of the same block.

Each round also measures how much CPU other processes and the hypervisor (steal time) took
meanwhile (:class:`CpuMeter`), since that makes the numbers noisy.

``--profile IMPL:CASE`` (e.g. ``trio:one-shot``) runs one sequential case of ours under cProfile
instead and prints where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import importlib.metadata
import os
import platform
import pstats
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import trio
from psycopg.conninfo import conninfo_to_dict

from actors.psycopg import IoMode, PsycopgDriver
from supervisor import Pool, open_pool

SELECT_1 = "select 1"
TABLE = "tcs_bench_counter"
ROWS = 256  # client k updates row k % ROWS: no lock waits between concurrent clients
UPDATE = f"update {TABLE} set n = n + 1 where id = %s"
SELECT_N = f"select n from {TABLE} where id = %s"
UPDATE_DOLLAR = f"update {TABLE} set n = n + 1 where id = $1"  # asyncpg's placeholders
SELECT_N_DOLLAR = f"select n from {TABLE} where id = $1"

CASES = ("one-shot", "run", "tx")
MODES = ("seq", "conc")
Op = Callable[[int], Awaitable[Any]]


@dataclass(frozen=True)
class Settings:
    """How long and how hard to measure."""

    rounds: int
    slice: float  # seconds per measurement (one case, one implementation, one round)
    warmup: float  # seconds per case and mode of warm-up, once
    max_ops: int  # count bound of one measurement (the time slice usually ends it first)
    clients: int
    size: int


FULL = Settings(rounds=15, slice=0.1, warmup=0.15, max_ops=100_000, clients=50, size=10)
QUICK = Settings(rounds=5, slice=0.06, warmup=0.06, max_ops=100_000, clients=50, size=10)


# ----------------------------------------------------------------------------------------------
# Measurement loops (bounded by count and by time); they return microseconds per operation


def _seq_sync(op: Callable[[int], Any], seconds: float, cap: int) -> float:
    start = time.perf_counter()
    deadline = start + seconds
    n = 0
    while n < cap:
        op(0)
        n += 1
        if time.perf_counter() >= deadline:
            break
    return (time.perf_counter() - start) / n * 1e6


async def _seq_async(op: Op, seconds: float, cap: int) -> float:
    start = time.perf_counter()
    deadline = start + seconds
    n = 0
    while n < cap:
        await op(0)
        n += 1
        if time.perf_counter() >= deadline:
            break
    return (time.perf_counter() - start) / n * 1e6


async def _conc_trio(op: Op, clients: int, seconds: float, cap: int) -> float:
    count = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def client(k: int) -> None:
        nonlocal count
        while count < cap and time.perf_counter() < deadline:
            count += 1
            await op(k)

    async with trio.open_nursery() as nursery:
        for k in range(clients):
            nursery.start_soon(client, k)
    return (time.perf_counter() - start) / max(count, 1) * 1e6


async def _conc_asyncio(op: Op, clients: int, seconds: float, cap: int) -> float:
    count = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def client(k: int) -> None:
        nonlocal count
        while count < cap and time.perf_counter() < deadline:
            count += 1
            await op(k)

    async with asyncio.TaskGroup() as group:
        for k in range(clients):
            group.create_task(client(k))
    return (time.perf_counter() - start) / max(count, 1) * 1e6


def _conc_threads(ops: Sequence[Callable[[int], Any]], seconds: float, cap: int) -> float:
    """One OS thread per operation (each with its own synchronous connection)."""
    lock = threading.Lock()
    count = 0
    barrier = threading.Barrier(len(ops) + 1)
    deadline = 0.0

    def worker(k: int) -> None:
        nonlocal count
        op = ops[k]
        barrier.wait()
        while time.perf_counter() < deadline:
            with lock:
                if count >= cap:
                    return
                count += 1
            op(k)

    workers = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(len(ops))]
    for w in workers:
        w.start()
    start = time.perf_counter()
    deadline = start + seconds
    barrier.wait()
    for w in workers:
        w.join(timeout=seconds + 30)
    return (time.perf_counter() - start) / max(count, 1) * 1e6


# ----------------------------------------------------------------------------------------------
# The implementations under test ("subjects")


class Subject:
    """One implementation: ``start()`` opens it (connections, warm-up), ``measure()`` runs one
    case for a time slice and returns microseconds per operation, ``stop()`` closes it."""

    key = ""
    label = ""
    cases: tuple[str, ...] = CASES

    def start(self, s: Settings) -> None:
        raise NotImplementedError

    def measure(self, mode: str, case: str, seconds: float) -> float:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class _SyncClient:
    """One plain synchronous psycopg connection (autocommit) and the baseline operations."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)

    def select_1(self, _: int) -> Any:
        return self.conn.execute(SELECT_1).fetchone()

    def tx(self, k: int) -> Any:
        conn = self.conn
        with conn.transaction():
            conn.execute(UPDATE, (k % ROWS,))
            return conn.execute(SELECT_N, (k % ROWS,)).fetchone()


class SyncSubject(Subject):
    """The baseline, run in the calling thread (the concurrent cases: one thread per
    connection). Its ``one-shot`` and ``run`` are the same ``select 1``."""

    key = "sync"
    label = "sync psycopg (baseline)"
    cases = ("run", "tx")  # "run" is plain select 1; it stands for one-shot too

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._clients: list[_SyncClient] = []
        self._cap = 0

    def start(self, s: Settings) -> None:
        self._cap = s.max_ops
        self._clients = [_SyncClient(self._dsn) for _ in range(s.size)]
        for mode in MODES:
            for case in ("run", "tx"):
                self.measure(mode, case, s.warmup)

    def measure(self, mode: str, case: str, seconds: float) -> float:
        pick = _SyncClient.tx if case == "tx" else _SyncClient.select_1
        gc.collect()
        if mode == "seq":
            client = self._clients[0]
            return _seq_sync(lambda k: pick(client, k), seconds, self._cap)
        ops = [(lambda k, c=c: pick(c, k)) for c in self._clients]
        return _conc_threads(ops, seconds, self._cap)

    def stop(self) -> None:
        for client in self._clients:
            client.conn.close()


class _LoopSubject(Subject):
    """An implementation that lives in its own thread, in its own event loop, pool open."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._settings = QUICK
        self._ops: dict[str, Op] = {}

    def start(self, s: Settings) -> None:
        self._settings = s
        self._thread = threading.Thread(target=self._thread_main, name=self.key, daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError(f"{self.label}: did not start within 60 s")
        if self._error is not None:
            raise RuntimeError(f"{self.label}: failed to start: {self._error!r}") from self._error
        for mode in MODES:
            for case in self.cases:
                self.measure(mode, case, s.warmup)

    def _thread_main(self) -> None:
        try:
            self._loop_main()
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _measure(self, mode: str, case: str, seconds: float) -> float:
        s = self._settings
        op = self._ops[case]
        gc.collect()
        if mode == "seq":
            return await _seq_async(op, seconds, s.max_ops)
        return await self._conc(op, s.clients, seconds, s.max_ops)

    def serve(self) -> contextlib.AbstractAsyncContextManager[dict[str, Op]]:
        """Open the pool; yield the operations by case name; close it."""
        raise NotImplementedError

    def _loop_main(self) -> None:
        raise NotImplementedError

    async def _conc(self, op: Op, clients: int, seconds: float, cap: int) -> float:
        raise NotImplementedError


class _TrioSubject(_LoopSubject):
    """Runs ``serve()`` in ``trio.run`` in its own thread."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None

    def _loop_main(self) -> None:
        async def main() -> None:
            async with self.serve() as ops:
                self._ops = ops
                self._token = trio.lowlevel.current_trio_token()
                self._stop = trio.Event()
                self._ready.set()
                await self._stop.wait()

        trio.run(main)

    async def _conc(self, op: Op, clients: int, seconds: float, cap: int) -> float:
        return await _conc_trio(op, clients, seconds, cap)

    def measure(self, mode: str, case: str, seconds: float) -> float:
        return trio.from_thread.run(self._measure, mode, case, seconds, trio_token=self._token)

    def stop(self) -> None:
        if self._stop is not None and self._thread is not None:
            with contextlib.suppress(trio.RunFinishedError):  # the loop already ended (failed)
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(30)


class _AsyncioSubject(_LoopSubject):
    """Runs ``serve()`` in ``asyncio.run`` in its own thread."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def _loop_main(self) -> None:
        async def main() -> None:
            async with self.serve() as ops:
                self._ops = ops
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                self._ready.set()
                await self._stop.wait()

        asyncio.run(main())

    async def _conc(self, op: Op, clients: int, seconds: float, cap: int) -> float:
        return await _conc_asyncio(op, clients, seconds, cap)

    def _call(self, coro: Coroutine[Any, Any, float]) -> float:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=120)

    def measure(self, mode: str, case: str, seconds: float) -> float:
        return self._call(self._measure(mode, case, seconds))

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended (failed)
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)


async def _wait_ready(pool: Pool, size: int, timeout: float = 30.0) -> None:
    """Until every connection of the pool is connected (the pool has no event for it)."""
    with trio.fail_after(timeout):
        while pool.statistics().idle < size:  # noqa: ASYNC110 - polling a statistic, bounded
            await trio.sleep(0.005)


def _ours_ops(pool: Pool) -> dict[str, Op]:
    async def one_shot(_: int) -> Any:
        return await pool.fetch_val(SELECT_1)

    async def run(_: int) -> Any:
        async with pool.run() as conn:
            return await conn.fetch_val(SELECT_1)

    async def tx(k: int) -> Any:
        async with pool.transaction() as t:
            await t.execute(UPDATE, (k % ROWS,))
            return await t.fetch_val(SELECT_N, (k % ROWS,))

    return {"one-shot": one_shot, "run": run, "tx": tx}


class OursSubject(_TrioSubject):
    """Ours: ``open_pool(PsycopgDriver(dsn, io=...), size=...)``, default options."""

    def __init__(self, dsn: str, io: IoMode) -> None:
        super().__init__(dsn)
        self.io: IoMode = io
        self.key = io
        self.label = f"ours, io={io}"

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[dict[str, Op]]:
        size = self._settings.size
        driver = PsycopgDriver(self._dsn, io=self.io)
        async with open_pool(driver, size=size, name=f"bench-{self.io}") as pool:
            await _wait_ready(pool, size)
            yield _ours_ops(pool)


class PsycopgPoolSubject(_AsyncioSubject):
    """psycopg_pool.AsyncConnectionPool with autocommit connections."""

    key = "psycopg_pool"
    label = "psycopg_pool, asyncio"
    cases = ("run", "tx")  # no one-shot API

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[dict[str, Op]]:
        from psycopg_pool import AsyncConnectionPool

        size = self._settings.size
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self._dsn,
            min_size=size,
            max_size=size,
            kwargs={"autocommit": True},
            open=False,
            name="bench-psycopg-pool",
        )
        await pool.open(wait=True, timeout=30.0)
        try:

            async def run(_: int) -> Any:
                async with pool.connection() as conn:
                    cur = await conn.execute(SELECT_1)
                    return await cur.fetchone()

            async def tx(k: int) -> Any:
                async with pool.connection() as conn, conn.transaction():
                    await conn.execute(UPDATE, (k % ROWS,))
                    cur = await conn.execute(SELECT_N, (k % ROWS,))
                    return await cur.fetchone()

            yield {"run": run, "tx": tx}
        finally:
            await pool.close()


def _asyncpg_connect_args(dsn: str) -> tuple[str | None, dict[str, Any]]:
    """asyncpg takes URLs; a key=value connection string becomes keyword arguments."""
    if dsn.startswith(("postgresql://", "postgres://")):
        return dsn, {}
    params = conninfo_to_dict(dsn)
    names = {"host": "host", "port": "port", "user": "user", "password": "password",
             "dbname": "database"}
    kwargs = {names[k]: v for k, v in params.items() if k in names}
    if "port" in kwargs:
        kwargs["port"] = int(str(kwargs["port"]))
    return None, kwargs


class AsyncpgSubject(_AsyncioSubject):
    """asyncpg.create_pool with its defaults (including its reset query on every release)."""

    key = "asyncpg"
    label = "asyncpg pool, asyncio"

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[dict[str, Op]]:
        import asyncpg  # type: ignore[import-untyped]

        size = self._settings.size
        url, kwargs = _asyncpg_connect_args(self._dsn)
        pool = await asyncpg.create_pool(url, min_size=size, max_size=size, **kwargs)
        try:

            async def one_shot(_: int) -> Any:
                return await pool.fetchval(SELECT_1)

            async def run(_: int) -> Any:
                async with pool.acquire() as conn:
                    return await conn.fetchval(SELECT_1)

            async def tx(k: int) -> Any:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute(UPDATE_DOLLAR, k % ROWS)
                    return await conn.fetchval(SELECT_N_DOLLAR, k % ROWS)

            yield {"one-shot": one_shot, "run": run, "tx": tx}
        finally:
            await pool.close()


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def subjects(dsn: str) -> tuple[list[Subject], list[str]]:
    """Everything that can run here (the baseline first), and the peers skipped."""
    found: list[Subject] = [SyncSubject(dsn), OursSubject(dsn, "trio"), OursSubject(dsn, "thread")]
    skipped: list[str] = []
    if _installed("psycopg_pool"):
        found.append(PsycopgPoolSubject(dsn))
    else:
        skipped.append("psycopg_pool (pip install psycopg-pool)")
    if _installed("asyncpg"):
        found.append(AsyncpgSubject(dsn))
    else:
        skipped.append("asyncpg (pip install asyncpg)")
    return found, skipped


# ----------------------------------------------------------------------------------------------
# Server, noise, facts, report


@contextlib.contextmanager
def server() -> Iterator[tuple[str, str, int | None]]:
    """(dsn, where, postmaster pid): TCS_POSTGRES_DSN (pid unknown), else a throwaway cluster
    started here."""
    dsn = os.environ.get("TCS_POSTGRES_DSN")
    if dsn:
        yield dsn, "TCS_POSTGRES_DSN", None
        return
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.postgres.cluster import running_cluster

    with running_cluster() as cluster:
        try:
            pid: int | None = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        yield cluster.dsn, "a throwaway cluster (tests/postgres/cluster.py), TCP 127.0.0.1", pid


@contextlib.contextmanager
def bench_table(dsn: str) -> Iterator[str]:
    """Create the counter table the transaction case updates, drop it at the end; yield the
    server version."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"drop table if exists {TABLE}")
        conn.execute(f"create table {TABLE} (id int primary key, n bigint not null)")
        conn.execute(f"insert into {TABLE} select g, 0 from generate_series(0, {ROWS - 1}) g")
        version = str(conn.execute("show server_version").fetchone()[0])  # type: ignore[index]
    try:
        yield version
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"drop table if exists {TABLE}")


class CpuMeter:
    """How much CPU others took from the machine while we measured.

    Foreign CPU = the machine's busy CPU (``/proc/stat``: user, nice, system, and steal, the
    time the hypervisor gave our virtual CPUs to someone else) minus this process (all threads)
    minus the cluster we started (the postmaster, its live children, its reaped children).
    Interrupt time is left out of both sides. Linux only, and only with our own cluster (a
    server of ``TCS_POSTGRES_DSN`` may be local: its CPU cannot be told apart); otherwise
    :meth:`foreign` returns None.
    """

    def __init__(self, postmaster: int | None) -> None:
        self._pm = postmaster
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._snapshot()
        self._since = time.perf_counter()

    def _snapshot(self) -> tuple[float, float, float] | None:
        if self._pm is None:
            return None
        try:
            with open("/proc/stat") as fh:
                fields = [int(x) for x in fh.readline().split()[1:]]
            busy = fields[0] + fields[1] + fields[2] + (fields[7] if len(fields) > 7 else 0)
            cluster = 0
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry.name}/stat") as fh:
                        stat = fh.read()
                except OSError:
                    continue  # gone meanwhile
                rest = stat.rsplit(")", 1)[1].split()
                pid, ppid = int(entry.name), int(rest[1])
                if pid == self._pm:
                    cluster += sum(int(x) for x in rest[11:15])  # utime stime cutime cstime
                elif ppid == self._pm:
                    cluster += int(rest[11]) + int(rest[12])
        except (OSError, ValueError, IndexError):
            return None
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        return busy / self._tick, ours, cluster / self._tick

    def foreign(self) -> float | None:
        """Foreign CPU since the last call, in cores (0.5 = half a core on average)."""
        now, wall = self._snapshot(), time.perf_counter()
        (last, self._last), (since, self._since) = (self._last, now), (self._since, wall)
        if now is None or last is None or wall <= since:
            return None
        busy, ours, cluster = (a - b for a, b in zip(now, last, strict=True))
        return max(0.0, busy - ours - cluster) / (wall - since)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def facts(server_version: str, where: str, s: Settings) -> list[str]:
    """The machine and the versions, for the header of the report."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lib = psycopg.pq.version()
    return [
        f"machine: {os.cpu_count()} cores ({usable} usable), {_cpu_model()}, "
        f"{platform.system()} {platform.release()}",
        f"python {platform.python_version()} ({platform.python_implementation()}), "
        f"trio {_version('trio')}, psycopg {_version('psycopg')} ({psycopg.pq.__impl__}, "
        f"libpq {lib // 10000}.{lib % 100}), psycopg_pool {_version('psycopg-pool')}, "
        f"asyncpg {_version('asyncpg')}, asyncio loop: standard",
        f"server: PostgreSQL {server_version}, {where}",
        "load average before the run: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        f"method: {s.rounds} rounds of interleaved blocks, {s.slice:g} s per case, "
        f"implementation and round, medians; concurrent = {s.clients} client tasks on a pool "
        f"of {s.size} connections (baseline: {s.size} threads, one sync connection each)",
    ]


Samples = dict[tuple[str, str, str], list[float]]  # (subject key, mode, case) -> us per round


def _ratio(samples: Samples, key: tuple[str, str, str], ref: tuple[str, str, str]) -> float:
    """Median over the rounds of the per-round ratio (the two measured in the same block)."""
    pairs = zip(samples[key], samples[ref], strict=False)
    return statistics.median(a / b for a, b in pairs)


def report(samples: Samples, found: list[Subject], threads: int) -> str:
    """The table: one section per mode and case, one row per implementation."""
    floor = statistics.median(samples[("sync", "seq", "run")])
    rows: list[tuple[str, ...]] = []
    for mode in MODES:
        for case in CASES:
            ref = ("sync", mode, case)
            for subject in found:
                label = f"{mode} {case}"
                who = subject.label
                if subject.key == "sync":
                    if case == "run":
                        continue  # shown once, as the first row of the select 1 block
                    label = f"{mode} {'tx' if case == 'tx' else 'select 1'}"
                    if mode == "conc":
                        who = f"sync psycopg, {threads} threads"
                key = (subject.key, mode, case)
                values = samples.get(key)
                if not values:
                    rows.append((label, who, "n/a", "", "", "", "", ""))
                    continue
                us = statistics.median(values)
                spread = (max(values) - min(values)) / us * 100
                rows.append(
                    (
                        label,
                        who,
                        f"{us:.1f}",
                        f"{1e6 / us:,.0f}",
                        f"{us / floor:.2f}",
                        f"{_ratio(samples, key, ref):.2f}",
                        f"{min(values):.1f}",
                        f"{spread:.0f}%",
                    )
                )
    header = (
        "case", "implementation", "us/op", "ops/s", "x select 1", "x sync same", "best", "spread"
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)

    def line(r: tuple[str, ...]) -> str:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:], strict=True)]
        return "  ".join(cells).rstrip()

    return "\n".join([rule, line(header), rule, *(line(r) for r in rows), rule])


# ----------------------------------------------------------------------------------------------
# Profiling one case


def profile(dsn: str, target: str, seconds: float) -> None:
    """Run one sequential case of ours under cProfile and print the top of it."""
    key, _, case = target.partition(":")
    if key not in ("trio", "thread") or case not in CASES:
        raise SystemExit(f"--profile takes trio|thread:{'|'.join(CASES)}, not {target!r}")
    io: IoMode = "trio" if key == "trio" else "thread"
    s = FULL

    async def main() -> tuple[cProfile.Profile, float]:
        async with open_pool(PsycopgDriver(dsn, io=io), size=s.size, name="profile") as pool:
            await _wait_ready(pool, s.size)
            op = _ours_ops(pool)[case]
            await _seq_async(op, 0.5, s.max_ops)
            prof = cProfile.Profile()
            prof.enable()
            us = await _seq_async(op, seconds, s.max_ops)
            prof.disable()
            return prof, us

    prof, us = trio.run(main)
    print(f"profile of {target}: {us:.1f} us/op under cProfile (inflated by the profiler)")
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


# ----------------------------------------------------------------------------------------------


def run_rounds(found: list[Subject], s: Settings, meter: CpuMeter) -> tuple[Samples, list[float]]:
    """The measured rounds: per round, one block per mode and kind of case (``select 1``:
    one-shot and run; ``tx``); within a block every implementation and case back to back, in
    an order that rotates every round. Returns the samples and, per round, the
    foreign CPU in cores (NaN when unknown)."""
    samples: Samples = {}
    noise: list[float] = []
    started = time.perf_counter()
    meter.foreign()
    for r in range(s.rounds):
        for mode in MODES:
            for kinds in (("one-shot", "run"), ("tx",)):
                block = [(sub, case) for sub in found for case in kinds if case in sub.cases]
                shift = r % len(block)
                for subject, case in block[shift:] + block[:shift]:
                    us = subject.measure(mode, case, s.slice)
                    samples.setdefault((subject.key, mode, case), []).append(us)
        foreign = meter.foreign()
        noise.append(float("nan") if foreign is None else foreign)
        other = "unknown" if foreign is None else f"{foreign:.0%} of a core"
        print(
            f"round {r + 1}/{s.rounds} done ({time.perf_counter() - started:.0f} s); "
            f"other processes and the hypervisor took {other}",
            file=sys.stderr,
        )
    # The baseline's select 1 stands for one-shot too (same block position as run).
    for mode in MODES:
        samples[("sync", mode, "one-shot")] = samples[("sync", mode, "run")]
    return samples, noise


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table (exit status 0)."""
    parser = argparse.ArgumentParser(
        prog="bench_postgres.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="~15 s instead of ~60 s")
    parser.add_argument("--rounds", type=int, help="rounds (medians over them)")
    parser.add_argument("--clients", type=int, help="concurrent client tasks (default 50)")
    parser.add_argument("--size", type=int, help="pool size (default 10)")
    parser.add_argument(
        "--samples", action="store_true", help="also print every round's us/op per case"
    )
    parser.add_argument(
        "--profile", metavar="IMPL:CASE", help="cProfile one sequential case, e.g. trio:one-shot"
    )
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    s = Settings(
        rounds=args.rounds or s.rounds,
        slice=s.slice,
        warmup=s.warmup,
        max_ops=s.max_ops,
        clients=args.clients or s.clients,
        size=args.size or s.size,
    )
    if min(s.rounds, s.clients, s.size) < 1:
        parser.error("--rounds, --clients and --size must be >= 1")

    started = time.perf_counter()
    with server() as (dsn, where, postmaster), bench_table(dsn) as version:
        if args.profile:
            profile(dsn, args.profile, 3.0)
            return 0
        for line in facts(version, where, s):
            print(line)
        found, skipped = subjects(dsn)
        for name in skipped:
            print(f"skipped {name}: not installed")
        sys.stdout.flush()
        opened: list[Subject] = []
        try:
            for subject in found:
                subject.start(s)  # connects and warms up
                opened.append(subject)
            print(f"connected and warmed up ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr)
            samples, noise = run_rounds(found, s, CpuMeter(postmaster))
        finally:
            for subject in reversed(opened):
                subject.stop()
    if args.samples:
        print()
        print(f"{'':<28}" + " ".join(f"{'r' + str(i + 1):>6}" for i in range(s.rounds)))
        print(f"{'others took (cores)':<28}" + " ".join(f"{n:6.2f}" for n in noise))
        for (key, mode, case), values in samples.items():
            if key == "sync" and case == "one-shot":
                continue  # the same list as its "run" (select 1)
            print(f"{key:>12} {mode:<4} {case:<10}" + " ".join(f"{v:6.0f}" for v in values))
    print()
    print(report(samples, found, s.size))
    print()
    print(
        "us/op: median per operation (concurrent: amortised, 1 / throughput); ratios: time per "
        "operation over the baseline's, lower is better; x select 1: over the sequential sync "
        "select 1; x sync same: median of the per-round ratios to the sync row of the same "
        "section; best: the fastest round; spread: (max - min) / median over the rounds"
    )
    known = [n for n in noise if n == n]
    if known:
        print(
            "other processes and the hypervisor took "
            f"{statistics.median(known):.0%} of a core per round in the median "
            f"(max {max(known):.0%}); above ~10% expect noisy numbers"
        )
    print(
        f"total {time.perf_counter() - started:.0f} s; load average after the run: "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
