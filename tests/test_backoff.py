"""Backoff policies (supervisor.backoff) and how a pool applies them to reconnects.

Pure tests check each kind's sequence of delays with a seeded ``random.Random``; pool tests use
the scripted driver and the autojump clock, recording the virtual time of every connect attempt
inside an async callable script step.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import trio
import trio.testing

from actors.driver import ConnectionLost as DriverConnectionLost
from actors.scripted import Call, ScriptedDriver
from supervisor import Backoff, PoolClosed, SafetyLimits, open_pool

# -- pure: the sequences --------------------------------------------------------------------------


def take(backoff: Backoff, n: int, seed: int | None = 0) -> list[float]:
    rng = None if seed is None else random.Random(seed)
    return list(itertools.islice(backoff.delays(rng), n))


def test_default_policy_is_rand_exp_1_to_30() -> None:
    assert Backoff() == Backoff(kind="rand_exp", min=1.0, max=30.0)


def test_stop_yields_nothing() -> None:
    delays = Backoff(kind="stop", min=1, max=5).delays(random.Random(1))
    assert list(delays) == []
    assert next(Backoff(kind="stop").delays(), None) is None


def test_exp_doubles_from_min_capped_at_max() -> None:
    assert take(Backoff(kind="exp", min=1, max=10), 7) == [1, 2, 4, 8, 10, 10, 10]
    assert take(Backoff(kind="exp", min=0.5, max=3), 5) == [0.5, 1.0, 2.0, 3, 3]


def test_exp_with_min_equal_max_is_constant() -> None:
    assert take(Backoff(kind="exp", min=2, max=2), 5) == [2, 2, 2, 2, 2]


def test_exp_from_zero_still_grows_to_max() -> None:
    try:
        policy = Backoff(kind="exp", min=0, max=1)
    except ValueError:
        return  # rejecting min=0 would be fine too; a zero-delay loop would not
    delays = take(policy, 30)
    assert delays[0] == 0
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert delays[-1] == 1


def test_exp_is_deterministic_and_needs_no_rng() -> None:
    policy = Backoff(kind="exp", min=0.25, max=8)
    assert take(policy, 10, seed=None) == take(policy, 10, seed=123)


def test_rand_within_min_max() -> None:
    delays = take(Backoff(kind="rand", min=2, max=5), 2000, seed=7)
    assert all(2 <= d <= 5 for d in delays)
    # Really random: spread over the range, not a constant.
    assert min(delays) < 2.1
    assert max(delays) > 4.9
    assert len(set(delays)) > 1900


def test_rand_is_deterministic_with_a_seed() -> None:
    policy = Backoff(kind="rand", min=0.1, max=9)
    assert take(policy, 50, seed=42) == take(policy, 50, seed=42)
    assert take(policy, 50, seed=42) != take(policy, 50, seed=43)


def check_rand_exp_bounds(policy: Backoff, delays: list[float]) -> None:
    """DBConnection's rand_exp: first = min; next uniform between
    min(prev, max(min, max/3)) and min(3*prev, max)."""
    lower = max(policy.min, policy.max / 3)
    assert delays[0] == policy.min
    for prev, cur in itertools.pairwise(delays):
        lo = min(prev, lower)
        hi = min(3 * prev, policy.max)
        assert lo <= cur <= hi, (prev, cur, lo, hi)
        assert policy.min <= cur <= policy.max


@pytest.mark.parametrize(
    ("lo", "hi"), [(1.0, 30.0), (0.1, 1.0), (2.0, 3.0), (5.0, 5.0), (0.001, 1000.0)]
)
@pytest.mark.parametrize("seed", [0, 1, 2, 99])
def test_rand_exp_bounds_over_many_draws(lo: float, hi: float, seed: int) -> None:
    policy = Backoff(kind="rand_exp", min=lo, max=hi)
    check_rand_exp_bounds(policy, take(policy, 3000, seed=seed))


def test_rand_exp_spreads_and_reaches_the_upper_range() -> None:
    policy = Backoff(kind="rand_exp", min=1, max=30)
    delays = take(policy, 3000, seed=5)
    tail = delays[10:]
    # After the first few draws the delays wander over [max/3 .. max] (jitter, not lockstep).
    assert max(tail) > 25
    assert min(tail) < 15
    assert len(set(tail)) == len(tail)


def test_rand_exp_first_delays_grow_at_most_threefold() -> None:
    delays = take(Backoff(kind="rand_exp", min=1, max=1000), 6, seed=3)
    assert delays[0] == 1
    for prev, cur in itertools.pairwise(delays):
        assert cur <= 3 * prev


def test_rand_exp_from_zero_does_not_spin() -> None:
    try:
        policy = Backoff(kind="rand_exp", min=0, max=10)
    except ValueError:
        return  # rejecting min=0 is an acceptable fix too
    delays = take(policy, 50, seed=1)
    assert max(delays) > 1


def test_rand_exp_is_deterministic_with_a_seed() -> None:
    policy = Backoff(kind="rand_exp", min=0.5, max=20)
    assert take(policy, 100, seed=11) == take(policy, 100, seed=11)
    assert take(policy, 100, seed=11) != take(policy, 100, seed=12)


def test_every_delays_call_starts_a_fresh_sequence() -> None:
    policy = Backoff(kind="exp", min=1, max=64)
    first = policy.delays()
    assert [next(first) for _ in range(4)] == [1, 2, 4, 8]
    assert next(policy.delays()) == 1
    assert next(first) == 16  # the old iterator is unaffected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "linear"},
        {"kind": ""},
        {"kind": None},
        {"min": -1},
        {"max": -0.5},
        {"min": 5, "max": 2},
        {"min": "1"},
        {"max": None},
        {"min": True},
        {"max": [30]},
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as info:
        Backoff(**kwargs)
    field = next(iter(kwargs))
    assert field in str(info.value)


@pytest.mark.parametrize("field", ["min", "max"])
def test_nan_bounds_raise_value_error(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Backoff(kind="exp", **{field: math.nan})


# -- through a pool: delays between connect attempts ---------------------------------------------


def connect_step(
    times: list[float], *, ok: bool, event: trio.Event | None = None
) -> Callable[[Call], Coroutine[Any, Any, None]]:
    """A connect step that records the virtual time of the attempt and fails or succeeds."""

    async def step(call: Call) -> None:
        times.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        if event is not None:
            event.set()
        if not ok:
            raise DriverConnectionLost("connection refused (scripted)")

    return step


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def test_exp_backoff_between_failed_connects_and_reset_after_good_connect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    times: list[float] = []
    first_ok, second_ok = trio.Event(), trio.Event()
    driver = ScriptedDriver()
    driver.script(
        "connect",
        connect_step(times, ok=False),
        connect_step(times, ok=False),
        connect_step(times, ok=False),
        connect_step(times, ok=True, event=first_ok),
        # After the good connection is killed: two failures, then success.
        connect_step(times, ok=False),
        connect_step(times, ok=False),
        connect_step(times, ok=True, event=second_ok),
    )
    async with open_pool(
        driver,
        size=1,
        backoff=Backoff(kind="exp", min=1, max=8),
        idle_interval=1000,
        queue_interval=1000,
    ) as pool:
        await first_ok.wait()
        assert times[:4] == pytest.approx([0, 1, 3, 7])  # delays 1, 2, 4
        await trio.sleep(100)
        async with pool.run() as conn:
            killed_at = trio.current_time()
            conn.kill()
        await second_ok.wait()
        # The lost good connection reconnects at once, and the backoff restarts from min
        # (1, 2), not from where the earlier failures left it (8).
        assert times[4] == pytest.approx(killed_at)
        assert gaps(times[4:]) == pytest.approx([1, 2])
        await trio.testing.wait_all_tasks_blocked()
        stats = pool.statistics()
        assert stats.connects == 2
        assert stats.idle == 1
        assert await pool.fetch_all("select 1") == []


async def test_rand_exp_backoff_through_pool_matches_the_seeded_policy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    times: list[float] = []
    done = trio.Event()
    failures = 12
    driver = ScriptedDriver()
    driver.script("connect", *(connect_step(times, ok=False) for _ in range(failures)))
    driver.script("connect", connect_step(times, ok=True, event=done))
    policy = Backoff(kind="rand_exp", min=0.5, max=20)
    async with open_pool(
        driver, size=1, backoff=policy, seed=1234, idle_interval=1000, queue_interval=1000
    ):
        await done.wait()
    observed = gaps(times)
    assert len(observed) == failures
    check_rand_exp_bounds(policy, observed)
    # A pool seed makes the jitter reproducible: the same draws as the policy with that seed.
    assert observed == pytest.approx(take(policy, failures, seed=1234))


async def test_rand_backoff_through_pool_stays_within_bounds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    times: list[float] = []
    done = trio.Event()
    driver = ScriptedDriver()
    driver.script("connect", *(connect_step(times, ok=False) for _ in range(20)))
    driver.script("connect", connect_step(times, ok=True, event=done))
    async with open_pool(
        driver,
        size=1,
        backoff=Backoff(kind="rand", min=2, max=3),
        idle_interval=1000,
        queue_interval=1000,
    ):
        await done.wait()
    observed = gaps(times)
    assert len(observed) == 20
    assert all(2 - 1e-9 <= d <= 3 + 1e-9 for d in observed)
    assert len({round(d, 9) for d in observed}) > 1


async def test_each_slot_backs_off_independently(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two slots failing together each follow their own exp sequence (a fresh iterator per
    actor), so neither speeds the other up."""
    times: list[float] = []
    both = trio.Event()
    seen_ok = 0

    async def ok_step(call: Call) -> None:
        nonlocal seen_ok
        times.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        seen_ok += 1
        if seen_ok == 2:
            both.set()

    driver = ScriptedDriver()
    driver.script("connect", *(connect_step(times, ok=False) for _ in range(6)))
    driver.script("connect", ok_step, ok_step)
    async with open_pool(
        driver,
        size=2,
        backoff=Backoff(kind="exp", min=1, max=100),
        idle_interval=1000,
        queue_interval=1000,
    ):
        await both.wait()
    # Both slots: attempts at 0, 1, 3 (fail) and 7 (ok).
    assert sorted(times) == pytest.approx([0, 0, 1, 1, 3, 3, 7, 7])


async def test_stop_gives_up_and_restart_intensity_fails_the_pool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``stop``: a failed connect is not retried by the actor; the supervisor restarts it and,
    past max_restarts, the pool fails with PoolClosed (a single error, no ExceptionGroup)."""
    times: list[float] = []
    driver = ScriptedDriver()
    driver.script("connect", *(connect_step(times, ok=False) for _ in range(50)))
    with pytest.raises(PoolClosed) as info:
        async with open_pool(
            driver,
            size=1,
            backoff=Backoff(kind="stop"),
            max_restarts=2,
            name="stopper",
            limits=SafetyLimits(checkout_timeout=None),
            queue_interval=1000,
        ):
            await trio.sleep_forever()
    assert len(times) == 3  # the first attempt + max_restarts restarts, then the pool fails
    assert "stopper" in str(info.value)
    assert "max_restarts=2" in str(info.value)


async def test_restart_backoff_resets_after_a_good_connect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An actor crash (here: the configure hook raising) is restarted after a backoff delay;
    like reconnect delays, restart delays start again from ``min`` once the slot has connected
    successfully."""
    crash_times: list[float] = []
    plan = iter([True, True, False, True, False])  # True: configure raises (actor crash)
    connected = [trio.Event(), trio.Event()]
    connects = 0

    def configure(options: Any, index: int) -> Any:
        if next(plan, False):
            crash_times.append(trio.current_time())
            raise RuntimeError("secret store unavailable")
        return options

    def log(entry: Any) -> None:
        nonlocal connects
        if entry.call == "connect":
            connected[connects].set()
            connects += 1

    async with open_pool(
        ScriptedDriver(),
        size=1,
        backoff=Backoff(kind="exp", min=1, max=64),
        configure=configure,
        log=log,
        idle_interval=1000,
        queue_interval=1000,
    ) as pool:
        await connected[0].wait()
        assert crash_times == pytest.approx([0, 1])
        first_good = trio.current_time()
        assert first_good == pytest.approx(3)  # restart delays 1, 2
        await trio.sleep(1000)
        async with pool.run() as conn:
            conn.kill()
        killed_at = trio.current_time()
        await connected[1].wait()
        # One crash after a long good run: restarted after min (1 s), not after 4 s.
        assert trio.current_time() - killed_at == pytest.approx(1)


async def test_pool_failure_while_a_client_waits_comes_out_as_a_single_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    driver.script("connect", *(DriverConnectionLost("refused") for _ in range(10)))
    with pytest.raises(PoolClosed, match="max_restarts=2"):
        async with open_pool(
            driver,
            size=1,
            backoff=Backoff(kind="stop"),
            max_restarts=2,
            limits=SafetyLimits(checkout_timeout=None),
            queue_interval=1000,
        ) as pool:
            await pool.execute("never runs")


async def test_hung_connect_fails_after_connect_timeout_and_backs_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    times: list[float] = []
    done = trio.Event()

    async def hang(call: Call) -> None:
        times.append(trio.current_time())
        await trio.sleep_forever()

    driver = ScriptedDriver()
    driver.script("connect", hang, hang, connect_step(times, ok=True, event=done))
    entries: list[Any] = []
    async with open_pool(
        driver,
        size=1,
        backoff=Backoff(kind="exp", min=1, max=10),
        limits=SafetyLimits(connect_timeout=3),
        log=entries.append,
        idle_interval=1000,
        queue_interval=1000,
    ):
        await done.wait()
    # Attempt at 0 hangs until 3, backoff 1 -> attempt at 4 hangs until 7, backoff 2 -> 9.
    assert times == pytest.approx([0, 4, 9])
    assert [e.call for e in entries].count("connect_failed") == 2


@pytest.mark.parametrize("kind", ["exp", "rand", "rand_exp"])
def test_a_backoff_of_zero_that_would_spin_is_refused_naming_the_fix(kind: str) -> None:
    with pytest.raises(ValueError, match=r"at once, forever.*max must be > 0.*'stop'"):
        Backoff(kind, 0, 0)  # type: ignore[arg-type]


def test_stop_with_zero_bounds_is_allowed_since_it_never_retries() -> None:
    assert next(Backoff("stop", 0, 0).delays(), None) is None
