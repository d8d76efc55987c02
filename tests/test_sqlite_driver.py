"""The SQLite driver on real database files (pytest's tmp_path) and the shared in-memory database.

No sleeps as synchronisation: worker threads report through Trio events (progress handler,
``trio.from_thread``) and ``trio.testing.wait_all_tasks_blocked``. No autojump clock (real threads).
"""

from __future__ import annotations

import gc
import sqlite3
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from sqlite_helpers import SLOW_QUERY, arm_started_event, disarm, make_table_sql, raw_count

from actors.driver import (
    Connection,
    ConnectionLost,
    Cursor,
    DatabaseError,
    Driver,
    Misconfigured,
    TransactionOptions,
)
from actors.sqlite import SqliteConnection, SqliteDriver, classify, from_url

TX = TransactionOptions()


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "test.db")


@pytest.fixture
async def driver(db_path: str) -> SqliteDriver:
    return SqliteDriver(db_path, timeout=0.2)


@pytest.fixture
async def conn(driver: SqliteDriver) -> AsyncIterator[SqliteConnection]:
    c = await driver.connect(driver.options)
    await c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
    yield c
    await c.close()


async def other(driver: SqliteDriver) -> SqliteConnection:
    return await driver.connect(driver.options)


# -- URLs, options, protocol conformance ------------------------------------------------------


def test_from_url_relative_absolute_memory(tmp_path: Path) -> None:
    assert from_url("sqlite:///data/app.db").options["path"] == "data/app.db"
    assert from_url(f"sqlite:///{tmp_path}/x.db").options["path"] == f"{tmp_path}/x.db"
    assert from_url("sqlite:////abs/path.db").options["path"] == "/abs/path.db"
    assert from_url("sqlite:///with%20space.db").options["path"] == "with space.db"
    memory = from_url("sqlite://:memory:")
    assert memory.is_memory and memory.path == ":memory:"
    tuned = from_url("sqlite:///a.db?timeout=0.5&wal=off")
    assert tuned.options["timeout"] == 0.5 and tuned.options["wal"] is False


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://localhost/db",
        "sqlite:/x.db",
        "sqlite://",
        "sqlite:///",
        "sqlite://host/x.db",
        "sqlite:///dir/",
        "sqlite:///a.db?timeout=soon",
        "sqlite:///a.db?wal=maybe",
        "sqlite:///a.db?colour=blue",
        "sqlite:///a.db?timeout",
    ],
)
def test_from_url_rejects_malformed(url: str) -> None:
    with pytest.raises(ValueError, match=r"SQLite URL|sqlite"):
        from_url(url)


def test_driver_surface(db_path: str) -> None:
    d = SqliteDriver(db_path, timeout=1.5, cached_statements=64)
    assert isinstance(d, Driver)
    assert d.name == "sqlite"
    assert d.options["path"] == db_path and d.options["timeout"] == 1.5
    assert d.options["cached_statements"] == 64
    assert d.secrets(d.options) == []
    assert db_path in repr(d) and "timeout=1.5" in repr(d)
    with pytest.raises(TypeError):
        d.options["path"] = "elsewhere"  # type: ignore[index]
    with pytest.raises(ValueError, match="isolation_level"):
        SqliteDriver(db_path, isolation_level="DEFERRED")
    with pytest.raises(ValueError, match="timeout"):
        SqliteDriver(db_path, timeout=-1)


async def test_connection_satisfies_protocol(conn: SqliteConnection) -> None:
    assert isinstance(conn, Connection)
    cursor = await conn.open_cursor("SELECT 1", None, 10)
    assert isinstance(cursor, Cursor)
    await cursor.close()


async def test_file_database_pragmas(driver: SqliteDriver, conn: SqliteConnection) -> None:
    assert await conn.fetch("PRAGMA journal_mode") == [("wal",)]
    assert await conn.fetch("PRAGMA foreign_keys") == [(1,)]
    # SQLite waits in 50 ms slices; the driver enforces the 0.2 s total (see the busy tests).
    assert await conn.fetch("PRAGMA busy_timeout") == [(50,)]
    no_wal = SqliteDriver(str(driver.options["path"]) + "-2", wal=False)
    c = await no_wal.connect(no_wal.options)
    assert await c.fetch("PRAGMA journal_mode") == [("delete",)]
    await c.close()


async def test_setup_hook_runs_on_each_connection(db_path: str) -> None:
    def setup(raw: sqlite3.Connection) -> None:
        raw.create_function("double", 1, lambda x: 2 * x)

    d = SqliteDriver(db_path, setup=setup)
    c = await d.connect(d.options)
    assert await c.fetch("SELECT double(21)") == [(42,)]
    await c.close()


async def test_a_missing_directory_is_misconfigured_and_a_bad_file_is_connection_lost(
    tmp_path: Path,
) -> None:
    missing_dir = SqliteDriver(str(tmp_path / "no" / "such" / "dir.db"))
    with pytest.raises(Misconfigured) as info:
        await missing_dir.connect(missing_dir.options)
    assert str(info.value) == (
        f"sqlite: cannot open database file {str(tmp_path / 'no' / 'such' / 'dir.db')!r}: "
        f"directory {str(tmp_path / 'no' / 'such')!r} does not exist"
    )
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an sqlite database, just bytes" * 100)
    not_db = SqliteDriver(str(garbage))
    with pytest.raises(ConnectionLost, match="SQLITE_NOTADB"):
        await not_db.connect(not_db.options)


# -- statements and parameters ---------------------------------------------------------------


class _Params(Mapping[str, Any]):
    """A Mapping that is not a dict (sqlite3 alone would refuse it)."""

    def __init__(self, **values: Any) -> None:
        self._values = values

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


async def test_execute_fetch_and_params(conn: SqliteConnection) -> None:
    assert await conn.execute("INSERT INTO t (name) VALUES (?)", ("a",)) == 1
    assert await conn.execute("INSERT INTO t (name) VALUES (:n)", {"n": "b"}) == 1
    assert await conn.execute("INSERT INTO t (name) VALUES (:n)", _Params(n="c")) == 1
    assert await conn.execute("INSERT INTO t (name) VALUES (?)", ["d"]) == 1
    assert await conn.execute("UPDATE t SET name = upper(name) WHERE id > ?", (2,)) == 2
    assert await conn.fetch("SELECT name FROM t ORDER BY id") == [("a",), ("b",), ("C",), ("D",)]
    assert await conn.execute("CREATE TABLE u (x)") == -1
    # A string is a sequence of characters: refusing it beats binding "a", "b", ...
    with pytest.raises(DatabaseError, match="sequence or a mapping"):
        await conn.fetch("SELECT ?, ?", "ab")
    with pytest.raises(DatabaseError, match="bindings") as info:
        await conn.fetch("SELECT ?, ?", (1,))
    assert info.value.kind == "other"
    with pytest.raises(DatabaseError):
        await conn.execute("INSERT INTO t (name) VALUES (?)", (2**70,))  # OverflowError
    await conn.prepare("SELECT 1")  # no-op, must not fail
    assert await conn.fetch("SELECT count(*) FROM t") == [(4,)]
    assert conn.status() == "idle"


async def test_integrity_errors_keep_connection_usable(conn: SqliteConnection) -> None:
    await conn.execute("CREATE TABLE child (id INTEGER PRIMARY KEY, t_id REFERENCES t(id))")
    await conn.execute("INSERT INTO t (id, name) VALUES (1, 'a')")
    await conn.begin(TX)
    await conn.execute("INSERT INTO t (id, name) VALUES (2, 'b')")
    cases = [
        ("INSERT INTO t (id, name) VALUES (1, 'dup')", "UNIQUE"),
        ("INSERT INTO t (id, name) VALUES (3, NULL)", "NOT NULL"),
        ("INSERT INTO child (t_id) VALUES (99)", "FOREIGN KEY"),
    ]
    for sql, words in cases:
        with pytest.raises(DatabaseError, match=words) as info:
            await conn.execute(sql)
        assert info.value.kind == "integrity"
        assert info.value.sqlstate is None
        assert isinstance(info.value.__cause__, sqlite3.IntegrityError)
        assert "SQLITE_CONSTRAINT" in info.value.message
        # Statement-level rollback only: the transaction is still open and usable.
        assert conn.status() == "transaction"
    await conn.commit()
    assert await conn.fetch("SELECT id FROM t ORDER BY id") == [(1,), (2,)]


async def test_syntax_and_missing_table_are_other(conn: SqliteConnection) -> None:
    for sql in ("SELEC 1", "SELECT * FROM nowhere"):
        with pytest.raises(DatabaseError) as info:
            await conn.fetch(sql)
        assert info.value.kind == "other"
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert await conn.fetch("SELECT 1") == [(1,)]


def test_classify_mapping() -> None:
    def op_error(msg: str, code: int) -> sqlite3.OperationalError:
        exc = sqlite3.OperationalError(msg)
        exc.sqlite_errorcode = code
        exc.sqlite_errorname = "X"
        return exc

    busy = classify(op_error("database is locked", 5))
    assert isinstance(busy, DatabaseError) and busy.kind == "serialization"
    snapshot = classify(op_error("database is locked", 5 | (2 << 8)))  # SQLITE_BUSY_SNAPSHOT
    assert isinstance(snapshot, DatabaseError) and snapshot.kind == "serialization"
    table = classify(op_error("database table is locked", 6))
    assert isinstance(table, DatabaseError) and table.kind == "serialization"
    assert isinstance(classify(op_error("disk I/O error", 10 | (3 << 8))), ConnectionLost)
    assert isinstance(
        classify(sqlite3.ProgrammingError("Cannot operate on a closed database.")), ConnectionLost
    )
    other = classify(op_error("no such table: x", 1))
    assert isinstance(other, DatabaseError) and other.kind == "other"


# -- transactions and savepoints --------------------------------------------------------------


async def test_commit_and_rollback_seen_by_another_connection(
    driver: SqliteDriver, conn: SqliteConnection, db_path: str
) -> None:
    reader = await other(driver)
    await conn.begin(TX)
    assert conn.status() == "transaction"
    await conn.execute("INSERT INTO t (name) VALUES ('kept')")
    assert await reader.fetch("SELECT count(*) FROM t") == [(0,)]  # not committed yet
    await conn.commit()
    assert conn.status() == "idle"
    assert await reader.fetch("SELECT name FROM t") == [("kept",)]

    await conn.begin(TransactionOptions(mode="deferred"))
    await conn.execute("INSERT INTO t (name) VALUES ('dropped')")
    await conn.rollback()
    assert conn.status() == "idle"
    await conn.rollback()  # nothing open: a no-op, not an error
    assert raw_count(db_path, "t") == 1
    await reader.close()


@pytest.mark.parametrize("mode", [None, "deferred", "immediate", "exclusive"])
async def test_begin_modes(conn: SqliteConnection, mode: str | None) -> None:
    await conn.begin(TransactionOptions(mode=mode, isolation="serializable"))
    assert conn.status() == "transaction"
    await conn.execute("INSERT INTO t (name) VALUES ('x')")
    await conn.commit()
    assert await conn.fetch("SELECT count(*) FROM t") == [(1,)]


async def test_begin_rejects_unsupported_options_without_io(conn: SqliteConnection) -> None:
    with pytest.raises(ValueError, match="mode"):
        await conn.begin(TransactionOptions(mode="concurrent"))
    with pytest.raises(ValueError, match="always serializable"):
        await conn.begin(TransactionOptions(isolation="read committed"))
    assert conn.status() == "idle"
    await conn.begin(TransactionOptions(isolation="SERIALIZABLE"))
    with pytest.raises(DatabaseError, match="within a transaction"):
        await conn.begin(TX)
    await conn.rollback()


async def test_read_only_transaction_uses_query_only(conn: SqliteConnection) -> None:
    for n, end in enumerate(("commit", "rollback")):
        await conn.begin(TransactionOptions(read_only=True))
        assert await conn.fetch("SELECT count(*) FROM t") == [(n,)]
        with pytest.raises(DatabaseError, match="readonly") as info:
            await conn.execute("INSERT INTO t (name) VALUES ('no')")
        assert info.value.kind == "other"
        await (conn.commit() if end == "commit" else conn.rollback())
        assert await conn.fetch("PRAGMA query_only") == [(0,)]
        assert await conn.execute("INSERT INTO t (name) VALUES ('yes')") == 1
    # reset() also ends a read-only transaction and restores writes
    await conn.begin(TransactionOptions(read_only=True))
    await conn.reset()
    assert await conn.execute("INSERT INTO t (name) VALUES ('after reset')") == 1


async def test_savepoints(conn: SqliteConnection, db_path: str) -> None:
    await conn.begin(TX)
    await conn.execute("INSERT INTO t (name) VALUES ('outer')")
    await conn.savepoint("sp_1")
    await conn.execute("INSERT INTO t (name) VALUES ('undone')")
    await conn.rollback_to("sp_1")
    # The savepoint survives ROLLBACK TO: work after it can be released.
    await conn.execute("INSERT INTO t (name) VALUES ('inner')")
    await conn.savepoint("sp_2")
    await conn.execute("INSERT INTO t (name) VALUES ('nested')")
    await conn.release("sp_2")
    await conn.release("sp_1")
    assert conn.status() == "transaction"
    await conn.commit()
    assert await conn.fetch("SELECT name FROM t ORDER BY id") == [
        ("outer",),
        ("inner",),
        ("nested",),
    ]
    with pytest.raises(DatabaseError, match="no such savepoint"):
        await conn.release("never_made")
    for bad in ("x; DROP TABLE t", "1abc", "", 'a"b'):
        with pytest.raises(ValueError, match="identifier"):
            await conn.savepoint(bad)
    assert raw_count(db_path, "t") == 3


# -- busy / locking ----------------------------------------------------------------------------


async def test_busy_is_serialization_and_fast(driver: SqliteDriver, conn: SqliteConnection) -> None:
    """One connection holds BEGIN IMMEDIATE; the other's write fails after the busy timeout
    (0.2 s here) with kind="serialization", and succeeds once the lock is gone."""
    second = await other(driver)
    await conn.begin(TransactionOptions(mode="immediate"))
    await conn.execute("INSERT INTO t (name) VALUES ('holder')")

    start = time.perf_counter()
    with pytest.raises(DatabaseError, match="locked") as info:
        await second.execute("INSERT INTO t (name) VALUES ('loser')")
    waited = time.perf_counter() - start
    assert info.value.kind == "serialization"
    assert "SQLITE_BUSY" in info.value.message
    assert 0.15 <= waited < 2.0, waited
    with pytest.raises(DatabaseError) as info2:
        await second.begin(TransactionOptions(mode="immediate"))
    assert info2.value.kind == "serialization"
    assert second.status() == "idle"
    # WAL: the reader is not blocked by the writer and sees the committed state.
    assert await second.fetch("SELECT count(*) FROM t") == [(0,)]

    await conn.commit()
    assert await second.execute("INSERT INTO t (name) VALUES ('winner')") == 1
    assert await second.fetch("SELECT count(*) FROM t") == [(2,)]
    await second.close()


async def test_cancelled_lock_waiter_frees_connection_quickly(db_path: str) -> None:
    """SQLite's busy wait cannot be interrupted; the driver waits in 50 ms slices, so a client
    cancelled while waiting for a lock held by another process (busy timeout 30 s here) does not
    pin its connection."""
    d = SqliteDriver(db_path, timeout=30.0)
    waiter = await d.connect(d.options)
    other_process = sqlite3.connect(db_path, isolation_level=None)  # not gated: SQLite locks only
    other_process.execute("BEGIN IMMEDIATE")
    begun = trio.Event()
    token = trio.lowlevel.current_trio_token()
    waiter.raw.set_trace_callback(
        lambda sql: token.run_sync_soon(begun.set) if "IMMEDIATE" in sql else None
    )
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def client() -> None:
            with scope:
                await waiter.begin(TransactionOptions(mode="immediate"))

        nursery.start_soon(client)
        await begun.wait()  # BEGIN IMMEDIATE is running: it is waiting for the lock
        scope.cancel()
    assert waiter.status() == "unknown"
    start = time.perf_counter()
    with trio.fail_after(2):
        await waiter.cancel()
        await waiter.reset()
    freed = time.perf_counter() - start
    print(f"\nlock waiter freed {freed * 1e3:.1f} ms after cancel (busy timeout 30 s)")
    assert freed < 0.5
    waiter.raw.set_trace_callback(None)
    assert waiter.status() == "idle"
    # A waiter that is not cancelled still waits for the lock and gets it.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter.begin, TransactionOptions(mode="immediate"))
        await begun.wait()
        await trio.testing.wait_all_tasks_blocked()
        other_process.execute("COMMIT")
    assert waiter.status() == "transaction"
    await waiter.rollback()
    other_process.close()
    await waiter.close()


async def test_write_gate_hands_the_lock_over_in_order(driver: SqliteDriver) -> None:
    """BEGIN IMMEDIATE transactions of one process queue FIFO on an in-process gate instead of
    polling SQLite's lock; a cancelled waiter leaves at once; the wait is bounded by the busy
    timeout (0.2 s here) and then is a serialization error."""
    conns = [await driver.connect(driver.options) for _ in range(4)]
    await conns[0].execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
    immediate = TransactionOptions(mode="immediate")
    await conns[0].begin(immediate)
    order: list[int] = []
    async with trio.open_nursery() as nursery:
        cancelled = trio.CancelScope()

        async def writer(i: int) -> None:
            await conns[i].begin(immediate)
            order.append(i)
            await conns[i].execute("INSERT INTO t (name) VALUES (?)", (f"w{i}",))
            await conns[i].commit()

        async def doomed() -> None:
            with cancelled:
                await conns[2].begin(immediate)

        nursery.start_soon(writer, 1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(doomed)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(writer, 3)
        await trio.testing.wait_all_tasks_blocked()
        cancelled.cancel()  # leaves the queue without ever touching the database
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        await conns[0].commit()
    assert order == [1, 3]
    assert conns[2].status() == "idle" and not conns[2].in_flight
    assert await conns[2].fetch("SELECT name FROM t ORDER BY id") == [("w1",), ("w3",)]

    await conns[0].begin(immediate)
    start = time.perf_counter()
    with pytest.raises(DatabaseError, match="longer than the busy timeout") as info:
        await conns[1].begin(immediate)
    assert info.value.kind == "serialization"
    assert 0.15 < time.perf_counter() - start < 2.0
    await conns[0].rollback()
    await conns[1].begin(immediate)  # the gate was released by the rollback
    await conns[1].close()  # ...and by close, with the transaction open
    await conns[2].begin(immediate)
    await conns[2].commit()
    for c in conns:
        await c.close()


async def test_busy_upgrade_of_stale_snapshot(driver: SqliteDriver, conn: SqliteConnection) -> None:
    """WAL: a deferred transaction that read, then tries to write after another connection
    committed, can never succeed: SQLite says busy at once, the pool must retry the whole
    transaction."""
    second = await other(driver)
    await second.begin(TX)
    assert await second.fetch("SELECT count(*) FROM t") == [(0,)]
    await conn.execute("INSERT INTO t (name) VALUES ('first')")
    with pytest.raises(DatabaseError) as info:
        await second.execute("INSERT INTO t (name) VALUES ('second')")
    assert info.value.kind == "serialization"
    await second.rollback()
    await second.close()


# -- cancellation, concurrency, close ----------------------------------------------------------


async def test_cancel_mid_query_then_cancel_and_reset(conn: SqliteConnection) -> None:
    await conn.begin(TX)
    await conn.execute("INSERT INTO t (name) VALUES ('in tx')")
    started = arm_started_event(conn)
    latency = 0.0
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def client() -> None:
            nonlocal latency
            with scope:
                await conn.fetch(SLOW_QUERY)
            latency = time.perf_counter() - cancelled_at
            assert scope.cancelled_caught

        nursery.start_soon(client)
        await started.wait()  # the query is running in the worker thread
        cancelled_at = time.perf_counter()
        scope.cancel()
    assert latency < 0.25, f"cancelled client took {latency:.4f} s to return"
    print(f"\ncancelled client returned after {latency * 1e6:.0f} us")
    assert conn.in_flight
    assert conn.status() == "unknown"

    start = time.perf_counter()
    with trio.fail_after(5):
        await conn.cancel()
        await conn.reset()
    recovery = time.perf_counter() - start
    print(f"cancel()+reset() recovered the connection in {recovery * 1e3:.2f} ms")
    disarm(conn)
    assert not conn.in_flight
    assert conn.status() == "idle"
    assert await conn.fetch("SELECT count(*) FROM t") == [(0,)]  # the transaction rolled back
    await conn.cancel()  # nothing running: harmless, and does not poison the next statement
    assert await conn.fetch("SELECT 1") == [(1,)]


def _blocking_function(conn: SqliteConnection) -> tuple[threading.Event, trio.Event]:
    """Register SQL function ``block()``, which waits on a threading.Event (release) and
    reports entry through a trio.Event (entered)."""
    release = threading.Event()
    entered = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def block() -> int:
        token.run_sync_soon(entered.set)
        if not release.wait(10):
            raise RuntimeError("test never released block()")
        return 7

    conn.raw.create_function("block", 0, block)
    return release, entered


async def test_abandoned_call_is_waited_for_by_reset_and_next_call(conn: SqliteConnection) -> None:
    release, entered = _blocking_function(conn)
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def client() -> None:
            with scope:
                await conn.fetch("SELECT block()")

        nursery.start_soon(client)
        await entered.wait()
        scope.cancel()
    assert conn.status() == "unknown"
    await conn.cancel()  # interrupt cannot stop a Python function: the call is still running
    assert conn.in_flight

    order: list[str] = []
    async with trio.open_nursery() as nursery:

        async def reset() -> None:
            await conn.reset()
            order.append("reset")

        async def next_call() -> None:
            order.append(f"next {await conn.fetch('SELECT 1')}")

        nursery.start_soon(reset)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(next_call)
        await trio.testing.wait_all_tasks_blocked()
        assert order == []  # both wait for the abandoned call, neither runs beside it
        release.set()
    assert order == ["reset", "next [(1,)]"]
    assert conn.status() == "idle"


async def test_two_tasks_on_one_connection_are_serialized(conn: SqliteConnection) -> None:
    release, entered = _blocking_function(conn)
    results: list[object] = []
    async with trio.open_nursery() as nursery:

        async def first() -> None:
            results.append(await conn.fetch("SELECT block()"))

        async def second() -> None:
            results.append(await conn.fetch("SELECT 2"))

        nursery.start_soon(first)
        await entered.wait()
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert results == []
        release.set()
    assert results == [[(7,)], [(2,)]]


async def test_close_while_call_in_flight(conn: SqliteConnection) -> None:
    release, entered = _blocking_function(conn)
    outcome: list[BaseException] = []
    async with trio.open_nursery() as nursery:

        async def client() -> None:
            try:
                await conn.fetch("SELECT block()")
            except ConnectionLost as exc:
                outcome.append(exc)

        nursery.start_soon(client)
        await entered.wait()
        start = time.perf_counter()
        await conn.close()
        close_time = time.perf_counter() - start
    # close() returned and the client was woken although block() is still running
    assert close_time < 0.25
    assert len(outcome) == 1 and "closed" in str(outcome[0])
    assert conn.closed and conn.status() == "unknown"
    await conn.close()  # idempotent
    with pytest.raises(ConnectionLost):
        await conn.fetch("SELECT 1")
    release.set()
    with trio.fail_after(5):
        await conn.wait_closed()  # the worker thread closed the handle after block() returned
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        conn.raw.execute("SELECT 1")


async def test_close_interrupts_a_slow_query(conn: SqliteConnection) -> None:
    started = arm_started_event(conn)
    async with trio.open_nursery() as nursery:

        async def client() -> None:
            with pytest.raises(ConnectionLost):
                await conn.fetch(SLOW_QUERY)

        nursery.start_soon(client)
        await started.wait()
        await conn.close()
    with trio.fail_after(5):
        await conn.wait_closed()


async def test_every_call_after_close_is_connection_lost(conn: SqliteConnection) -> None:
    await conn.ping()
    cursor = await conn.open_cursor("SELECT 1 UNION ALL SELECT 2", None, 1)
    await conn.close()
    await conn.wait_closed()
    await cursor.close()  # closing a cursor of a closed connection is quiet
    calls = [
        conn.ping(),
        conn.execute("SELECT 1"),
        conn.fetch("SELECT 1"),
        conn.open_cursor("SELECT 1", None, 5),
        conn.prepare("SELECT 1"),
        conn.begin(TX),
        conn.commit(),
        conn.rollback(),
        conn.savepoint("a"),
        conn.release("a"),
        conn.rollback_to("a"),
        conn.reset(),
    ]
    for call in calls:
        with pytest.raises(ConnectionLost):
            await call
    await conn.cancel()  # never raises
    await conn.close()


async def test_cancelled_connect_leaks_nothing(driver: SqliteDriver) -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        await driver.connect(driver.options)
    assert scope.cancelled_caught


# -- streaming ---------------------------------------------------------------------------------


async def test_stream_large_table_with_bounded_memory(conn: SqliteConnection) -> None:
    rows, batch_size = 200_000, 500
    await conn.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, payload TEXT)")
    assert await conn.execute(make_table_sql(rows)) == rows

    gc.collect()
    tracemalloc.start()
    try:
        cursor = await conn.open_cursor("SELECT id, payload FROM big ORDER BY id", None, batch_size)
        seen = batches = 0
        expected_id = 1
        while batch := await cursor.fetch_batch():
            assert len(batch) <= batch_size
            assert batch[0][0] == expected_id
            expected_id += len(batch)
            seen += len(batch)
            batches += 1
        assert await cursor.fetch_batch() == []  # stays exhausted
        _, stream_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        full = await conn.fetch("SELECT id, payload FROM big ORDER BY id")
        _, full_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == len(full) == rows
    assert batches == rows // batch_size
    print(
        f"\nstreamed {rows} rows in {batches} batches: peak {stream_peak / 1e6:.2f} MB "
        f"vs {full_peak / 1e6:.2f} MB for fetch-all"
    )
    assert stream_peak < full_peak / 20
    assert conn.status() == "idle"


async def test_cursor_close_and_reset_release_read_locks(tmp_path: Path) -> None:
    """Rollback-journal mode: an unfinished read cursor holds a SHARED lock that stops another
    connection's commit. Closing it, or reset(), releases the lock."""
    d = SqliteDriver(str(tmp_path / "journal.db"), timeout=0.1, wal=False)
    reader, writer = await d.connect(d.options), await d.connect(d.options)
    await writer.execute("CREATE TABLE n (x)")
    await writer.execute("INSERT INTO n VALUES (1), (2), (3)")

    cursor = await reader.open_cursor("SELECT x FROM n", None, 1)
    assert await cursor.fetch_batch() == [(1,)]
    with pytest.raises(DatabaseError) as info:
        await writer.execute("INSERT INTO n VALUES (4)")
    assert info.value.kind == "serialization"
    await cursor.close()
    await cursor.close()  # twice is fine
    assert await writer.execute("INSERT INTO n VALUES (4)") == 1
    with pytest.raises(DatabaseError, match="closed cursor"):
        await cursor.fetch_batch()

    left_open = await reader.open_cursor("SELECT x FROM n", None, 2)
    assert len(await left_open.fetch_batch()) == 2
    await reader.reset()
    assert await writer.execute("INSERT INTO n VALUES (5)") == 1
    with pytest.raises(DatabaseError, match="reset"):
        await left_open.fetch_batch()
    with pytest.raises(ValueError, match="batch_size"):
        await reader.open_cursor("SELECT 1", None, 0)
    await reader.close()
    await writer.close()


# -- shared in-memory database -----------------------------------------------------------------


async def test_shared_memory_database() -> None:
    d = from_url("sqlite://:memory:")
    a, b = await d.connect(d.options), await d.connect(d.options)
    await a.execute("CREATE TABLE shared (x)")
    await a.execute("INSERT INTO shared VALUES (42)")
    assert await b.fetch("SELECT x FROM shared") == [(42,)]
    # Transactions and busy handling work as on a file.
    await a.begin(TransactionOptions(mode="immediate"))
    await a.execute("INSERT INTO shared VALUES (43)")
    await a.commit()
    assert await b.fetch("SELECT count(*) FROM shared") == [(2,)]

    # Another driver is another database.
    d2 = SqliteDriver(":memory:")
    c = await d2.connect(d2.options)
    with pytest.raises(DatabaseError, match="no such table"):
        await c.fetch("SELECT * FROM shared")
    await c.close()

    # Every connection of the pool may be replaced: the driver's anchor keeps the data.
    await a.close()
    await b.close()
    fresh = await d.connect(d.options)
    assert await fresh.fetch("SELECT count(*) FROM shared") == [(2,)]
    await fresh.close()
    d.close()
    gone = await d.connect(d.options)
    with pytest.raises(DatabaseError, match="no such table"):
        await gone.fetch("SELECT * FROM shared")
    await gone.close()


async def test_shared_memory_busy_is_serialization() -> None:
    d = SqliteDriver(":memory:", timeout=0.05)
    a, b = await d.connect(d.options), await d.connect(d.options)
    await a.execute("CREATE TABLE m (x)")
    await a.begin(TransactionOptions(mode="immediate"))
    with pytest.raises(DatabaseError) as info:
        await b.execute("INSERT INTO m VALUES (1)")
    assert info.value.kind == "serialization"
    await a.rollback()
    assert await b.execute("INSERT INTO m VALUES (1)") == 1
    await a.close()
    await b.close()


@pytest.mark.parametrize("call", ["execute", "fetch", "begin", "ping"])
async def test_a_call_in_an_already_cancelled_scope_sends_nothing(
    conn: SqliteConnection, call: str
) -> None:
    # The driver protocol's checkpoint rule (actors/driver.py): Cancelled before any work.
    calls = {
        "execute": lambda: conn.execute("insert into t values (1, 'a')"),
        "fetch": lambda: conn.fetch("insert into t values (2, 'b') returning id"),
        "begin": lambda: conn.begin(TX),
        "ping": lambda: conn.ping(),
    }
    with trio.CancelScope() as scope:
        scope.cancel()
        await calls[call]()
    assert scope.cancelled_caught
    assert conn.status() == "idle"
    assert await conn.fetch("select count(*) from t") == [(0,)]
