"""The public API (DESIGN section 3) over real SQLite files: an integration check of the pool and
the SQLite driver together. No sleeps as synchronisation, no autojump clock (real threads)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from sqlite_helpers import raw_count

from actors.sqlite import SqliteDriver
from supervisor import (
    ConnectionLost,
    IntegrityError,
    QueryError,
    SerializationFailure,
    Transaction,
    TransactionFailed,
    open_pool,
)


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    path = str(tmp_path / "pool.db")
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE)")
        raw.execute("CREATE TABLE counter (n INTEGER NOT NULL)")
        raw.execute("INSERT INTO counter VALUES (0)")
    raw.close()
    return path


def url(path: str, **query: object) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return "sqlite:///" + path + (f"?{q}" if q else "")


async def test_run_one_shots_and_stream(db_path: str) -> None:
    async with open_pool(url(db_path), size=3, name="basic") as pool:
        async with pool.run() as conn:
            assert await conn.execute("INSERT INTO t (v) VALUES (?)", ("a",)) == 1
            assert await conn.execute("INSERT INTO t (v) VALUES (:v)", {"v": "b"}) == 1
            assert await conn.fetch_all("SELECT v FROM t ORDER BY id") == [("a",), ("b",)]
            assert conn.status() == "idle"
        assert await pool.fetch_val("SELECT count(*) FROM t") == 2
        assert await pool.fetch_one("SELECT v FROM t WHERE id = ?", (2,)) == ("b",)
        assert await pool.fetch_one("SELECT v FROM t WHERE id = 99", optional=True) is None
        assert await pool.fetch_column("SELECT v FROM t ORDER BY v") == ["a", "b"]
        await pool.execute(
            "INSERT INTO t (v) SELECT 'r' || x FROM (WITH RECURSIVE c(x) AS "
            "(SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000) SELECT x FROM c)"
        )
        async with pool.run() as conn:
            n = 0
            async with conn.stream("SELECT id FROM t ORDER BY id", batch_size=64) as rows:
                async for (row_id,) in rows:
                    n += 1
                    assert row_id == n
            assert n == 1002
        stats = pool.statistics()
        assert stats.size == 3 and stats.busy == 0


async def test_transaction_commit_rollback_and_errors(db_path: str) -> None:
    async with open_pool(url(db_path), size=2) as pool:
        async with pool.transaction() as tx:
            await tx.execute("INSERT INTO t (v) VALUES ('kept')")
            assert tx.status() == "transaction"
        assert tx.committed is True
        with pytest.raises(KeyError):
            async with pool.transaction() as tx:
                await tx.execute("INSERT INTO t (v) VALUES ('raised')")
                raise KeyError("boom")
        assert tx.committed is False
        async with pool.transaction() as tx:
            await tx.execute("INSERT INTO t (v) VALUES ('rolled back')")
            tx.rollback("changed my mind")
        assert tx.committed is False and tx.rollback_reason == "changed my mind"
        # Errors the database reports leave the connection usable.
        with pytest.raises(IntegrityError) as info:
            await pool.execute("INSERT INTO t (v) VALUES ('kept')")
        assert isinstance(info.value.__cause__, sqlite3.IntegrityError)
        assert "UNIQUE" in str(info.value) and info.value.query is not None
        with pytest.raises(QueryError):
            await pool.fetch_all("SELEKT 1")
        assert await pool.fetch_column("SELECT v FROM t") == ["kept"]
    assert raw_count(db_path, "t") == 1


async def test_savepoints_and_flat_nesting(db_path: str) -> None:
    async with open_pool(url(db_path), size=1) as pool:
        async with pool.transaction() as tx:
            await tx.execute("INSERT INTO t (v) VALUES ('outer')")
            async with tx.transaction(savepoint=True) as leg:
                await leg.execute("INSERT INTO t (v) VALUES ('undone by rollback')")
                leg.rollback("leg cancelled")
            assert leg.committed is False
            with pytest.raises(IntegrityError):
                async with tx.transaction(savepoint=True):
                    await tx.execute("INSERT INTO t (v) VALUES ('inner ok')")
                    await tx.execute("INSERT INTO t (v) VALUES ('outer')")  # duplicate
            async with tx.transaction(savepoint=True) as kept:
                await kept.execute("INSERT INTO t (v) VALUES ('savepoint kept')")
            async with tx.transaction() as flat:  # flat: no SQL, same transaction
                await flat.execute("INSERT INTO t (v) VALUES ('flat')")
            async with pool.transaction() as same:  # re-entrant in this task
                assert same.status() == "transaction"
        assert tx.committed is True
        assert sorted(await pool.fetch_column("SELECT v FROM t")) == [
            "flat",
            "outer",
            "savepoint kept",
        ]

        # A failed flat block poisons the whole transaction: nothing is committed.
        with pytest.raises(TransactionFailed):
            async with pool.transaction() as tx:
                await tx.execute("INSERT INTO t (v) VALUES ('poisoned')")
                async with tx.transaction() as flat:
                    flat.rollback("nope")
                with pytest.raises(TransactionFailed):
                    await tx.execute("INSERT INTO t (v) VALUES ('refused')")
        assert await pool.fetch_val("SELECT count(*) FROM t WHERE v = 'poisoned'") == 0
    assert raw_count(db_path, "t") == 3


async def test_immediate_mode_and_busy_is_serialization_failure(db_path: str) -> None:
    async with (
        open_pool(url(db_path), size=1, name="holder") as holder,
        open_pool(url(db_path, timeout=0.1), size=1, name="loser") as loser,
    ):
        async with holder.transaction(mode="immediate") as tx:
            await tx.execute("INSERT INTO t (v) VALUES ('holder')")
            start = time.perf_counter()
            with pytest.raises(SerializationFailure) as info:
                async with loser.transaction(mode="immediate"):
                    pass
            assert time.perf_counter() - start < 2.0
            assert "loser" in str(info.value) and "locked" in str(info.value)
            # WAL: the other pool still reads (the committed state).
            assert await loser.fetch_val("SELECT count(*) FROM t") == 0
        assert await loser.fetch_val("SELECT count(*) FROM t") == 1


async def test_failed_commit_sqlite_later_statement_is_not_lost(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.db")
    with sqlite3.connect(path) as raw:
        raw.execute("create table t (v)")
    raw.close()
    busy = url(path, wal="off", timeout=0.1)
    async with open_pool(busy, size=1, name="A") as a, open_pool(busy, size=1, name="B") as b:
        async with a.run() as conn:
            async with b.transaction() as reader:
                await reader.fetch_all("select * from t")  # holds SQLite's SHARED lock
                with pytest.raises(SerializationFailure):  # COMMIT is busy
                    async with conn.transaction() as tx:
                        await tx.execute("insert into t values (1)")
            # The reader is gone; the outermost block ended: this is an autocommit statement.
            await conn.execute("insert into t values (2)")  # reported as done
    with sqlite3.connect(path) as raw:
        rows = raw.execute("select v from t").fetchall()
    raw.close()
    assert rows == [(2,)], f"the statement after the failed block was lost: {rows}"


async def test_run_transaction_retries_a_busy_database(db_path: str) -> None:
    release = trio.Event()
    attempts = 0

    async def add(tx: Transaction, value: str) -> int:
        nonlocal attempts
        attempts += 1
        try:
            return await tx.execute("INSERT INTO t (v) VALUES (?)", (value,))
        finally:
            release.set()  # the first attempt has failed (busy): let the holder commit

    async with (
        open_pool(url(db_path), size=1, name="holder") as holder,
        open_pool(url(db_path, timeout=0.1), size=1, name="retrier") as retrier,
    ):
        async with trio.open_nursery() as nursery:
            locked = trio.Event()

            async def hold() -> None:
                async with holder.transaction(mode="immediate") as tx:
                    await tx.execute("INSERT INTO t (v) VALUES ('first')")
                    locked.set()
                    await release.wait()

            nursery.start_soon(hold)
            await locked.wait()
            assert await retrier.run_transaction(add, "second", retries=5) == 1
        assert attempts >= 2
    assert raw_count(db_path, "t") == 2


async def test_two_pools_on_one_file_lose_no_update(db_path: str) -> None:
    """Two pools x 4 clients increment one counter in BEGIN IMMEDIATE transactions: the lock
    serializes them (the busy timeout queues writers), so no increment is lost."""
    per_client = 15

    async def client(pool_: object) -> None:
        from supervisor import Pool

        assert isinstance(pool_, Pool)
        for _ in range(per_client):
            async with pool_.transaction(mode="immediate") as tx:
                n = await tx.fetch_val("SELECT n FROM counter")
                await tx.execute("UPDATE counter SET n = ?", (n + 1,))

    async with (
        open_pool(url(db_path), size=4, name="a") as a,
        open_pool(url(db_path), size=4, name="b") as b,
    ):
        async with trio.open_nursery() as nursery:
            for pool in (a, b):
                for _ in range(4):
                    nursery.start_soon(client, pool)
        assert await a.fetch_val("SELECT n FROM counter") == 2 * 4 * per_client
        assert await b.fetch_val("SELECT n FROM counter") == 2 * 4 * per_client


async def test_shared_memory_pool() -> None:
    async with open_pool("sqlite://:memory:", size=2) as pool:
        await pool.execute("CREATE TABLE m (x)")
        async with pool.run() as first, trio.open_nursery() as nursery:
            await first.execute("INSERT INTO m VALUES (1)")

            async def other_connection() -> None:
                async with pool.run() as second:  # a child task gets its own connection
                    assert await second.fetch_val("SELECT count(*) FROM m") == 1

            nursery.start_soon(other_connection)
        assert pool.statistics().checkouts >= 2


async def test_cancelled_slow_query_heals_in_the_pool(db_path: str) -> None:
    started = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def signal() -> int:
        token.run_sync_soon(started.set)
        return 1

    def setup(raw: sqlite3.Connection) -> None:
        raw.create_function("started", 0, signal)

    slow = (
        "WITH RECURSIVE c(x) AS (SELECT started() UNION ALL SELECT x + 1 FROM c "
        "WHERE x < 1000000000) SELECT count(*) FROM c"
    )
    async with open_pool(SqliteDriver(db_path, setup=setup), size=1) as pool:
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def client() -> None:
                with scope:
                    async with pool.transaction() as tx:
                        await tx.execute("INSERT INTO t (v) VALUES ('lost')")
                        await tx.fetch_val(slow)

            nursery.start_soon(client)
            await started.wait()
            cancelled_at = time.perf_counter()
            scope.cancel()
        latency = time.perf_counter() - cancelled_at
        assert latency < 0.25
        # The single connection comes back clean: the interrupted transaction rolled back.
        with trio.fail_after(5):
            async with pool.run() as conn:
                assert conn.status() == "idle"
                assert await conn.fetch_val("SELECT count(*) FROM t") == 0
    assert raw_count(db_path, "t") == 0


async def test_kill_and_disconnect_all_replace_connections(db_path: str) -> None:
    async with open_pool(url(db_path), size=2) as pool:
        async with pool.run() as conn:
            await conn.execute("INSERT INTO t (v) VALUES ('before kill')")
            conn.kill()
            with pytest.raises(ConnectionLost):
                await conn.execute("INSERT INTO t (v) VALUES ('after kill')")
        await pool.disconnect_all()
        with trio.fail_after(5):
            while pool.statistics().connects < 5:  # 2 initial + 1 after kill + 2 replaced
                await trio.testing.wait_all_tasks_blocked()
                await pool.fetch_val("SELECT 1")
        assert await pool.fetch_column("SELECT v FROM t") == ["before kill"]


async def test_pool_releases_the_shared_memory_database_it_created() -> None:
    """A driver built from a URL is the pool's: closing the pool drops the in-memory database."""
    from actors.driver import DatabaseError

    async with open_pool("sqlite://:memory:", size=2) as pool:
        await pool.execute("create table t (x integer)")
        await pool.execute("insert into t values (1)")
        assert await pool.fetch_val("select count(*) from t") == 1
    conn = await pool.driver.connect(pool.driver.options)
    try:
        with pytest.raises(DatabaseError, match="no such table"):
            await conn.fetch("select count(*) from t")
    finally:
        await conn.close()


async def test_a_parameter_adapter_that_raises_is_the_callers_error_and_never_fails_the_pool(
    db_path: str,
) -> None:
    # sqlite3 lets an adapter's own exception through unchanged; the driver is idle (nothing
    # was sent), so it is not a driver crash: no restart counted, however many bad calls.
    class BadParam:
        def __conform__(self, protocol: object) -> object:
            raise KeyError("adapter bug")

    async with open_pool(f"sqlite:///{db_path}", size=2, max_restarts=2) as pool:
        for _ in range(12):
            with pytest.raises(KeyError, match="adapter bug"):
                await pool.fetch_all("select ?", (BadParam(),))
        await pool.wait()
        assert pool.statistics().restarts == 0
        assert await pool.fetch_val("select 42") == 42
