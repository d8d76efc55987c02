"""Cancellation at every await point of a handle (scripted driver).

For each point: the cancelled task returns at once, *while the actor's recovery is still blocked*
(so it was not delayed by it); no lease is lost; the pool returns to all-idle; the next client gets
a clean connection; nothing is ever committed.

Then one handle in several tasks: a call still in flight in another task when the block ends, or
two tasks racing on an interrupted handle, never lends or drives the connection twice.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from helpers import gate_step, hang, hold_until, ops, settle

from actors.driver import ConnectionLost as DriverLost
from actors.scripted import ScriptedDriver, blocking
from supervisor import (
    Connection,
    Pool,
    PoolError,
    QueryTimeout,
    SafetyLimits,
    open_pool,
)


async def body_begin(pool: Pool) -> None:
    async with pool.transaction():
        pass  # pragma: no cover


async def body_execute(pool: Pool) -> None:
    async with pool.run() as conn:
        await conn.execute("update t set x = 1")


async def body_fetch_one_shot(pool: Pool) -> None:
    await pool.fetch_all("select 1")


async def body_commit(pool: Pool) -> None:
    async with pool.transaction() as tx:
        await tx.execute("update t set x = 1")


async def body_rollback(pool: Pool) -> None:
    async with pool.transaction() as tx:
        await tx.execute("update t set x = 1")
        raise ValueError("make it roll back")


async def body_savepoint(pool: Pool) -> None:
    async with pool.transaction() as tx, tx.transaction(savepoint=True):
        pass  # pragma: no cover


async def body_release(pool: Pool) -> None:
    async with pool.transaction() as tx:
        async with tx.transaction(savepoint=True) as sp:
            await sp.execute("x")


async def body_rollback_to(pool: Pool) -> None:
    async with pool.transaction() as tx:
        async with tx.transaction(savepoint=True):
            raise ValueError("make it roll back to the savepoint")


async def body_stream(pool: Pool) -> None:
    async with pool.run() as conn:
        async for _ in conn.stream("select * from big"):
            pass  # pragma: no cover


POINTS = {
    "begin": body_begin,
    "execute": body_execute,
    "fetch": body_fetch_one_shot,
    "commit": body_commit,
    "rollback": body_rollback,
    "savepoint": body_savepoint,
    "release": body_release,
    "rollback_to": body_rollback_to,
    "open_cursor": body_stream,
}


@pytest.mark.parametrize("op", sorted(POINTS))
async def test_cancel_mid_call_is_prompt_and_pool_heals(op: str) -> None:
    driver = ScriptedDriver()
    entered = trio.Event()
    driver.script(op, hang(entered))
    reset_gate = trio.Event()
    driver.script("reset", blocking(reset_gate))
    async with open_pool(driver, size=1, name="cancel") as pool:
        done = trio.Event()
        scope = trio.CancelScope()

        async def client() -> None:
            with scope:
                await POINTS[op](pool)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await entered.wait()
            scope.cancel()
            await done.wait()
            # The client is gone while the actor is still inside reset(): not delayed by it.
            assert not reset_gate.is_set()
            await settle()
            stats = pool.statistics()
            assert stats.busy == 0 and stats.idle == 0 and stats.connecting == 1
            reset_gate.set()
        await settle()
        stats = pool.statistics()
        assert (stats.idle, stats.busy, stats.connecting) == (1, 0, 0)
        async with pool.run() as conn:
            assert conn.status() == "idle"
            await conn.execute("next client")
        assert pool.statistics().idle == 1
    conn_ops = ops(driver)
    assert "commit" not in conn_ops[: conn_ops.index("reset")] or op == "commit"
    assert "cancel" in conn_ops  # the server was told to stop what it was doing
    assert conn_ops.index("cancel") < conn_ops.index("reset")
    assert len(driver.connections) == 1  # recovered, not replaced


async def test_cancel_while_waiting_in_queue_loses_no_lease() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        release = trio.Event()

        async with trio.open_nursery() as nursery:
            await nursery.start(hold_until, pool, release)
            with trio.move_on_after(0.01) as scope:
                async with pool.run():
                    pytest.fail("must not get a connection")  # pragma: no cover
            assert scope.cancelled_caught
            assert pool.statistics().waiting == 0
            release.set()
        await settle()
        stats = pool.statistics()
        assert (stats.idle, stats.busy, stats.waiting, stats.checkouts) == (1, 0, 0, 1)
        async with pool.run() as conn:
            await conn.execute("works")


async def test_cancel_in_user_code_inside_transaction_rolls_back_in_actor() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        inside = trio.Event()
        with trio.CancelScope() as scope:

            async def cancel_soon() -> None:
                await inside.wait()
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_soon)
                async with pool.transaction() as tx:
                    await tx.execute("update")
                    inside.set()
                    await trio.sleep_forever()
        assert tx.committed is False
        await settle()
        assert pool.statistics().idle == 1
    conn_ops = ops(driver)
    assert conn_ops == ["begin", "execute", "reset"]  # no cancel needed: no call was in flight


async def test_deadline_expiry_mid_query_is_a_cancellation() -> None:
    driver = ScriptedDriver()
    entered = trio.Event()
    driver.script("fetch", hang(entered))
    async with open_pool(driver, size=1) as pool:
        with trio.move_on_after(0.05):
            await pool.fetch_all("select pg_sleep(10)")
        await settle()
        assert pool.statistics().idle == 1
        assert await pool.fetch_all("select 1") == []


async def test_recovery_failure_replaces_connection() -> None:
    driver = ScriptedDriver()
    entered = trio.Event()
    driver.script("execute", hang(entered))
    driver.script("reset", DriverLost("cannot drain"))
    async with open_pool(driver, size=1) as pool:
        with trio.move_on_after(0.05):
            await pool.execute("stuck")
        await settle()
        stats = pool.statistics()
        assert stats.idle == 1 and stats.connects == 2 and stats.disconnects == 1
    assert driver.connections[0].closed


async def test_recovery_that_hangs_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    driver = ScriptedDriver()
    entered = trio.Event()
    driver.script("execute", hang(entered))
    driver.script("reset", hang(trio.Event()))
    limits = SafetyLimits(cleanup_timeout=2.0)
    # queue_target large: this test waits through the recovery, CoDel must not shed it.
    async with open_pool(driver, size=1, limits=limits, queue_target=5.0) as pool:
        with trio.move_on_after(0.05):
            await pool.execute("stuck")
        t0 = trio.current_time()
        async with pool.run() as conn:  # waits for the actor to give up and reconnect
            await conn.execute("fresh")
        assert 1.9 <= trio.current_time() - t0 <= 2.5
        assert len(driver.connections) == 2


async def test_client_that_catches_cancellation_and_continues_gets_recovery_first() -> None:
    driver = ScriptedDriver()
    entered = trio.Event()
    driver.script("execute", hang(entered))
    async with open_pool(driver, size=1) as pool:
        async with pool.run() as conn:
            with trio.move_on_after(0.05):
                await conn.execute("stuck")
            # The protocol state is unknown: the next call cancels and drains first.
            assert conn.status() == "error"
            assert await conn.execute("after") == 0
            assert conn.status() == "idle"
    conn_ops = ops(driver)
    assert conn_ops == ["execute", "cancel", "reset", "execute"]


async def test_query_timeout(autojump_clock: trio.testing.MockClock) -> None:
    driver = ScriptedDriver()
    driver.script("fetch", hang(trio.Event()))
    async with open_pool(driver, size=1, limits=SafetyLimits(query_timeout=3.0)) as pool:
        with pytest.raises(QueryTimeout, match=r"query_timeout=3\.0") as info:
            await pool.fetch_all("select slow()")
        assert isinstance(info.value, TimeoutError)
        assert pool.statistics().query_timeouts == 1
        await settle()
        assert await pool.fetch_all("select fast()") == []
    assert "cancel" in driver.ops()


async def test_cancelled_waiter_never_receives_a_connection_later() -> None:
    """A hand-over racing with a cancellation must not lose the lease."""
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        for _ in range(20):
            got = trio.Event()
            waiter_scope = trio.CancelScope()

            async def waiter(scope: trio.CancelScope) -> None:
                with scope:
                    async with pool.run():
                        pass

            async with trio.open_nursery() as nursery:
                await nursery.start(hold_until, pool, got)
                nursery.start_soon(waiter, waiter_scope)
                await settle()
                got.set()  # the holder returns: the connection goes to the waiter...
                waiter_scope.cancel()  # ...which is cancelled in the same scheduling round
            await settle()
            stats = pool.statistics()
            assert (stats.idle, stats.busy, stats.waiting) == (1, 0, 0)


# -- one handle, several tasks --------------------------------------------------------------------


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
    conn_ops = driver.ops(1, exclude={"ping"})
    # Task 2 ran cancel/reset/execute on the connection while task 1 was mid-reset.
    assert len(refused) == 1, f"no PoolError for concurrent use; ops {conn_ops}, done {done}"
