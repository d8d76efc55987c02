"""The checkout queue.

First the pure policy (supervisor.queue: CoDel and WaiterQueue driven with plain numbers), then
the pool's admission rules with the scripted driver and the autojump clock: FIFO service,
``queue=False``, checkout timeouts, ``max_waiting``, CoDel shedding under overload and recovery.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from helpers import held, hold_until, settle

from actors.scripted import ScriptedDriver
from supervisor import (
    CheckoutTimeout,
    ConfigError,
    LogEntry,
    Pool,
    PoolClosed,
    PoolError,
    QueueDropped,
    SafetyLimits,
    open_pool,
)
from supervisor.queue import CoDel, Waiter, WaiterQueue

TARGET = 0.25  # exact in binary, so 2 * TARGET comparisons are exact
INTERVAL = 1.0


def make_queue(target: float = TARGET, interval: float = INTERVAL) -> WaiterQueue:
    return WaiterQueue(CoDel(target, interval))


def push(queue: WaiterQueue, *starts: float) -> list[Waiter]:
    waiters = [Waiter(start, token=f"w{start}") for start in starts]
    for w in waiters:
        queue.push(w)
    return waiters


# -- pure: WaiterQueue ----------------------------------------------------------------------------


def test_fifo_order() -> None:
    queue = make_queue()
    waiters = push(queue, 0.0, 0.01, 0.02, 0.03)
    assert len(queue) == 4
    served = []
    for now in (0.04, 0.05, 0.06, 0.07):
        waiter, dropped = queue.serve(now)
        assert dropped == []
        served.append(waiter)
    assert served == waiters
    assert all(w.done for w in waiters)
    assert len(queue) == 0
    assert queue.serve(0.08) == (None, [])


def test_lazy_discard_skips_given_up_waiters() -> None:
    queue = make_queue()
    a, b, c, d = push(queue, 0.0, 0.01, 0.02, 0.03)
    queue.discard(b)
    queue.discard(a)  # the head itself
    assert len(queue) == 2
    queue.discard(b)  # twice: no double count
    assert len(queue) == 2
    assert queue.serve(0.05)[0] is c
    queue.discard(c)  # already served: no effect
    assert len(queue) == 1
    assert queue.serve(0.06)[0] is d
    assert len(queue) == 0
    assert queue.serve(0.07) == (None, [])


def test_drain_returns_live_waiters_in_order() -> None:
    queue = make_queue()
    a, b, c = push(queue, 0.0, 0.1, 0.2)
    queue.discard(b)
    assert queue.drain() == [a, c]
    assert len(queue) == 0
    assert queue.drain() == []


def test_first_serve_is_an_interval_boundary_and_never_slow() -> None:
    codel = CoDel(TARGET, INTERVAL)
    queue = WaiterQueue(codel)
    (w,) = push(queue, 0.0)
    # Waited 5 s, far above target, but nothing was measured in a previous interval.
    assert queue.serve(5.0) == (w, [])
    assert codel.slow is False
    assert codel.next == 6.0
    assert codel.delay == 5.0


def test_interval_boundary_computes_slow_from_the_minimum_wait() -> None:
    codel = CoDel(TARGET, INTERVAL)
    queue = WaiterQueue(codel)
    push(queue, 0.0, 0.1, 0.9)
    queue.serve(0.5)  # boundary: delay = 0.5
    assert (codel.next, codel.delay, codel.slow) == (1.5, 0.5, False)
    queue.serve(0.8)  # inside, not slow: delay = min(0.5, 0.7)
    assert codel.delay == 0.5
    queue.serve(1.0)  # inside: waited 0.1 -> new minimum
    assert codel.delay == pytest.approx(0.1)
    assert codel.slow is False
    # Next boundary: the minimum wait of the interval (0.1) is below target (0.25): not slow.
    push(queue, 1.0)
    queue.serve(1.5)
    assert codel.slow is False
    assert codel.next == 2.5
    assert codel.delay == 0.5


def test_interval_boundary_turns_slow_when_even_the_minimum_wait_exceeded_target() -> None:
    codel = CoDel(TARGET, INTERVAL)
    queue = WaiterQueue(codel)
    push(queue, 0.0, 0.0, 0.0)
    queue.serve(0.5)  # boundary, delay 0.5
    queue.serve(0.9)  # inside, min(0.5, 0.9) = 0.5
    assert codel.delay == 0.5
    waiter, dropped = queue.serve(1.5)  # boundary: 0.5 > target -> slow, but serve the head
    assert codel.slow is True
    assert dropped == []
    assert waiter is not None
    assert codel.next == 2.5


def test_not_slow_serves_the_head_however_long_it_waited() -> None:
    codel = CoDel(TARGET, INTERVAL, next=10.0)  # inside an interval, not slow
    queue = WaiterQueue(codel)
    a, b = push(queue, 0.0, 0.5)
    assert queue.serve(3.0) == (a, [])
    assert queue.serve(3.0) == (b, [])


def test_slow_drops_waiters_older_than_twice_target_then_serves_the_head() -> None:
    codel = CoDel(TARGET, INTERVAL, slow=True, next=10.0, delay=0.3)
    queue = WaiterQueue(codel)
    old1, old2, edge, young = push(queue, 0.0, 0.2, 0.5, 0.9)
    # now = 1.0: threshold 2 * 0.25 = 0.5: waited 1.0 and 0.8 -> dropped; exactly 0.5 is kept.
    waiter, dropped = queue.serve(1.0)
    assert dropped == [old1, old2]
    assert waiter is edge
    assert len(queue) == 1
    assert queue.serve(1.0) == (young, [])


def test_slow_with_only_old_waiters_drops_them_all_and_keeps_the_connection() -> None:
    codel = CoDel(TARGET, INTERVAL, slow=True, next=10.0, delay=0.3)
    queue = WaiterQueue(codel)
    waiters = push(queue, 0.0, 0.1)
    waiter, dropped = queue.serve(2.0)
    assert waiter is None
    assert dropped == waiters
    assert len(queue) == 0
    assert codel.delay == 0.0  # the connection goes idle: delay reset


def test_slow_drop_skips_discarded_waiters() -> None:
    codel = CoDel(TARGET, INTERVAL, slow=True, next=10.0, delay=0.3)
    queue = WaiterQueue(codel)
    a, b, c = push(queue, 0.0, 0.1, 1.9)
    queue.discard(a)
    waiter, dropped = queue.serve(2.0)
    assert dropped == [b]
    assert waiter is c


def test_on_idle_resets_delay() -> None:
    codel = CoDel(TARGET, INTERVAL)
    queue = WaiterQueue(codel)
    push(queue, 0.0)
    queue.serve(0.9)  # boundary: delay 0.9 (above target)
    assert codel.delay == 0.9
    assert queue.serve(1.0) == (None, [])  # nobody waiting: the connection goes idle
    assert codel.delay == 0.0
    push(queue, 1.9)
    queue.serve(2.0)  # next boundary: the interval's minimum was 0 -> not slow
    assert codel.slow is False


def test_poll_drops_when_the_head_waited_a_whole_interval() -> None:
    codel = CoDel(TARGET, INTERVAL)
    queue = WaiterQueue(codel)
    a, b, c = push(queue, 0.0, 0.5, 0.8)
    dropped = queue.poll(1.0)  # head waited 1.0 >= interval; drop waited > 0.5
    assert dropped == [a]
    assert codel.slow is True
    assert codel.next == 2.0
    assert len(queue) == 2
    # The survivors are served in order (slow now: b waited 0.5, not more than 2 * target).
    assert queue.serve(1.0) == (b, [])
    assert queue.serve(1.0) == (c, [])


def test_poll_does_nothing_while_the_head_moves() -> None:
    codel = CoDel(TARGET, INTERVAL)
    queue = WaiterQueue(codel)
    assert queue.poll(5.0) == []  # empty queue
    push(queue, 4.5, 4.9)
    assert queue.poll(5.0) == []  # head waited 0.5 < interval
    assert codel.slow is False
    assert len(queue) == 2


def test_recovers_when_the_load_falls() -> None:
    codel = CoDel(TARGET, INTERVAL)
    queue = WaiterQueue(codel)
    push(queue, 0.0, 0.0)
    queue.serve(0.5)
    queue.serve(1.5)  # boundary: min wait 0.5 > target -> slow
    assert codel.slow is True
    # Load falls: the queue empties and connections go idle.
    assert queue.serve(1.6) == (None, [])
    # New, short waits through the rest of the interval.
    push(queue, 1.9)
    queue.serve(2.0)
    # Boundary after the calm interval: not slow any more, and old waiters are served again.
    old = push(queue, 2.0)[0]
    assert queue.serve(2.6) == (old, [])
    assert codel.slow is False
    late = push(queue, 2.6)[0]
    assert queue.serve(3.4) == (late, [])  # waited 0.8 > 2 * target: served, not dropped


def test_minimum_wait_is_tracked_while_slow_too() -> None:
    codel = CoDel(TARGET, INTERVAL)
    queue = WaiterQueue(codel)
    push(queue, 0.0, 0.0)
    queue.serve(0.5)
    queue.serve(1.5)  # boundary: slow, delay restarted at 1.5
    assert codel.slow is True
    # The queue never empties, but every client is now served quickly.
    for t in (1.6, 1.8, 2.0, 2.2, 2.4):
        push(queue, t - 0.05)
        queue.serve(t)
    assert codel.delay == pytest.approx(0.05)
    push(queue, 2.45)
    queue.serve(2.5)  # boundary: the interval's minimum wait was 0.05 < target
    assert codel.slow is False


# -- pool level -----------------------------------------------------------------------------------


async def test_waiters_are_served_in_fifo_order(autojump_clock: trio.testing.MockClock) -> None:
    driver = ScriptedDriver()
    served: list[int] = []
    async with open_pool(driver, size=1, name="fifo") as pool:

        async def waiter(i: int) -> None:
            async with pool.run() as conn:
                served.append(i)
                await conn.execute(f"q{i}")

        async with trio.open_nursery() as nursery:
            async with pool.run():
                for i in range(6):
                    nursery.start_soon(waiter, i)
                    await settle()  # each one queued before the next arrives
                assert pool.statistics().waiting == 6
        assert served == [0, 1, 2, 3, 4, 5]
        queries = [c.args[0] for c in driver.calls if c.op == "execute"]
        assert queries == [f"q{i}" for i in range(6)]
        stats = pool.statistics()
        assert (stats.waiting, stats.dropped, stats.timeouts, stats.checkouts) == (0, 0, 0, 7)


async def test_fifo_among_idle_connections(autojump_clock: trio.testing.MockClock) -> None:
    """The longest-idle connection goes first, so every connection gets used."""
    driver = ScriptedDriver()
    async with open_pool(driver, size=3) as pool:
        await settle()
        used = []
        for _ in range(6):
            async with pool.run() as conn:
                await conn.execute("x")
            used.append(driver.calls[-1].conn)
        assert used[:3] == used[3:]
        assert sorted(used[:3]) == [1, 2, 3]


async def test_queue_false_fails_at_once_without_an_idle_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_pool(ScriptedDriver(), size=1, name="noq") as pool:
        await settle()
        async with pool.run(queue=False):  # an idle connection: fine
            pass
        async with held(pool):
            start = trio.current_time()
            with pytest.raises(QueueDropped) as info:
                async with pool.run(queue=False):
                    pytest.fail("must not get a connection")  # pragma: no cover
            assert trio.current_time() == start  # at once
            assert "noq" in str(info.value)
            assert "queue=False" in str(info.value)
            with pytest.raises(QueueDropped):
                async with pool.transaction(queue=False):
                    pass  # pragma: no cover
            assert pool.statistics().waiting == 0
        assert pool.statistics().dropped == 2
        async with pool.run(queue=False):
            pass


async def test_checkout_timeout_from_safety_limits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    entries: list[LogEntry] = []
    async with open_pool(
        ScriptedDriver(),
        size=1,
        name="slowpoke",
        log=entries.append,
        limits=SafetyLimits(checkout_timeout=0.5),
    ) as pool:
        async with held(pool):
            start = trio.current_time()
            with pytest.raises(CheckoutTimeout) as info:
                async with pool.run():
                    pytest.fail("must time out")  # pragma: no cover
            assert trio.current_time() - start == pytest.approx(0.5)
        err = info.value
        assert isinstance(err, TimeoutError)
        assert isinstance(err, PoolError)
        assert "slowpoke" in str(err)
        stats = pool.statistics()
        assert stats.timeouts == 1
        assert stats.waiting == 0
        assert [e.call for e in entries if e.error is err] == ["timeout"]
        async with pool.run(timeout=0.1):  # the pool still works
            pass


async def test_run_timeout_overrides_the_limit(autojump_clock: trio.testing.MockClock) -> None:
    async with open_pool(
        ScriptedDriver(),
        size=1,
        name="pertimeout",
        queue_interval=100,
        limits=SafetyLimits(checkout_timeout=60),
    ) as pool:
        async with held(pool):
            start = trio.current_time()
            with pytest.raises(CheckoutTimeout, match="pertimeout"):
                async with pool.run(timeout=2.5):
                    pass  # pragma: no cover
            assert trio.current_time() - start == pytest.approx(2.5)
            start = trio.current_time()
            with pytest.raises(CheckoutTimeout, match="pertimeout"):
                async with pool.transaction(timeout=1.0):
                    pass  # pragma: no cover
            assert trio.current_time() - start == pytest.approx(1.0)
        assert pool.statistics().timeouts == 2


async def test_timeout_zero_fails_at_once_when_busy(autojump_clock: trio.testing.MockClock) -> None:
    async with open_pool(ScriptedDriver(), size=1) as pool:
        async with held(pool):
            start = trio.current_time()
            with pytest.raises(CheckoutTimeout):
                async with pool.run(timeout=0):
                    pass  # pragma: no cover
            assert trio.current_time() == start


@pytest.mark.parametrize("bad", [-1, "1", True, math.nan])
async def test_bad_run_timeout_is_a_config_error(
    bad: object, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(ScriptedDriver(), size=1, name="badtimeout") as pool:
        with pytest.raises(ConfigError, match="badtimeout"):
            pool.run(timeout=bad)  # type: ignore[arg-type]


async def test_waiter_served_before_its_timeout_keeps_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_pool(ScriptedDriver(), size=1) as pool:
        got = trio.Event()

        async def waiter() -> None:
            async with pool.run(timeout=5):
                got.set()

        async with trio.open_nursery() as nursery:
            async with pool.run():
                nursery.start_soon(waiter)
                await trio.sleep(0.02)
            await got.wait()
        assert pool.statistics().timeouts == 0


async def test_max_waiting_sheds_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async with open_pool(
        ScriptedDriver(), size=1, name="capped", limits=SafetyLimits(max_waiting=2)
    ) as pool:
        outcomes: list[str] = []

        async def waiter() -> None:
            async with pool.run():
                outcomes.append("served")

        async with trio.open_nursery() as nursery:
            async with held(pool):
                nursery.start_soon(waiter)
                nursery.start_soon(waiter)
                await settle()
                assert pool.statistics().waiting == 2
                start = trio.current_time()
                with pytest.raises(QueueDropped) as info:
                    async with pool.run():
                        pass  # pragma: no cover
                assert trio.current_time() == start
                assert "capped" in str(info.value)
                assert "max_waiting=2" in str(info.value)
        assert outcomes == ["served", "served"]
        assert pool.statistics().dropped == 1


async def test_max_waiting_zero_never_queues(autojump_clock: trio.testing.MockClock) -> None:
    async with open_pool(ScriptedDriver(), size=1, limits=SafetyLimits(max_waiting=0)) as pool:
        await settle()
        async with held(pool):
            with pytest.raises(QueueDropped):
                async with pool.run():
                    pass  # pragma: no cover


async def test_cancelled_waiter_leaves_the_queue(autojump_clock: trio.testing.MockClock) -> None:
    async with open_pool(ScriptedDriver(), size=1) as pool:
        served: list[str] = []

        async def waiter(tag: str) -> None:
            async with pool.run():
                served.append(tag)

        async with trio.open_nursery() as nursery:
            async with pool.run():
                nursery.start_soon(waiter, "first")
                await settle()
                cancel_scope = trio.CancelScope()

                async def cancelled_waiter() -> None:
                    with cancel_scope:
                        await waiter("cancelled")

                nursery.start_soon(cancelled_waiter)
                await settle()
                nursery.start_soon(waiter, "third")
                await settle()
                assert pool.statistics().waiting == 3
                cancel_scope.cancel()
                await settle()
                assert pool.statistics().waiting == 2
        assert served == ["first", "third"]
        assert pool.statistics().idle == 1


async def test_poll_drops_waiters_when_nothing_comes_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Database stuck (no connection is returned at all): after a whole queue_interval the
    periodic check drops every waiter older than 2 x queue_target, well before checkout_timeout."""
    async with open_pool(
        ScriptedDriver(),
        size=1,
        name="stuck",
        queue_target=0.1,
        queue_interval=1.0,
        limits=SafetyLimits(checkout_timeout=30),
    ) as pool:
        errors: list[tuple[float, BaseException]] = []
        all_dropped = trio.Event()

        async def waiter() -> None:
            start = trio.current_time()
            try:
                async with pool.run():
                    pass  # pragma: no cover
            except QueueDropped as exc:
                errors.append((trio.current_time() - start, exc))
                if len(errors) == 3:
                    all_dropped.set()

        release = trio.Event()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_until, pool, release)
            await settle()
            for _ in range(3):
                nursery.start_soon(waiter)
            await settle()
            assert pool.statistics().waiting == 3
            with trio.move_on_after(5):
                await all_dropped.wait()
            release.set()
        assert len(errors) == 3
        assert [waited for waited, _ in errors] == pytest.approx([1.0, 1.0, 1.0])
        assert all("stuck" in str(exc) for _, exc in errors)
        assert pool.statistics().dropped == 3
        assert pool.statistics().timeouts == 0


async def run_clients(pool: Pool, clients: int, hold: float, duration: float) -> tuple[int, int]:
    """``clients`` tasks loop checkout/hold/return until ``duration`` has passed; returns
    (served, dropped)."""
    served = dropped = 0
    deadline = trio.current_time() + duration

    async def client() -> None:
        nonlocal served, dropped
        while trio.current_time() < deadline:
            try:
                async with pool.run() as conn:
                    await conn.execute("work")
                    await trio.sleep(hold)
                served += 1
            except QueueDropped:
                dropped += 1
                await trio.sleep(hold)

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
    return served, dropped


async def test_codel_sheds_under_sustained_overload_and_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_pool(
        ScriptedDriver(record=False),
        size=2,
        name="overload",
        queue_target=0.05,
        queue_interval=1.0,
        limits=SafetyLimits(checkout_timeout=None),
    ) as pool:
        await settle()
        # 20 clients each holding 0.2 s (4x target) on 2 connections, for 10 s.
        served, dropped = await run_clients(pool, clients=20, hold=0.2, duration=10.0)
        stats = pool.statistics()
        assert dropped > 0
        assert stats.dropped == dropped
        assert served > 50  # shedding keeps the pool serving at capacity
        assert stats.timeouts == 0
        # Load falls: 2 clients on 2 connections, plus a third arriving now and then.
        before = pool.statistics().dropped
        served2, dropped2 = await run_clients(pool, clients=3, hold=0.01, duration=10.0)
        assert dropped2 == 0
        assert pool.statistics().dropped == before
        assert served2 > 1000
        await settle()
        assert pool.statistics().idle == 2


async def test_closing_the_pool_fails_waiters_with_pool_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    errors: list[BaseException] = []
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        async with open_pool(
            ScriptedDriver(), size=1, name="closing", limits=SafetyLimits(shutdown_grace=1)
        ) as pool:

            async def waiter() -> None:
                try:
                    async with pool.run():
                        pass  # pragma: no cover
                except PoolClosed as exc:
                    errors.append(exc)

            await nursery.start(hold_until, pool, release)
            nursery.start_soon(waiter)
            await settle()
            assert pool.statistics().waiting == 1
            nursery.start_soon(_set, release)
        assert len(errors) == 1
        assert "closing" in str(errors[0])


async def _set(event: trio.Event) -> None:
    event.set()
    await trio.lowlevel.checkpoint()


async def test_a_shed_waiter_is_told_the_knobs_and_the_numbers_before_the_sweep(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_pool(
        ScriptedDriver(record=False),
        size=2,
        name="shed",
        limits=SafetyLimits(checkout_timeout=None),
    ) as pool:
        await settle()
        errors: list[QueueDropped] = []

        async def client() -> None:
            try:
                async with pool.run():
                    await trio.sleep(0.06)
            except QueueDropped as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(client)
        assert errors, "40 clients holding 60 ms each on 2 connections must be shed"
        text = str(errors[0])
        assert text.startswith("pool 'shed': dropped from the queue after waiting ")
        assert "queue_target=0.05s" in text and "queue_interval=1s" in text
        assert "raise queue_target" in text and "pool size" in text
        # counted before the sweep ("33 of 38 waiting shed"), never "0 waiting"
        numbers = text.split("(")[-1]
        dropped_now = int(numbers.split(" of ")[0])
        waiting_before = int(numbers.split(" of ")[1].split(" ")[0])
        assert 1 <= dropped_now <= waiting_before
        assert "size 2/2" in numbers
