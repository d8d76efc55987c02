"""Regression tests from the adversarial review: each proved one bug (now fixed).

Scripted driver throughout (one test on real SQLite); every test states the interleaving it
forces.
"""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from actors.driver import ConnectionLost as DriverLost
from actors.driver import DatabaseError
from actors.scripted import (
    Call,
    ScriptedConnection,
    ScriptedCursor,
    ScriptedDriver,
    blocking,
)
from supervisor import (
    Backoff,
    ConfigError,
    Connection,
    PoolClosed,
    PoolError,
    QueueDropped,
    SafetyLimits,
    SerializationFailure,
    Transaction,
    open_pool,
)


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


def gate_step(entered: trio.Event, gate: trio.Event, result: Any = None) -> Callable[
    [Call], Awaitable[Any]
]:
    async def step(call: Call) -> Any:
        entered.set()
        await gate.wait()
        return result

    return step


# 1 ------------------------------------------------------------------------------------------------


async def test_block_exit_with_call_in_flight_in_other_task_does_not_lend_it_twice() -> None:
    driver = ScriptedDriver()
    entered, gate = trio.Event(), trio.Event()
    driver.script("execute", gate_step(entered, gate, 7))
    child_result: list[Any] = []
    async with open_pool(driver, size=1, name="twice") as pool:
        async with trio.open_nursery() as nursery:

            async def child(conn: Connection) -> None:
                try:
                    child_result.append(await conn.execute("update t set x = 1"))
                except PoolError as exc:  # ConnectionLost / PoolError would be correct
                    child_result.append(exc)

            async with pool.run() as conn:
                nursery.start_soon(child, conn)
                await entered.wait()  # the child is now inside execute on connection #1
            # The block ended with the child's call still in flight.
            await settle()
            in_flight = not gate.is_set() and not child_result
            async with pool.run(queue=False) as other:
                await other.execute("next client")
            used = driver.calls[-1].conn
            gate.set()
    # The next client must never run on connection #1 while the child's call is in flight on it.
    assert not (in_flight and used == 1), (
        f"connection #1 lent to a second client while a call was in flight; child got "
        f"{child_result!r}; ops {driver.ops(1)}"
    )


# 2 ------------------------------------------------------------------------------------------------


async def test_run_transaction_rollback_does_not_rerun_fn() -> None:
    driver = ScriptedDriver()
    runs = 0
    async with open_pool(driver, size=1, name="rt") as pool:

        async def fn(tx: Transaction) -> str:
            nonlocal runs
            runs += 1
            if runs > 1:
                raise RuntimeError(f"fn re-run {runs} times after tx.rollback()")
            tx.rollback("nothing to do")

        with trio.fail_after(5):
            result = await pool.run_transaction(fn)
    assert runs == 1 and result is None


# 3 ------------------------------------------------------------------------------------------------


async def test_shutdown_during_after_connect_closes_the_new_connection() -> None:
    driver = ScriptedDriver()
    entered = trio.Event()

    async def hook(conn: Connection) -> None:
        entered.set()
        await trio.sleep_forever()

    async with open_pool(driver, size=1, name="ac", after_connect=hook):
        await entered.wait()
    assert len(driver.connections) == 1
    assert driver.live == [], "a connection was leaked by the closed pool"


# 4 ------------------------------------------------------------------------------------------------


async def test_reused_transaction_block_does_not_touch_a_returned_connection() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1, name="reuse") as pool:
        block = pool.transaction()
        async with block:
            pass
        entered_again = False
        release = trio.Event()

        async def holder(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with pool.run():
                task_status.started()
                await release.wait()

        async with trio.open_nursery() as nursery:
            await nursery.start(holder)
            # The only connection is held by `holder`; entering must wait (or refuse).
            with trio.move_on_after(0.2):
                try:
                    async with block:
                        entered_again = True
                except PoolError:
                    pass
            release.set()
    assert not entered_again, f"ran on a connection lent to another task: {driver.ops(1)}"


# 5 ------------------------------------------------------------------------------------------------


async def test_users_own_exception_group_comes_out_as_itself() -> None:
    driver = ScriptedDriver()
    mine = ExceptionGroup("mine", [ValueError("a")])
    with pytest.raises(BaseException) as info:
        async with open_pool(driver, size=1, name="eg"):
            raise mine
    assert info.value is mine, f"got {info.value!r}"


async def test_users_own_multi_exception_group_is_not_wrapped() -> None:
    driver = ScriptedDriver()
    mine = ExceptionGroup("mine", [ValueError("a"), KeyError("b")])
    with pytest.raises(BaseException) as info:
        async with open_pool(driver, size=1, name="eg2"):
            raise mine
    assert info.value is mine, f"got {info.value!r}"


# 6 ------------------------------------------------------------------------------------------------


async def test_pool_failure_chain_built_by_the_pool_has_no_password() -> None:
    secret = "hunter2-s3cret"
    driver = ScriptedDriver(options={"password": secret})
    driver_error = DriverLost(f"could not connect: password={secret} rejected")
    driver.script("connect", driver_error)
    with pytest.raises(PoolClosed) as info:
        async with open_pool(
            driver, size=1, name="sec", backoff=Backoff(kind="stop"), max_restarts=0
        ):
            await trio.sleep_forever()
    assert secret not in str(info.value)
    chain: list[BaseException] = []
    exc: BaseException | None = info.value
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    own = [e for e in chain if e is not driver_error]  # the driver's own text is its business
    leaked = [e for e in own if secret in str(e)]
    assert not leaked, f"pool-built exceptions carrying the secret: {leaked!r}\n" + "".join(
        traceback.format_exception(info.value)
    )


# 7 ------------------------------------------------------------------------------------------------


async def test_two_tasks_on_an_interrupted_handle_do_not_interleave() -> None:
    driver = ScriptedDriver()
    driver.script("execute", blocking(trio.Event()))  # hangs until cancelled
    reset_gate = trio.Event()
    driver.script("reset", blocking(reset_gate))
    async with open_pool(driver, size=1, name="race") as pool:
        async with pool.run() as conn:
            with trio.move_on_after(0.02):
                await conn.execute("stuck")  # interrupted: the next call recovers inline
            refused: list[PoolError] = []
            done: list[int] = []

            async def use(n: int) -> None:
                try:
                    await conn.execute(f"work {n}")
                    done.append(n)
                except PoolError as exc:
                    refused.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(use, 1)
                await settle()  # task 1 is inside recover_inline (reset blocked)
                nursery.start_soon(use, 2)
                await settle()
                reset_gate.set()
    ops = driver.ops(1, exclude={"ping"})
    # Task 2 ran cancel/reset/execute on the connection while task 1 was mid-reset.
    assert len(refused) == 1, f"no PoolError for concurrent use; ops {ops}, done {done}"


# 8 ------------------------------------------------------------------------------------------------


async def test_stream_from_inner_block_never_returns_connection_with_open_cursor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cursors: list[ScriptedCursor] = []
    original = ScriptedConnection.open_cursor

    async def spy(self: ScriptedConnection, *args: Any) -> ScriptedCursor:
        cursor = await original(self, *args)
        cursors.append(cursor)
        return cursor

    monkeypatch.setattr(ScriptedConnection, "open_cursor", spy)
    driver = ScriptedDriver()
    driver.script("open_cursor", [(1,), (2,), (3,)])
    async with open_pool(driver, size=1, name="stream") as pool:
        async with pool.run():
            async with pool.run() as inner:  # re-entrant: same lease
                stream = inner.stream("select * from big", batch_size=1)
                assert await stream.__anext__() == (1,)
            await stream.aclose()  # returns quietly, but does not close the cursor
        await settle()
        assert pool.statistics().idle == 1
    ops = driver.ops(1, exclude={"ping", "close"})
    # Either the cursor was closed, or the actor reset the connection before reuse.
    assert cursors[0].closed or "reset" in ops, f"went idle with an open cursor: {ops}"


# 9 ------------------------------------------------------------------------------------------------


async def test_bad_isolation_is_a_config_error_and_keeps_the_connection() -> None:
    driver = ScriptedDriver()
    driver.script("begin", ValueError("unknown isolation level 'bogus'"))
    async with open_pool(driver, size=1, name="iso") as pool:
        with pytest.raises(ValueError) as info:
            async with pool.transaction(isolation="bogus"):
                pass  # pragma: no cover
        await settle()
        stats = pool.statistics()
    assert isinstance(info.value, ConfigError) and "'iso'" in str(info.value), repr(info.value)
    assert stats.connects == 1 and stats.disconnects == 0, stats


# 10 -----------------------------------------------------------------------------------------------


def test_bad_limits_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="hold_timeout"):
        open_pool(ScriptedDriver(), size=1, limits=SafetyLimits(hold_timeout=-1))


# 11 -----------------------------------------------------------------------------------------------


async def test_reused_run_block_does_not_return_the_outer_lease() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1, name="rb") as pool:
        block = pool.run()
        async with block:
            pass
        async with pool.run() as outer:
            with pytest.raises(PoolError, match="entered only once"):
                async with block:  # a block object is single-use
                    pass  # pragma: no cover
            # outer still holds its connection: no other task may get it now (the same task
            # would re-enter outer's lease, so the check runs in a child task)
            async def other() -> None:
                with pytest.raises(QueueDropped):
                    async with pool.run(queue=False):
                        pass  # pragma: no cover

            async with trio.open_nursery() as nursery:
                nursery.start_soon(other)
            await outer.execute("still mine")


# 12 -----------------------------------------------------------------------------------------------


async def test_failed_commit_in_held_lease_leaves_no_open_transaction() -> None:
    driver = ScriptedDriver()

    async def busy_commit(call: Call) -> None:
        # What SQLite does on SQLITE_BUSY at COMMIT: the transaction stays open.
        driver.connections[0].forced_status = "transaction"
        raise DatabaseError("database is locked", kind="serialization")

    async def rollback(call: Call) -> None:
        driver.connections[0].forced_status = None  # ROLLBACK ends it, as on SQLite

    driver.script("commit", busy_commit)
    driver.script("rollback", rollback)
    async with open_pool(driver, size=1, name="commit") as pool:
        async with pool.run() as conn:
            with pytest.raises(SerializationFailure):
                async with conn.transaction() as tx:
                    await tx.execute("insert into t values (1)")
            # The outermost transaction block is over: the connection must be out of it.
            status = conn.status()
            ops = driver.ops(1)
    assert status == "idle", f"transaction still open after the block ended; ops {ops}"


async def test_failed_commit_sqlite_later_statement_is_not_lost(tmp_path: Any) -> None:
    import sqlite3

    path = str(tmp_path / "busy.db")
    with sqlite3.connect(path) as raw:
        raw.execute("create table t (v)")
    raw.close()
    url = f"sqlite:///{path}?wal=off&timeout=0.1"
    async with open_pool(url, size=1, name="A") as a, open_pool(url, size=1, name="B") as b:
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
