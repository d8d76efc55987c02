"""The actors' timers, with the scripted driver and the autojump clock.

Idle pings, reconnect after a failed ping, max_lifetime replacement with jitter, hold_timeout
revocation and the hold-deadline verbs (adjust_timeout / reset_timeout), ``kill()``,
``disconnect_all(interval)`` and elastic sizing. Lifecycle events are observed through the
``log=`` hook, stamped with the virtual time; ordering uses events, never sleeps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import trio
import trio.testing
from helpers import hang, held, settle

import supervisor
from actors.driver import ConnectionLost as DriverConnectionLost
from actors.scripted import Call, ScriptedDriver, blocking
from supervisor import LogEntry, Pool, PoolError, SafetyLimits, open_pool


class Recorder:
    """A ``log=`` hook that keeps every entry with its virtual time and lets a test wait for
    the n-th occurrence of an event."""

    def __init__(self) -> None:
        self.entries: list[tuple[float, LogEntry]] = []
        self._waits: list[tuple[str, int, trio.Event]] = []

    def __call__(self, entry: LogEntry) -> None:
        self.entries.append((trio.current_time(), entry))
        for call, n, event in self._waits:
            if self.count(call) >= n:
                event.set()

    def count(self, call: str) -> int:
        return sum(1 for _, e in self.entries if e.call == call)

    def times(self, call: str) -> list[float]:
        return [t for t, e in self.entries if e.call == call]

    def of(self, call: str) -> list[LogEntry]:
        return [e for _, e in self.entries if e.call == call]

    async def wait_for(self, call: str, n: int) -> None:
        if self.count(call) >= n:
            await trio.lowlevel.checkpoint()
            return
        event = trio.Event()
        self._waits.append((call, n, event))
        await event.wait()


def timed(times: list[float]) -> Callable[[Call], Coroutine[Any, Any, None]]:
    """A script step that records when it ran and succeeds."""

    async def step(call: Call) -> None:
        times.append(trio.current_time())
        await trio.lowlevel.checkpoint()

    return step


def assert_all_idle(pool: Pool, size: int) -> None:
    stats = pool.statistics()
    assert (stats.size, stats.idle, stats.busy, stats.connecting, stats.waiting) == (
        size,
        size,
        0,
        0,
        0,
    ), stats


# -- idle ping ------------------------------------------------------------------------------------


async def test_idle_connection_is_pinged_every_idle_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    pings: list[float] = []
    driver.script("ping", *(timed(pings) for _ in range(3)))
    async with open_pool(driver, size=1, idle_interval=2.0) as pool:
        await trio.sleep(6.5)
        assert pings == pytest.approx([2.0, 4.0, 6.0])
        assert driver.ops(exclude={"ping"}) == ["connect"]
        assert_all_idle(pool, 1)


async def test_busy_and_recently_used_connections_are_not_pinged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1, idle_interval=1.0) as pool:
        async with pool.run() as conn:  # busy for 5 s: no ping
            await trio.sleep(5)
            await conn.execute("still mine")
        for _ in range(10):  # used every 0.5 s: never idle for a whole interval
            await trio.sleep(0.5)
            async with pool.run() as conn:
                await conn.execute("q")
        assert "ping" not in driver.ops()
        await trio.sleep(1.2)
        assert driver.ops().count("ping") == 1


async def test_failed_ping_reconnects_and_the_pool_still_serves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    driver.script("ping", DriverConnectionLost("server closed the connection"))
    log = Recorder()
    async with open_pool(driver, size=1, idle_interval=1.0, log=log, name="pinged") as pool:
        await log.wait_for("connect", 2)
        assert log.times("ping_failed") == pytest.approx([1.0])
        assert log.times("connect") == pytest.approx([0.0, 1.0])  # at once, no backoff
        assert driver.ops(1) == ["ping", "close"]
        assert driver.connections[0].closed
        assert (await pool.fetch_all("select 1")) == []
        assert driver.calls[-1].conn == 2
        stats = pool.statistics()
        assert (stats.connects, stats.disconnects) == (2, 1)
        failed = log.of("ping_failed")[0]
        assert failed.pool == "pinged"
        assert isinstance(failed.error, DriverConnectionLost)
        await settle()
        assert_all_idle(pool, 1)


async def test_ping_that_hangs_is_bounded_and_reconnects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    driver.script("ping", blocking(trio.Event()))  # never answers
    log = Recorder()
    async with open_pool(
        driver, size=1, idle_interval=1.0, log=log, limits=SafetyLimits(connect_timeout=3)
    ) as pool:
        await log.wait_for("connect", 2)
        assert log.times("ping_failed") == pytest.approx([4.0])  # 1 s idle + 3 s bound
        assert (await pool.fetch_all("select 1")) == []


# -- max_lifetime ---------------------------------------------------------------------------------


async def test_idle_connection_replaced_after_max_lifetime_with_jitter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Recorder()
    async with open_pool(ScriptedDriver(), size=1, max_lifetime=10.0, log=log, seed=3) as pool:
        await log.wait_for("connect", 4)
        connects = log.times("connect")
        lifetimes = [b - a for a, b in itertools.pairwise(connects)]
        assert len(lifetimes) == 3
        # Replaced at once when due (idle), after max_lifetime minus up to 5 % jitter.
        assert all(9.5 - 1e-9 <= life <= 10.0 + 1e-9 for life in lifetimes), lifetimes
        assert len({round(life, 9) for life in lifetimes}) > 1  # each lifetime drawn anew
        assert pool.statistics().disconnects == 3


async def test_lifetime_jitter_spreads_expiries_across_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Recorder()
    async with open_pool(
        ScriptedDriver(), size=6, max_lifetime=100.0, log=log, idle_interval=1000, seed=11
    ):
        await log.wait_for("connect", 12)
    first, second = log.times("connect")[:6], log.times("connect")[6:12]
    assert first == [0.0] * 6
    assert all(95.0 - 1e-9 <= t <= 100.0 + 1e-9 for t in second), second
    assert len(set(second)) == 6  # not all at once


async def test_lifetime_jitter_is_reproducible_with_a_seed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    results = []
    for _ in range(2):
        log = Recorder()
        async with open_pool(
            ScriptedDriver(), size=3, max_lifetime=50.0, log=log, idle_interval=1000, seed=99
        ):
            await log.wait_for("connect", 6)
        results.append([t - log.times("connect")[0] for t in log.times("connect")])
    assert results[0] == results[1]


async def test_busy_connection_replaced_after_it_is_returned(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    log = Recorder()
    async with open_pool(driver, size=1, max_lifetime=10.0, log=log) as pool:
        async with pool.run() as conn:
            await trio.sleep(12)  # past its lifetime while held: not taken away
            assert await conn.execute("late but fine") == 0
            assert driver.calls[-1].conn == 1
            await trio.sleep(3)
            assert log.count("connect") == 1
            returned = trio.current_time()
        await log.wait_for("connect", 2)
        assert log.times("connect")[1] == pytest.approx(returned)
        assert driver.connections[0].closed
        assert pool.statistics().revoked == 0
        await settle()
        assert_all_idle(pool, 1)


async def test_no_client_fails_while_connections_are_replaced_by_lifetime(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Recorder()
    done = 0
    async with open_pool(
        ScriptedDriver(record=False), size=3, max_lifetime=5.0, log=log, seed=5
    ) as pool:

        async def client(hold: float) -> None:
            nonlocal done
            for _ in range(100):
                async with pool.run() as conn:
                    await conn.execute("work")
                    await trio.sleep(hold)
                await trio.sleep(0.05)
                done += 1

        async with trio.open_nursery() as nursery:
            for hold in (0.1, 0.2, 0.3, 0.7):
                nursery.start_soon(client, hold)
        assert done == 400
        stats = pool.statistics()
        assert stats.connects >= 3 + 3 * 5  # every connection replaced several times
        assert stats.dropped == stats.timeouts == stats.revoked == 0


# -- hold_timeout ---------------------------------------------------------------------------------


async def test_hold_timeout_revokes_and_next_call_raises_connection_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    log = Recorder()
    async with open_pool(
        driver, size=1, name="holdy", log=log, limits=SafetyLimits(hold_timeout=5)
    ) as pool:
        async with pool.run() as conn:
            await conn.execute("in time")
            await trio.sleep(6)
            with pytest.raises(supervisor.ConnectionLost) as info:
                await conn.execute("too late")
            with pytest.raises(supervisor.ConnectionLost):
                await conn.fetch_all("still too late")
            assert conn.status() == "error"
        err = info.value
        assert isinstance(err, PoolError)
        assert isinstance(err, DriverConnectionLost)
        assert "holdy" in str(err)
        assert "hold" in str(err)
        assert log.times("revoked") == pytest.approx([5.0])
        assert [c.args[0] for c in driver.calls if c.op == "execute"] == ["in time"]
        # The pool heals: the connection was replaced, the new one serves.
        await settle()
        assert_all_idle(pool, 1)
        assert pool.statistics().revoked == 1
        assert driver.connections[0].closed
        async with pool.run() as conn:
            await conn.execute("next client")
        assert driver.calls[-1].conn == 2


async def test_hold_timeout_interrupts_an_in_flight_call_promptly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    driver.script("execute", blocking(trio.Event()))  # a query that never returns
    async with open_pool(driver, size=1, limits=SafetyLimits(hold_timeout=5)) as pool:
        start = trio.current_time()
        async with pool.run() as conn:
            with pytest.raises(supervisor.ConnectionLost):
                await conn.execute("stuck")
            assert trio.current_time() - start == pytest.approx(5.0)
        await settle()
        assert_all_idle(pool, 1)
        assert await pool.execute("after") == 0


async def test_hold_timeout_in_a_transaction_loses_the_work(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1, limits=SafetyLimits(hold_timeout=5)) as pool:
        with pytest.raises(supervisor.ConnectionLost):
            async with pool.transaction() as tx:
                await tx.execute("insert")
                await trio.sleep(6)
                await tx.execute("insert more")
        assert "commit" not in driver.ops()
        await settle()
        assert_all_idle(pool, 1)


async def test_returning_before_the_hold_deadline_is_fine(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Recorder()
    async with open_pool(
        ScriptedDriver(), size=1, log=log, limits=SafetyLimits(hold_timeout=5)
    ) as pool:
        for _ in range(4):
            async with pool.run() as conn:
                await trio.sleep(4)
                await conn.execute("ok")
        await trio.sleep(10)
        assert log.count("revoked") == 0
        assert pool.statistics().connects == 1


async def test_adjust_timeout_moves_the_deadline_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Recorder()
    async with open_pool(
        ScriptedDriver(), size=1, log=log, limits=SafetyLimits(hold_timeout=5)
    ) as pool:
        async with pool.run() as conn:
            await trio.sleep(4)
            conn.adjust_timeout(3)  # deadline 5 -> 8
            await trio.sleep(3.5)  # t = 7.5
            await conn.execute("still held")
            await trio.sleep(1)  # t = 8.5
            with pytest.raises(supervisor.ConnectionLost):
                await conn.execute("revoked")
        assert log.times("revoked") == pytest.approx([8.0])


async def test_adjust_timeout_negative_moves_it_earlier(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Recorder()
    async with open_pool(
        ScriptedDriver(), size=1, log=log, limits=SafetyLimits(hold_timeout=10)
    ) as pool:
        async with pool.run() as conn:
            conn.adjust_timeout(-7)  # deadline 10 -> 3
            await trio.sleep(4)
            with pytest.raises(supervisor.ConnectionLost):
                await conn.execute("revoked")
        assert log.times("revoked") == pytest.approx([3.0])


async def test_reset_timeout_sets_the_deadline_from_now(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Recorder()
    async with open_pool(
        ScriptedDriver(), size=1, log=log, limits=SafetyLimits(hold_timeout=5)
    ) as pool:
        async with pool.run() as conn:
            await trio.sleep(4)
            conn.reset_timeout(10)  # deadline 14
            await trio.sleep(9)  # t = 13
            await conn.execute("still held")
            await trio.sleep(1.5)  # t = 14.5
            with pytest.raises(supervisor.ConnectionLost):
                await conn.execute("revoked")
        assert log.times("revoked") == pytest.approx([14.0])


async def test_reset_timeout_earlier_wakes_the_actor_early(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Recorder()
    async with open_pool(
        ScriptedDriver(),
        size=1,
        log=log,
        idle_interval=100,
        limits=SafetyLimits(hold_timeout=50),
    ) as pool:
        async with pool.run() as conn:
            await trio.sleep(1)
            conn.reset_timeout(1)  # deadline 2 instead of 50
            await trio.sleep(1.5)
            with pytest.raises(supervisor.ConnectionLost):
                await conn.execute("revoked")
        assert log.times("revoked") == pytest.approx([2.0])


async def test_hold_deadline_verbs_without_hold_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No hold_timeout: there is no deadline until a verb sets one; then a call in flight is
    interrupted when it passes."""
    driver = ScriptedDriver()
    log = Recorder()
    async with open_pool(driver, size=1, log=log, idle_interval=100) as pool:
        async with pool.run() as conn:
            await trio.sleep(50)
            await conn.execute("no deadline")
            conn.adjust_timeout(2)  # now + 2
            driver.script("execute", blocking(trio.Event()))
            with pytest.raises(supervisor.ConnectionLost):
                await conn.execute("stuck")
            assert trio.current_time() == pytest.approx(52.0)
        assert log.times("revoked") == pytest.approx([52.0])
        await settle()
        assert_all_idle(pool, 1)


# -- kill() ---------------------------------------------------------------------------------------


async def test_kill_closes_the_connection_and_the_actor_reconnects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    log = Recorder()
    async with open_pool(driver, size=1, log=log, name="killer") as pool:
        async with pool.run() as conn:
            await conn.execute("before")
            conn.kill()
            conn.kill()  # twice: harmless
            with pytest.raises(supervisor.ConnectionLost, match="killer"):
                await conn.execute("after")
            assert conn.status() == "error"
        # The block ended normally; the connection is replaced at once.
        await log.wait_for("connect", 2)
        assert log.times("connect") == pytest.approx([0.0, 0.0])
        assert driver.connections[0].closed
        assert [c.args[0] for c in driver.calls if c.op == "execute"] == ["before"]
        await settle()
        assert_all_idle(pool, 1)
        async with pool.run() as conn:
            await conn.execute("fresh")
        assert driver.calls[-1].conn == 2


async def test_kill_from_another_task_interrupts_the_holder_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    started = trio.Event()
    driver.script("execute", hang(started))
    async with open_pool(driver, size=1, idle_interval=100) as pool:
        handles: list[supervisor.Connection] = []
        outcome: list[BaseException] = []

        async def holder() -> None:
            async with pool.run() as conn:
                handles.append(conn)
                try:
                    await conn.execute("stuck")
                except supervisor.ConnectionLost as exc:
                    outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            await started.wait()
            killed_at = trio.current_time()
            handles[0].kill()
        assert len(outcome) == 1
        assert trio.current_time() == pytest.approx(killed_at)
        await settle()
        assert_all_idle(pool, 1)
        assert pool.statistics().connects == 2


# -- disconnect_all -------------------------------------------------------------------------------


async def test_disconnect_all_spreads_replacements_over_the_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Recorder()
    async with open_pool(ScriptedDriver(), size=4, log=log, idle_interval=100) as pool:
        await log.wait_for("connect", 4)
        await trio.sleep(10)
        await pool.disconnect_all(4.0)
        await log.wait_for("connect", 8)
        replaced = sorted(log.times("connect")[4:])
        assert replaced == pytest.approx([10.0, 11.0, 12.0, 13.0])
        assert all(10.0 <= t <= 14.0 for t in replaced)
        await settle()
        assert_all_idle(pool, 4)
        assert pool.statistics().disconnects == 4


async def test_disconnect_all_zero_interval_replaces_everything_now(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    log = Recorder()
    async with open_pool(driver, size=3, log=log, idle_interval=100) as pool:
        await log.wait_for("connect", 3)
        await pool.disconnect_all()
        await log.wait_for("connect", 6)
        assert log.times("connect") == [0.0] * 6
        assert [c.closed for c in driver.connections] == [True] * 3 + [False] * 3


async def test_disconnect_all_replaces_busy_connections_on_return_and_fails_no_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver(record=False)
    log = Recorder()
    done = 0
    async with open_pool(driver, size=4, log=log, idle_interval=100, name="failover") as pool:
        async with held(pool) as release:  # busy across the whole interval
            await settle()
            await pool.disconnect_all(2.0)

            async def client() -> None:
                nonlocal done
                for _ in range(40):
                    async with pool.run() as conn:
                        await conn.execute("work")
                        await trio.sleep(0.1)
                    done += 1

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(client)
            assert done == 120
            assert log.count("connect") == 4 + 3  # the held one is not replaced yet
            release.set()
        await log.wait_for("connect", 8)
        stats = pool.statistics()
        assert (stats.dropped, stats.timeouts, stats.revoked) == (0, 0, 0)
        await settle()
        assert_all_idle(pool, 4)
        assert len(driver.live) == 4


@pytest.mark.parametrize("bad", [-1, "2", None])
async def test_disconnect_all_rejects_a_bad_interval(
    bad: Any, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(ScriptedDriver(), size=1, name="dc") as pool:
        with pytest.raises(supervisor.ConfigError, match="dc"):
            await pool.disconnect_all(bad)


# -- elastic sizing -------------------------------------------------------------------------------


async def test_elastic_pool_grows_under_load(autojump_clock: trio.testing.MockClock) -> None:
    async with open_pool(
        ScriptedDriver(), min_size=1, max_size=4, max_idle=60, idle_interval=100
    ) as pool:
        await settle()
        stats = pool.statistics()
        assert (stats.size, stats.min_size, stats.max_size) == (1, 1, 4)
        release = trio.Event()
        entered = 0

        async def client() -> None:
            nonlocal entered
            async with pool.run():
                entered += 1
                await release.wait()

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(client)
            await settle()
            stats = pool.statistics()
            assert (stats.size, stats.busy, stats.waiting) == (4, 4, 2)
            assert entered == 4
            release.set()
        assert entered == 6
        assert pool.statistics().size == 4
        assert pool.statistics().connects == 4


async def grow_then_release(pool: Pool, n: int, *, stagger: float = 0.0) -> None:
    """Make the pool grow to ``n`` busy connections, then return them (``stagger`` seconds
    apart)."""
    entered = trio.Event()
    count = 0
    release = trio.Event()

    async def client(i: int) -> None:
        nonlocal count
        async with pool.run():
            count += 1
            if count == n:
                entered.set()
            await release.wait()
            await trio.sleep(i * stagger)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(client, i)
        await entered.wait()
        assert pool.statistics().size == n
        release.set()


async def test_elastic_pool_shrinks_to_min_size_zero_and_grows_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Recorder()
    async with open_pool(
        ScriptedDriver(), min_size=0, max_size=3, max_idle=1, idle_interval=1, log=log
    ) as pool:
        await settle()
        assert pool.statistics().size == 0  # nothing opened before it is needed
        await grow_then_release(pool, 3)
        returned = trio.current_time()
        await log.wait_for("disconnect", 3)
        assert all(returned < t <= returned + 2 for t in log.times("disconnect"))
        await settle()
        assert pool.statistics().size == 0
        await grow_then_release(pool, 2)  # grows again on demand
        assert pool.statistics().connects == 5


async def test_elastic_pool_shrinks_after_max_idle_one_by_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Connections returned at different times shrink at different times, down to min_size.
    Pings are kept out of the way (idle_interval >= max_idle) and checkouts are staggered."""
    log = Recorder()
    async with open_pool(
        ScriptedDriver(), min_size=1, max_size=3, max_idle=2, idle_interval=2, log=log
    ) as pool:
        await settle()
        release = trio.Event()

        async def client(i: int, task_status: trio.TaskStatus[None]) -> None:
            async with pool.run():
                task_status.started()
                await release.wait()
                await trio.sleep(10 * i)

        async with trio.open_nursery() as nursery:
            for i in range(3):
                await nursery.start(client, i)
                await trio.sleep(10)
            assert pool.statistics().size == 3
            release.set()
        await trio.sleep(60)
        await settle()
        stats = pool.statistics()
        assert (stats.size, stats.idle) == (1, 1)
        assert log.count("disconnect") == 2


async def test_elastic_pool_never_shrinks_below_min_size(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_pool(
        ScriptedDriver(), min_size=2, max_size=5, max_idle=1, idle_interval=1
    ) as pool:
        await grow_then_release(pool, 5)  # all returned at the same instant
        await trio.sleep(20)
        assert pool.statistics().size == 2


async def test_elastic_pool_shrinks_although_idle_connections_are_pinged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, min_size=0, max_size=2, max_idle=5, idle_interval=1) as pool:
        await grow_then_release(pool, 2)
        await trio.sleep(30)
        assert "ping" in driver.ops()
        assert pool.statistics().size == 0


async def test_elastic_shrink_happens_max_idle_after_the_return(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Recorder()
    async with open_pool(
        ScriptedDriver(), min_size=0, max_size=1, max_idle=5, idle_interval=100, log=log
    ) as pool:
        await grow_then_release(pool, 1)
        returned = trio.current_time()
        await log.wait_for("disconnect", 1)
        assert log.times("disconnect")[0] - returned == pytest.approx(5.0)
        assert pool.statistics().size == 0
