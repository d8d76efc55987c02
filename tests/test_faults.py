"""FaultDriver: planned and forced faults over a real SQLite database file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
import trio.testing
from sqlite_helpers import raw_count

from actors.driver import Connection, ConnectionLost, DatabaseError, Driver, TransactionOptions
from actors.faults import Fault, FaultConnection, FaultDriver, FaultPlan
from actors.sqlite import SqliteConnection, SqliteDriver

TX = TransactionOptions()


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "faults.db")


@pytest.fixture
async def inner(db_path: str) -> SqliteDriver:
    d = SqliteDriver(db_path, timeout=0.2)
    c = await d.connect(d.options)
    await c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    await c.close()
    return d


async def test_empty_plan_is_transparent(inner: SqliteDriver) -> None:
    fd = FaultDriver(inner)
    assert isinstance(fd, Driver)
    assert fd.name == "sqlite" and fd.options == inner.options and fd.secrets(fd.options) == []
    conn = await fd.connect(fd.options)
    assert isinstance(conn, Connection) and fd.connections == [conn]
    await conn.ping()
    await conn.prepare("SELECT 1")
    await conn.begin(TX)
    await conn.savepoint("s")
    assert await conn.execute("INSERT INTO t (v) VALUES (?)", ("a",)) == 1
    await conn.rollback_to("s")
    await conn.execute("INSERT INTO t (v) VALUES (?)", ("b",))
    await conn.release("s")
    assert conn.status() == "transaction"
    await conn.commit()
    cursor = await conn.open_cursor("SELECT v FROM t", None, 10)
    assert await cursor.fetch_batch() == [("b",)]
    await cursor.close()
    assert await conn.fetch("SELECT count(*) FROM t") == [(1,)]
    await conn.cancel()
    await conn.reset()
    await conn.close()
    await conn.close()
    assert fd.connections == [] and conn.closed
    assert fd.count() == 0


def test_plan_validation() -> None:
    with pytest.raises(ValueError, match="probability"):
        Fault(lost=1.5)
    with pytest.raises(ValueError, match="exceed 1"):
        Fault(lost=0.6, error=0.6)
    with pytest.raises(ValueError, match="latency"):
        Fault(latency=-1)
    with pytest.raises(ValueError, match="kind"):
        Fault(kind="boom")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown operation 'exec'"):
        FaultPlan(ops={"exec": Fault(lost=1)})
    with pytest.raises(ValueError, match="unknown operation"):
        FaultDriver(SqliteDriver(":memory:")).fail_next("close")
    plan = FaultPlan.uniform(error=0.5)
    assert plan.fault_for("execute").error == 0.5
    assert not plan.fault_for("connect").active  # uniform plans leave connect alone


async def test_lost_kills_the_connection_and_rolls_back(inner: SqliteDriver, db_path: str) -> None:
    fd = FaultDriver(inner)
    conn = await fd.connect(fd.options)
    await conn.begin(TransactionOptions(mode="immediate"))
    await conn.execute("INSERT INTO t (v) VALUES ('doomed')")
    fd.plan = FaultPlan(ops={"execute": Fault(lost=1.0)})
    with pytest.raises(ConnectionLost, match="injected"):
        await conn.execute("INSERT INTO t (v) VALUES ('never')")
    assert conn.broken and conn.status() == "unknown"
    assert isinstance(conn.inner, SqliteConnection) and conn.inner.closed
    fd.plan = FaultPlan()
    with pytest.raises(ConnectionLost):  # stays dead, whatever the plan says now
        await conn.fetch("SELECT 1")
    with pytest.raises(ConnectionLost):
        await conn.reset()
    assert fd.injected[("execute", "lost")] == 1
    assert fd.count("broken") == 2
    # The "server" dropped the session: the write lock is gone, nothing was committed.
    fresh = await fd.connect(fd.options)
    assert await fresh.execute("INSERT INTO t (v) VALUES ('after')") == 1
    assert raw_count(db_path, "t") == 1
    await conn.close()
    await fresh.close()


async def test_lost_after_commit_did_commit(inner: SqliteDriver, db_path: str) -> None:
    fd = FaultDriver(inner, FaultPlan(ops={"commit": Fault(lost_after=1.0)}))
    conn = await fd.connect(fd.options)
    await conn.begin(TX)
    await conn.execute("INSERT INTO t (v) VALUES ('committed anyway')")
    with pytest.raises(ConnectionLost, match="after the call ran"):
        await conn.commit()
    assert raw_count(db_path, "t") == 1  # the client cannot know; the database does
    assert fd.count("lost_after", "commit") == 1
    await conn.close()


async def test_injected_errors_leave_connection_usable(inner: SqliteDriver) -> None:
    fd = FaultDriver(inner, FaultPlan(ops={"execute": Fault(error=1.0)}))
    conn = await fd.connect(fd.options)
    with pytest.raises(DatabaseError) as info:
        await conn.execute("INSERT INTO t (v) VALUES ('x')")
    assert info.value.kind == "serialization" and info.value.sqlstate == "40001"
    assert not conn.broken
    assert await conn.fetch("SELECT count(*) FROM t") == [(0,)]  # fetch is not faulted
    fd.plan = FaultPlan(ops={"fetch": Fault(error=1.0, kind="integrity")})
    with pytest.raises(DatabaseError) as info:
        await conn.fetch("SELECT 1")
    assert info.value.kind == "integrity" and info.value.sqlstate == "23000"
    # ping and reset may only fail with ConnectionLost (the protocol says so)
    fd.plan = FaultPlan(ops={"ping": Fault(error=1.0)})
    with pytest.raises(ConnectionLost):
        await conn.ping()
    assert fd.count("error") == 2 and fd.count("lost", "ping") == 1
    await conn.close()


async def _outcomes(fd: FaultDriver, calls: int) -> list[str]:
    conn = await fd.connect(fd.options)
    seen: list[str] = []
    for _ in range(calls):
        try:
            await conn.fetch("SELECT 1")
            seen.append("ok")
        except DatabaseError:
            seen.append("error")
    await conn.close()
    return seen


async def test_seeded_plans_are_reproducible(inner: SqliteDriver) -> None:
    plan = FaultPlan.uniform(error=0.25)
    first = await _outcomes(FaultDriver(inner, plan, seed=7), 400)
    again = await _outcomes(FaultDriver(inner, plan, seed=7), 400)
    other = await _outcomes(FaultDriver(inner, plan, seed=8), 400)
    assert first == again
    assert first != other
    rate = first.count("error") / len(first)
    assert 0.17 < rate < 0.33, rate


async def test_fail_next(inner: SqliteDriver) -> None:
    fd = FaultDriver(inner)
    conn = await fd.connect(fd.options)
    fd.fail_next("commit", DatabaseError("deadlock", kind="serialization"))
    fd.fail_next("commit", DatabaseError)
    await conn.begin(TX)
    with pytest.raises(DatabaseError, match="deadlock"):
        await conn.commit()
    with pytest.raises(DatabaseError, match="fail_next"):
        await conn.commit()
    assert conn.status() == "transaction"  # commit never ran
    await conn.commit()
    fd.fail_next("execute")
    with pytest.raises(ConnectionLost, match="fail_next"):
        await conn.execute("SELECT 1")
    assert conn.broken
    assert fd.count("forced") == 3
    await conn.close()


async def test_break_all_is_a_server_restart(inner: SqliteDriver) -> None:
    fd = FaultDriver(inner)
    a, b = await fd.connect(fd.options), await fd.connect(fd.options)
    assert fd.break_all() == 2
    assert fd.break_all() == 0  # already broken
    for conn in (a, b):
        with pytest.raises(ConnectionLost):
            await conn.ping()
        await conn.close()
    assert fd.connections == []
    c = await fd.connect(fd.options)  # reconnecting works
    await c.ping()
    await c.close()


async def test_latency_gives_cancellation_something_to_hit(inner: SqliteDriver) -> None:
    fd = FaultDriver(inner, FaultPlan(ops={"fetch": Fault(latency=30.0)}))
    conn = await fd.connect(fd.options)
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def client() -> None:
            with scope:
                await conn.fetch("SELECT 1")

        nursery.start_soon(client)
        await trio.testing.wait_all_tasks_blocked()
        start = time.perf_counter()
        scope.cancel()
    assert time.perf_counter() - start < 1.0
    assert scope.cancelled_caught
    assert fd.count("delayed", "fetch") == 1
    assert await conn.execute("SELECT 1") == -1  # the connection never saw the call
    await conn.close()


async def test_connect_faults_and_enabled_switch(inner: SqliteDriver) -> None:
    fd = FaultDriver(inner, FaultPlan(ops={"connect": Fault(lost=1.0)}))
    with pytest.raises(ConnectionLost, match="cannot reach"):
        await fd.connect(fd.options)
    fd.plan = FaultPlan(ops={"connect": Fault(error=1.0, kind="other")})
    with pytest.raises(DatabaseError):
        await fd.connect(fd.options)
    assert fd.connections == []
    fd.enabled = False
    conn = await fd.connect(fd.options)
    assert isinstance(conn, FaultConnection)
    fd.enabled = True
    fd.plan = FaultPlan(ops={"fetch_batch": Fault(lost=1.0)})
    cursor = await conn.open_cursor("SELECT 1", None, 5)
    with pytest.raises(ConnectionLost):
        await cursor.fetch_batch()
    await cursor.close()
    await conn.close()
    assert fd.count(op="connect") == 2 and fd.count(op="fetch_batch") == 1
