"""Supervisor: restart of a crashing actor with backoff, restart intensity, shutdown, and the
no-ExceptionGroup rule of every public context manager."""

from __future__ import annotations

import itertools
import traceback

import pytest
import trio
import trio.testing
from helpers import driver_bug, hold_until, ops

from actors.driver import ConnectionLost as DriverLost
from actors.scripted import Call, ScriptedDriver
from supervisor import (
    Backoff,
    Connection,
    ConnectionLost,
    LogEntry,
    PoolClosed,
    PoolError,
    SafetyLimits,
    open_pool,
)


async def test_crashed_actor_is_restarted_with_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    times: list[float] = []

    async def fail(call: Call) -> None:
        times.append(trio.current_time())
        raise DriverLost("refused")

    async def ok(call: Call) -> None:
        times.append(trio.current_time())

    # backoff "stop": a failed connect ends the actor (a crash); the supervisor restarts it
    # after its own backoff delay.
    driver.script("connect", fail, fail, ok)
    entries: list[LogEntry] = []
    async with open_pool(
        driver,
        size=1,
        backoff=Backoff("stop"),
        log=entries.append,
        name="crashy",
        queue_target=10.0,
    ) as pool:
        async with pool.run() as conn:
            await conn.execute("works after restarts")
        stats = pool.statistics()
        assert stats.restarts == 2
        assert stats.size == 1
    assert [e.call for e in entries if e.call in ("crash", "restart")] == [
        "crash",
        "restart",
        "crash",
        "restart",
    ]
    crash = next(e for e in entries if e.call == "crash")
    assert crash.pool == "crashy" and isinstance(crash.error, Exception)
    # restart delays follow the pool's backoff policy ("stop" restarts at once)
    assert times[1] - times[0] < 0.01


async def test_restart_intensity_fails_the_pool_with_a_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    driver.script("connect", *[DriverLost("server is down")] * 10)
    with pytest.raises(PoolClosed) as info:
        async with open_pool(
            driver,
            size=1,
            backoff=Backoff("stop"),
            max_restarts=2,
            restart_window=60,
            name="doomed",
        ) as pool:
            await trio.sleep_forever()  # cancelled when the pool fails
    message = str(info.value)
    assert "'doomed'" in message
    assert "3 actor crashes within 60s exceed max_restarts=2" in message
    assert "server is down" in message
    assert not isinstance(info.value, BaseExceptionGroup)
    with pytest.raises(PoolClosed, match="max_restarts"):
        await pool.fetch_all("select 1")


async def test_connect_failures_back_off_and_recover(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    times: list[float] = []

    async def fail(call: Call) -> None:
        times.append(trio.current_time())
        raise DriverLost("refused")

    driver.script("connect", fail, fail, fail)
    async with open_pool(
        driver, size=1, backoff=Backoff("exp", min=1.0, max=30.0), queue_target=100.0
    ) as pool:
        t0 = trio.current_time()
        assert await pool.fetch_all("select 1") == []
        waited = trio.current_time() - t0
        assert pool.statistics().restarts == 0  # connect failures are not crashes
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
    assert gaps == [1.0, 2.0]
    assert 6.9 <= waited <= 7.1  # 1 + 2 + 4


async def test_body_exception_comes_out_as_itself() -> None:
    driver = ScriptedDriver()
    with pytest.raises(KeyError) as info:
        async with open_pool(driver, size=2):
            raise KeyError("mine")
    assert type(info.value) is KeyError


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


async def test_shutdown_closes_every_connection_and_leaks_no_task() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=3) as pool:
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().idle == 3
    assert all(c.closed for c in driver.connections)
    assert len(driver.connections) == 3
    with pytest.raises(PoolClosed, match="closed"):
        async with pool.run():
            pass  # pragma: no cover


async def test_shutdown_waits_for_held_handles_within_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    finished = trio.Event()
    async with trio.open_nursery() as nursery:
        async with open_pool(driver, size=1, limits=SafetyLimits(shutdown_grace=10)) as pool:
            holding = trio.Event()

            async def holder() -> None:
                async with pool.run() as conn:
                    holding.set()
                    await trio.sleep(3)
                    await conn.execute("finishes within grace")
                finished.set()

            nursery.start_soon(holder)
            await holding.wait()
            t0 = trio.current_time()
        assert finished.is_set()
        assert 2.9 <= trio.current_time() - t0 <= 3.1
    assert driver.ops().count("execute") == 1


async def test_shutdown_revokes_handles_held_past_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    outcome: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        async with open_pool(driver, size=1, limits=SafetyLimits(shutdown_grace=1)) as pool:
            holding = trio.Event()

            async def holder() -> None:
                async with pool.run() as conn:
                    holding.set()
                    await trio.sleep(5)
                    try:
                        await conn.execute("too late")
                    except PoolError as exc:
                        outcome.append(exc)

            nursery.start_soon(holder)
            await holding.wait()
            t0 = trio.current_time()
        assert 0.9 <= trio.current_time() - t0 <= 1.1
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionLost)
    assert driver.ops().count("execute") == 0
    assert all(c.closed for c in driver.connections)


async def test_waiters_get_pool_closed_at_shutdown() -> None:
    driver = ScriptedDriver()
    errors: list[BaseException] = []
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        async with open_pool(driver, size=1, limits=SafetyLimits(shutdown_grace=0)) as pool:

            async def waiter() -> None:
                try:
                    async with pool.run():
                        pass  # pragma: no cover
                except PoolClosed as exc:
                    errors.append(exc)

            await nursery.start(hold_until, pool, release)
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().waiting == 1
        assert len(errors) == 1 and "closing" in str(errors[0])
        release.set()


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


async def test_log_entries_for_queries_with_params_redacted() -> None:
    driver = ScriptedDriver()
    driver.script("fetch", [(1,), (2,)])
    entries: list[LogEntry] = []
    async with open_pool(driver, size=1, log=entries.append, name="logged") as pool:
        await pool.fetch_all("select * from t where a = ?", ("secret-value",))
    entry = next(e for e in entries if e.call == "fetch_all")
    assert entry.pool == "logged"
    assert entry.query == "select * from t where a = ?"
    assert "secret-value" not in repr(entry)
    assert entry.result == 2
    assert entry.pool_time is not None and entry.connection_time is not None
    assert [e.call for e in entries].count("connect") == 1


async def test_log_hook_exceptions_never_break_queries() -> None:
    def bad_hook(entry: LogEntry) -> None:
        raise RuntimeError("hook bug")

    driver = ScriptedDriver()
    async with open_pool(driver, size=1, log=bad_hook) as pool:
        assert await pool.execute("still works") == 0


async def test_waiters_are_told_the_connect_error_not_overload(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from supervisor import CheckoutTimeout, QueueDropped

    driver = ScriptedDriver(options={"password": "hunter2"})
    driver.script("connect", *[DriverLost("connection refused (password hunter2)")] * 50)
    limits = SafetyLimits(checkout_timeout=3)
    async with open_pool(driver, size=1, limits=limits, name="down") as pool:
        with pytest.raises(QueueDropped) as dropped:
            await pool.fetch_all("select 1")
        text = str(dropped.value)
        assert "no connection could be made" in text and "connection refused" in text
        assert "hunter2" not in text
        with pytest.raises(CheckoutTimeout, match="connection refused"):
            async with pool.run(timeout=0.5):
                pass  # pragma: no cover


async def test_the_waiter_shed_as_the_database_comes_back_is_told_no_connection_could_be_made(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from supervisor import QueueDropped

    driver = ScriptedDriver()
    driver.script("connect", *[DriverLost("connection refused")] * 3)
    errors: list[str] = []
    limits = SafetyLimits(checkout_timeout=None)
    backoff = Backoff("exp", 0.5, 0.5)
    async with open_pool(driver, size=1, limits=limits, backoff=backoff, name="back") as pool:

        async def client() -> None:
            try:
                async with pool.run():
                    pass
            except QueueDropped as exc:
                errors.append(str(exc))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(client)  # shed by the periodic poll at t = 1 s
            await trio.sleep(1.2)
            for _ in range(5):
                nursery.start_soon(client)  # waiting when the connect at t = 1.5 s succeeds
        assert pool.statistics().connects == 1  # the database came back
    assert errors, "waiters kept waiting over 2 x queue_target by failed connects are shed"
    for text in errors:
        assert "no connection could be made while it waited" in text
        assert "connection refused" in text
        assert "overloaded" not in text


async def test_an_unexpected_driver_exception_is_connection_lost_and_an_actor_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    bug = KeyError("a driver bug")
    driver.script("execute", driver_bug(driver, bug))
    entries: list[LogEntry] = []
    async with open_pool(driver, size=1, name="buggy", log=entries.append) as pool:
        with pytest.raises(ConnectionLost) as info:
            async with pool.transaction() as tx:
                await tx.execute("insert into t values (1)")
        assert str(info.value) == (
            "pool 'buggy': the driver raised an unexpected exception during execute (KeyError: "
            "'a driver bug'); the connection is discarded"
        )
        assert info.value.__cause__ is bug
        await pool.wait()
        assert await pool.execute("works after the restart") == 0
        stats = pool.statistics()
        assert (stats.restarts, stats.connects, stats.size) == (1, 2, 1)
    # the actor closed the dead connection, crashed, and was restarted on a fresh one
    assert driver.ops() == [
        "connect", "begin", "execute", "close", "connect", "execute", "close",
    ]
    crash = next(e for e in entries if e.call == "crash")
    assert isinstance(crash.error, Exception) and "a driver bug" in str(crash.error)


async def test_a_driver_that_keeps_crashing_fails_the_pool_once_restart_intensity_is_exceeded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    driver.script("fetch", *[driver_bug(driver, RuntimeError("always broken"))] * 10)
    with pytest.raises(PoolClosed, match=r"max_restarts=2.*RuntimeError: always broken"):
        async with open_pool(driver, size=1, max_restarts=2, restart_window=60,
                             queue_target=10) as pool:
            for _ in range(10):
                with pytest.raises(ConnectionLost, match="always broken"):
                    async with pool.run() as conn:
                        await conn.fetch_all("select 1")


async def test_a_driver_crash_is_not_retried_by_one_shots_or_at_begin(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    driver.script("fetch", driver_bug(driver, RuntimeError("bug in fetch")))
    driver.script("begin", driver_bug(driver, RuntimeError("bug in begin")))
    async with open_pool(driver, size=2, queue_target=10) as pool:
        with pytest.raises(ConnectionLost, match="bug in fetch"):
            await pool.fetch_all("select 1")  # a read, retried once on a lost connection
        with pytest.raises(ConnectionLost, match="bug in begin"):
            async with pool.transaction():  # a lost BEGIN restarts on a fresh connection
                pass  # pragma: no cover
        await pool.wait()
        stats = pool.statistics()
        assert (stats.restarts, stats.transaction_restarts) == (2, 0)
    assert ops(driver) == ["fetch", "begin"]


async def test_after_a_driver_crash_the_handle_sends_nothing_more() -> None:
    driver = ScriptedDriver()
    driver.script("execute", driver_bug(driver, RuntimeError("bug")))
    async with open_pool(driver, size=1) as pool:
        async with pool.run() as conn:
            with pytest.raises(ConnectionLost, match="unexpected exception"):
                await conn.execute("update a")
            with pytest.raises(ConnectionLost, match="refusing to run execute: update b"):
                await conn.execute("update b")
            async with conn.stream("select 1") as rows:
                with pytest.raises(ConnectionLost, match="refusing to run stream"):
                    await rows.__anext__()
    assert ops(driver) == ["execute"]


async def test_a_callers_exception_raised_by_the_driver_between_messages_is_its_own() -> None:
    # A parameter adapter of the caller's, run by the driver before anything is sent: the
    # driver is still idle. Not a crash (no restart, or a few bad calls would fail the pool):
    # the caller gets its own exception, and the connection and transaction are as they were.
    driver = ScriptedDriver()
    driver.script("fetch", *[KeyError("adapter bug")] * 20)
    driver.script("execute", KeyError("adapter bug"))
    async with open_pool(driver, size=2, max_restarts=2) as pool:
        for _ in range(20):
            with pytest.raises(KeyError, match="adapter bug"):
                await pool.fetch_all("select ?", (object(),))
        async with pool.transaction() as tx:
            with pytest.raises(KeyError, match="adapter bug"):
                await tx.execute("insert into t values (?)", (object(),))
            await tx.execute("insert into t values (1)")
        assert tx.committed
        stats = pool.statistics()
        assert stats.restarts == 0 and stats.connects == 2
    assert ops(driver) == ["fetch"] * 20 + ["begin", "execute", "execute", "commit"]


async def test_a_secret_in_a_callers_exception_is_scrubbed_and_not_chained() -> None:
    driver = ScriptedDriver(options={"password": "hunter2"})
    driver.script("fetch", RuntimeError("bad state for password hunter2"))
    async with open_pool(driver, size=1) as pool:
        with pytest.raises(PoolError) as info:
            await pool.fetch_all("select 1")
    printed = "".join(traceback.format_exception(info.value))
    assert "hunter2" not in printed and "RuntimeError: bad state for password ***" in printed
    assert info.value.__cause__ is None and info.value.__context__ is None


async def test_a_secret_in_an_unexpected_driver_exception_is_scrubbed_and_not_chained() -> None:
    driver = ScriptedDriver(options={"password": "hunter2"})
    driver.script("fetch", driver_bug(driver, RuntimeError("bad state for password hunter2")))
    async with open_pool(driver, size=1) as pool:
        async with pool.run() as conn:
            with pytest.raises(ConnectionLost) as info:
                await conn.fetch_all("select 1")
    assert "hunter2" not in str(info.value) and "RuntimeError" in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None


async def test_a_secret_anywhere_in_the_crash_chain_reaches_neither_client_nor_pool_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver(options={"password": "hunter2"})
    inner = RuntimeError("internal state error")
    inner.__cause__ = OSError("auth with password hunter2 failed")
    driver.script("fetch", driver_bug(driver, inner))
    with pytest.raises(PoolClosed) as failed:
        async with open_pool(driver, size=1, max_restarts=0) as pool:
            with pytest.raises(ConnectionLost) as info:
                async with pool.run() as conn:
                    await conn.fetch_all("select 1")
            await trio.sleep_forever()  # cancelled when the pool fails
    for exc in (info.value, failed.value):
        printed = "".join(traceback.format_exception(exc))
        assert "internal state error" in printed and "hunter2" not in printed


async def test_a_driver_crash_in_a_sandbox_crashes_the_actor_of_its_one_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from supervisor.testing import sandbox

    driver = ScriptedDriver()
    driver.script("execute", driver_bug(driver, RuntimeError("bug")))
    async with open_pool(driver, size=1) as pool:
        async with sandbox(pool):
            with pytest.raises(ConnectionLost, match="unexpected exception"):
                await pool.execute("insert into t values (1)")
            with pytest.raises(ConnectionLost, match="sandbox's connection was lost"):
                await pool.execute("insert into t values (2)")
        await pool.wait()
        stats = pool.statistics()
        assert (stats.restarts, stats.connects) == (1, 2)
    assert ops(driver) == ["begin", "savepoint", "execute"]


async def test_waiters_shed_while_a_crashed_actor_restarts_are_told_of_the_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from supervisor import QueueDropped

    driver = ScriptedDriver()
    driver.script("fetch", driver_bug(driver, RuntimeError("bug in fetch")))
    backoff = Backoff("exp", 2.0, 2.0)  # the restart waits 2 s: longer than the queue allows
    async with open_pool(driver, size=1, backoff=backoff, name="one") as pool:
        await pool.wait()
        with pytest.raises(ConnectionLost, match="bug in fetch"):
            await pool.fetch_all("select 1")
        with pytest.raises(QueueDropped) as info:
            await pool.fetch_all("select 1")
    text = str(info.value)
    assert "no connection could be made while it waited (connection #0's actor crashed" in text
    assert "RuntimeError: bug in fetch" in text and "overloaded" not in text


async def test_a_callers_exception_inside_a_sandbox_leaves_the_sandbox_working() -> None:
    from supervisor.testing import sandbox

    driver = ScriptedDriver()
    driver.script("execute", KeyError("adapter bug"))
    async with open_pool(driver, size=1) as pool:
        async with sandbox(pool):
            with pytest.raises(KeyError, match="adapter bug"):
                await pool.execute("insert into t values (?)", (object(),))
            assert await pool.execute("insert into t values (1)") == 0
        assert pool.statistics().restarts == 0
    assert ops(driver) == [
        "begin", "savepoint", "execute", "release", "savepoint", "execute", "rollback",
    ]
