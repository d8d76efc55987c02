"""Every transaction rule of the public contract, checked against the exact driver protocol.

The scripted driver records each call, so "no COMMIT is ever sent after a nested failure" is an
assertion on the recorded sequence, not on a side effect.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from helpers import QUIET, gate_step, held, ops, settle

from actors.driver import ConnectionLost as DriverLost
from actors.driver import DatabaseError, TransactionOptions
from actors.scripted import Call, ScriptedConnection, ScriptedCursor, ScriptedDriver
from supervisor import (
    CardinalityError,
    ConfigError,
    ConnectionLost,
    IntegrityError,
    PoolError,
    QueryError,
    QueueDropped,
    Rollback,
    SerializationFailure,
    Transaction,
    TransactionFailed,
    open_pool,
)


async def test_outermost_commit_on_normal_exit() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1, name="tx") as pool:
        async with pool.transaction() as tx:
            assert tx.status() == "transaction"
            await tx.execute("update t set x = 1")
        assert tx.committed is True
        assert tx.rollback_reason is None
    assert ops(driver) == ["begin", "execute", "commit"]


async def test_outermost_rolls_back_and_reraises() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        with pytest.raises(KeyError):
            async with pool.transaction() as tx:
                await tx.execute("update t set x = 1")
                raise KeyError("boom")
        assert tx.committed is False
        assert pool.statistics().idle == 1
    assert ops(driver) == ["begin", "execute", "rollback"]


async def test_rollback_reason_is_suppressed_by_its_own_block() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        async with pool.transaction() as tx:
            await tx.execute("insert")
            tx.rollback("changed my mind")
            raise AssertionError("rollback() must not return")  # pragma: no cover
        assert tx.committed is False
        assert tx.rollback_reason == "changed my mind"
    assert ops(driver) == ["begin", "execute", "rollback"]


async def test_rollback_is_not_swallowed_by_except_exception() -> None:
    assert not issubclass(Rollback, Exception)
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        async with pool.transaction() as tx:
            try:
                tx.rollback(1)
            except Exception:  # pragma: no cover - must not catch it
                pytest.fail("Rollback was caught by except Exception")
        assert tx.rollback_reason == 1


async def test_flat_nested_issues_no_sql_and_commits_with_outer() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        async with pool.transaction() as tx:
            async with tx.transaction() as inner:
                await inner.execute("a")
            async with pool.transaction() as same_task:  # re-entrant: also flat
                await same_task.execute("b")
            assert inner.committed is True
        assert tx.committed is True
    assert ops(driver) == ["begin", "execute", "execute", "commit"]


async def test_flat_nested_raise_poisons_outer_no_commit_ever() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        with pytest.raises(TransactionFailed) as info:
            async with pool.transaction() as tx:
                await tx.execute("a")
                with pytest.raises(ValueError):
                    async with tx.transaction():
                        raise ValueError("inner")
                # every further query fails without touching the database
                calls_before = len(driver.calls)
                with pytest.raises(TransactionFailed):
                    await tx.execute("b")
                with pytest.raises(TransactionFailed):
                    await pool.fetch_all("c")  # virtual connection: same failed transaction
                assert len(driver.calls) == calls_before
                with pytest.raises(TransactionFailed):
                    async with tx.transaction():
                        pass  # pragma: no cover
        assert "ValueError" in str(info.value)
        assert repr(pool.name) in str(info.value)
        assert tx.committed is False
    assert ops(driver) == ["begin", "execute", "rollback"]
    assert "commit" not in driver.ops()


async def test_flat_nested_rollback_suppressed_then_outer_raises() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        with pytest.raises(TransactionFailed):
            async with pool.transaction() as tx:
                async with tx.transaction() as inner:
                    inner.rollback("nope")
                assert inner.committed is False
                assert inner.rollback_reason == "nope"
        assert tx.committed is False
    assert ops(driver) == ["begin", "rollback"]


async def test_nested_failure_propagating_through_outer_reraises_original() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        with pytest.raises(ZeroDivisionError):
            async with pool.transaction() as tx, tx.transaction():
                raise ZeroDivisionError
    assert ops(driver) == ["begin", "rollback"]


async def test_rollback_allowed_on_failed_transaction_ends_it_quietly() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        async with pool.transaction() as tx:
            async with tx.transaction() as inner:
                inner.rollback()
            tx.rollback("cleanup")
        assert tx.committed is False
        assert tx.rollback_reason == "cleanup"
    assert ops(driver) == ["begin", "rollback"]


async def test_savepoint_release_on_success() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        async with pool.transaction() as tx:
            async with tx.transaction(savepoint=True) as sp:
                await sp.execute("a")
            assert sp.committed is True
        assert tx.committed is True
    assert ops(driver) == ["begin", "savepoint", "execute", "release", "commit"]
    names = [c.args[0] for c in driver.calls if c.op in ("savepoint", "release")]
    assert names[0] == names[1]


async def test_savepoint_isolates_exception_and_outer_commits() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        async with pool.transaction() as tx:
            with pytest.raises(ValueError):
                async with tx.transaction(savepoint=True):
                    await tx.execute("a")
                    raise ValueError
            await tx.execute("b")  # the outer transaction stays usable
        assert tx.committed is True
    assert ops(driver) == ["begin", "savepoint", "execute", "rollback_to", "execute", "commit"]


async def test_savepoint_rollback_suppressed() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        async with pool.transaction() as tx:
            async with pool.transaction(savepoint=True) as sp:
                sp.rollback("undo leg")
            assert sp.committed is False
            assert sp.rollback_reason == "undo leg"
        assert tx.committed is True
    assert ops(driver) == ["begin", "savepoint", "rollback_to", "commit"]


async def test_savepoint_rescues_sql_error_in_transaction() -> None:
    driver = ScriptedDriver()
    driver.script("execute", 1, DatabaseError("duplicate key", sqlstate="23505"))
    async with open_pool(driver, size=1) as pool:
        async with pool.transaction() as tx:
            await tx.execute("ok")
            with pytest.raises(IntegrityError):
                async with tx.transaction(savepoint=True) as sp:
                    await sp.execute("dup")
            assert tx.status() == "transaction"
        assert tx.committed is True
    assert ops(driver)[-2:] == ["rollback_to", "commit"]


async def test_flat_failure_inside_savepoint_fails_only_the_savepoint() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        async with pool.transaction() as tx:
            with pytest.raises(TransactionFailed):
                async with tx.transaction(savepoint=True) as sp:
                    async with sp.transaction() as flat:
                        flat.rollback()
            assert sp.committed is False
            await tx.execute("still fine")
        assert tx.committed is True
    assert ops(driver) == ["begin", "savepoint", "rollback_to", "execute", "commit"]


async def test_outer_rollback_passes_through_savepoint_block() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        async with pool.transaction() as tx:
            async with tx.transaction(savepoint=True):
                tx.rollback("all of it")
        assert tx.rollback_reason == "all of it"
    assert ops(driver) == ["begin", "savepoint", "rollback_to", "rollback"]


async def test_failing_commit_raises_and_connection_stays_usable() -> None:
    driver = ScriptedDriver()
    driver.script("commit", DatabaseError("deferred fk", sqlstate="23503"))
    async with open_pool(driver, size=1) as pool:
        with pytest.raises(IntegrityError) as info:
            async with pool.transaction() as tx:
                await tx.execute("x")
        assert tx.committed is False
        assert info.value.sqlstate == "23503"
        assert isinstance(info.value.__cause__, DatabaseError)
        async with pool.transaction() as tx2:
            await tx2.execute("y")
        assert tx2.committed is True
        assert len(driver.connections) == 1


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
            conn_ops = driver.ops(1)
    assert status == "idle", f"transaction still open after the block ended; ops {conn_ops}"


async def test_serialization_failure_classified() -> None:
    driver = ScriptedDriver()
    driver.script(
        "execute",
        DatabaseError("could not serialize", sqlstate="40001"),
        DatabaseError("deadlock", sqlstate="40P01"),
        DatabaseError("database is locked", kind="serialization"),
    )
    async with open_pool(driver, size=1) as pool:
        for _ in range(3):
            with pytest.raises(SerializationFailure):
                await pool.execute("update")


async def test_run_transaction_retries_serialization_failures() -> None:
    driver = ScriptedDriver()
    driver.script(
        "commit", DatabaseError("x", sqlstate="40001"), DatabaseError("y", sqlstate="40001")
    )
    attempts = 0

    async def work(tx: object, amount: int) -> int:
        nonlocal attempts
        attempts += 1
        return amount * 2

    async with open_pool(driver, size=1) as pool:
        assert await pool.run_transaction(work, 21) == 42
        assert attempts == 3
        driver.script("commit", *[DatabaseError("x", sqlstate="40001")] * 3)
        with pytest.raises(SerializationFailure):
            await pool.run_transaction(work, 1, retries=2)
    assert driver.ops().count("commit") == 6


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


async def test_status_values() -> None:
    driver = ScriptedDriver()
    driver.script("execute", 0, DatabaseError("bad", sqlstate="42601"))
    async with open_pool(driver, size=1) as pool:
        async with pool.run() as conn:
            assert conn.status() == "idle"
            async with conn.transaction() as tx:
                assert conn.status() == "transaction"
                await tx.execute("fine")
                with pytest.raises(QueryError):
                    await tx.execute("bad")
                assert tx.status() == "error"
                tx.rollback()
            assert conn.status() == "idle"


async def test_error_state_at_exit_rolls_back_and_raises() -> None:
    driver = ScriptedDriver()
    driver.script("execute", DatabaseError("bad", sqlstate="42601"))
    async with open_pool(driver, size=1) as pool:
        with pytest.raises(TransactionFailed, match="error"):
            async with pool.transaction() as tx:
                with pytest.raises(QueryError):
                    await tx.execute("bad")
    assert ops(driver) == ["begin", "execute", "rollback"]


async def test_options_reach_begin_and_nested_options_rejected() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        async with pool.transaction(isolation="serializable", read_only=True, mode="immediate"):
            with pytest.raises(ConfigError, match="outermost"):
                async with pool.transaction(isolation="serializable"):
                    pass  # pragma: no cover
    begin = next(c for c in driver.calls if c.op == "begin")
    assert begin.args[0] == TransactionOptions("serializable", True, "immediate")


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


async def test_run_inside_transaction_reuses_connection_and_transaction() -> None:
    driver = ScriptedDriver()
    driver.script("fetch", [(7,)])
    async with open_pool(driver, size=2) as pool:
        async with pool.transaction() as tx:
            async with pool.run() as conn:
                assert conn.status() == "transaction"
                await conn.execute("inside")
            assert await pool.fetch_val("select 7") == 7
            await tx.execute("still open")
        assert pool.statistics().checkouts == 1
    conns = {c.conn for c in driver.calls if c.op in ("begin", "execute", "fetch", "commit")}
    assert len(conns) == 1


async def test_child_task_gets_its_own_connection() -> None:
    driver = ScriptedDriver()
    seen: dict[str, int] = {}
    async with open_pool(driver, size=2) as pool:
        async with pool.transaction():
            await pool.execute("parent")

            async def child() -> None:
                async with pool.run() as conn:
                    await conn.execute("child")
                    assert conn.status() == "idle"

            async with trio.open_nursery() as nursery:
                nursery.start_soon(child)
        assert pool.statistics().checkouts == 2
    for call in driver.calls:
        if call.op == "execute":
            seen[call.args[0]] = call.conn
    assert seen["parent"] != seen["child"]


async def test_handle_after_block_raises_pool_error() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1, name="stale") as pool:
        async with pool.run() as conn:
            pass
        with pytest.raises(PoolError, match="after its `async with` block") as info:
            await conn.execute("late")
        assert "'stale'" in str(info.value)
        async with pool.transaction() as tx:
            pass
        with pytest.raises(PoolError):
            tx.rollback()
        with pytest.raises(PoolError):
            conn.status()


async def test_reused_transaction_block_does_not_touch_a_returned_connection() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1, name="reuse") as pool:
        block = pool.transaction()
        async with block:
            pass
        entered_again = False
        async with held(pool):
            # The only connection is held by another task; entering must wait (or refuse).
            with trio.move_on_after(0.2):
                try:
                    async with block:
                        entered_again = True
                except PoolError:
                    pass
    assert not entered_again, f"ran on a connection lent to another task: {driver.ops(1)}"


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


async def test_handle_used_by_two_tasks_at_once_raises() -> None:
    driver = ScriptedDriver()
    started = trio.Event()
    release = trio.Event()
    driver.script("execute", gate_step(started, release, 1))
    async with open_pool(driver, size=1) as pool:
        async with pool.run() as conn, trio.open_nursery() as nursery:
            nursery.start_soon(conn.execute, "first")
            await started.wait()
            with pytest.raises(PoolError, match="two tasks at once"):
                await conn.execute("second")
            release.set()
    assert driver.ops(exclude=QUIET) == ["execute"]


async def test_query_error_leaves_connection_usable() -> None:
    driver = ScriptedDriver()
    cause = RuntimeError("native driver error")
    err = DatabaseError('relation "nope" does not exist', sqlstate="42P01")
    err.__cause__ = cause
    driver.script("fetch", err, [(1,)])
    async with open_pool(driver, size=1, name="errs") as pool:
        async with pool.run() as conn:
            with pytest.raises(QueryError) as info:
                await conn.fetch_all("select * from nope")
            assert info.value.sqlstate == "42P01"
            assert info.value.query == "select * from nope"
            assert info.value.__cause__ is cause
            assert "'errs'" in str(info.value) and "select * from nope" in str(info.value)
            assert await conn.fetch_all("select 1") == [(1,)]
    assert len(driver.connections) == 1


async def test_cardinality_errors_name_query_expected_actual() -> None:
    driver = ScriptedDriver()
    driver.script("fetch", [], [(1,), (2,)], [], [(3,)])
    async with open_pool(driver, size=1) as pool:
        with pytest.raises(CardinalityError) as info:
            await pool.fetch_one("select none")
        assert info.value.actual == 0 and "exactly one row" in str(info.value)
        assert "select none" in str(info.value)
        with pytest.raises(CardinalityError, match="got 2"):
            await pool.fetch_val("select two")
        assert await pool.fetch_one("select none", optional=True) is None
        assert await pool.fetch_column("select col") == [3]


async def test_one_shot_read_retried_once_on_lost_connection() -> None:
    driver = ScriptedDriver()
    driver.script("fetch", DriverLost("socket closed"), [(5,)])
    async with open_pool(driver, size=1) as pool:
        assert await pool.fetch_val("select 5") == 5
        driver.script("execute", DriverLost("socket closed"))
        from supervisor import ConnectionLost

        with pytest.raises(ConnectionLost):
            await pool.execute("insert")  # writes are never retried
    assert driver.ops().count("execute") == 1


async def test_prepared_statement_and_stream() -> None:
    driver = ScriptedDriver()
    driver.script("execute", 1, 1)
    driver.script("open_cursor", [(i,) for i in range(10)])
    async with open_pool(driver, size=1) as pool:
        async with pool.run() as conn:
            stmt = await conn.prepare("insert into t values (?)")
            assert await stmt.execute((1,)) == 1
            assert await stmt.execute((2,)) == 1
            rows = [row async for row in conn.stream("select", batch_size=3)]
            assert rows == [(i,) for i in range(10)]
        with pytest.raises(PoolError):
            await stmt.execute((3,))
    assert driver.ops(exclude=QUIET).count("prepare") == 1


async def test_abandoned_stream_makes_lease_dirty_and_actor_resets() -> None:
    driver = ScriptedDriver()
    driver.script("open_cursor", [(i,) for i in range(10)])
    async with open_pool(driver, size=1) as pool:
        async with pool.run() as conn:
            async for row in conn.stream("select", batch_size=2):
                if row == (3,):
                    break
        # the actor resets the connection in its own task, then it is idle again
        async with pool.run() as conn2:
            assert conn2.status() == "idle"
    assert "reset" in driver.ops()


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
    conn_ops = driver.ops(1, exclude={"ping", "close"})
    # Either the cursor was closed, or the actor reset the connection before reuse.
    assert cursors[0].closed or "reset" in conn_ops, f"went idle with an open cursor: {conn_ops}"


async def test_run_transaction_passes_transaction_options() -> None:
    driver = ScriptedDriver()

    async def work(tx: object) -> str:
        return "done"

    async with open_pool(driver, size=1) as pool:
        result = await pool.run_transaction(work, mode="immediate", isolation="serializable")
        assert result == "done"
    begin = next(c for c in driver.calls if c.op == "begin")
    assert begin.args[0] == TransactionOptions("serializable", False, "immediate")


async def test_commit_on_a_connection_that_died_unnoticed_reports_connection_lost() -> None:
    from supervisor import ConnectionLost

    driver = ScriptedDriver()
    driver.script("commit", DriverLost("server closed the connection"))
    async with open_pool(driver, size=1) as pool:
        with pytest.raises(ConnectionLost):
            async with pool.transaction() as tx:
                await tx.execute("x")
                driver.connections[0].forced_status = "unknown"
        assert tx.committed is False


async def test_a_connection_lost_at_begin_restarts_the_transaction_once_on_a_fresh_one() -> None:
    driver = ScriptedDriver()
    driver.script("begin", DriverLost("server closed the connection unexpectedly"))
    async with open_pool(driver, size=1) as pool:
        async with pool.transaction() as tx:
            await tx.execute("insert into t values (1)")
        assert tx.committed is True
        stats = pool.statistics()
        assert stats.transaction_restarts == 1
        assert stats.connects == 2
    first, second = (c.conn for c in driver.calls if c.op == "begin")
    assert first != second
    assert [c.op for c in driver.calls if c.conn == second and c.op not in QUIET] == [
        "begin", "execute", "commit",
    ]


async def test_a_second_loss_at_begin_is_not_hidden() -> None:
    driver = ScriptedDriver()
    driver.script("begin", DriverLost("gone"), DriverLost("gone again"))
    async with open_pool(driver, size=1) as pool:
        with pytest.raises(ConnectionLost, match="gone again"):
            async with pool.transaction():
                pass  # pragma: no cover
        assert pool.statistics().transaction_restarts == 1


async def test_a_loss_at_begin_inside_a_held_connection_is_not_restarted() -> None:
    driver = ScriptedDriver()
    driver.script("begin", DriverLost("gone"))
    async with open_pool(driver, size=1) as pool:
        async with pool.run() as conn:
            with pytest.raises(ConnectionLost, match="gone"):
                async with conn.transaction():
                    pass  # pragma: no cover
        assert pool.statistics().transaction_restarts == 0


async def test_a_savepoint_rollback_meeting_a_lost_connection_surfaces_as_connection_lost() -> None:
    # The demo's fee block: its own rollback() sends ROLLBACK TO, which finds the connection
    # gone. The block ends (its rollback is moot: the whole transaction is gone), and what comes
    # next says ConnectionLost, the same exception as every other loss, not TransactionFailed.
    driver = ScriptedDriver()
    driver.script("rollback_to", DriverLost("server closed the connection"))
    async with open_pool(driver, size=1, name="sp") as pool:
        with pytest.raises(ConnectionLost) as info:
            async with pool.transaction() as tx:
                async with tx.transaction(savepoint=True) as fee:
                    await fee.execute("update a")
                    fee.rollback("fee waived")
                async with tx.transaction():  # flat: opens without SQL
                    pass  # pragma: no cover
        assert "cannot open a nested block" in str(info.value)
        assert "'sp'" in str(info.value)
        assert tx.committed is False
    assert ops(driver) == ["begin", "savepoint", "execute", "rollback_to"]


async def test_a_body_that_swallows_a_connection_loss_still_ends_with_connection_lost() -> None:
    driver = ScriptedDriver()
    driver.script("execute", None, DriverLost("server closed the connection"))
    async with open_pool(driver, size=1) as pool:
        with pytest.raises(ConnectionLost, match="nothing was committed"):
            async with pool.transaction() as tx:
                await tx.execute("first")
                try:
                    await tx.execute("second")
                except ConnectionLost:
                    pass
                with pytest.raises(ConnectionLost, match="refusing to run execute"):
                    await tx.execute("third")
        assert tx.committed is False
        assert await pool.execute("on a fresh connection") == 0
    assert ops(driver) == ["begin", "execute", "execute", "execute"]


async def test_execute_many_refusing_a_row_fails_the_transaction_around_it() -> None:
    # Rows before the refused one may have run: committing would keep half a batch.
    driver = ScriptedDriver()
    driver.script("execute_many", ValueError("row 3: bad parameter"))
    async with open_pool(driver, size=1) as pool:
        with pytest.raises(TransactionFailed, match="execute_many refused the arguments"):
            async with pool.transaction() as tx:
                with pytest.raises(ConfigError, match="refused its arguments"):
                    await tx.execute_many("insert into t values (?)", [(1,), (2,), (3,)])
        assert tx.committed is False
    assert ops(driver) == ["begin", "execute_many", "rollback"]
