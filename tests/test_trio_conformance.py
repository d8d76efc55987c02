"""Trio's conventions, held by the pool: factory-only construction, ``@final`` classes,
KeyboardInterrupt protection on the synchronous hand-over, and no ExceptionGroup out of
``open_pool`` even when two errors happen at once."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import supervisor
from actors.actor import Actor
from actors.scripted import ScriptedDriver
from supervisor import Pool, PoolContext, PoolError, open_pool
from supervisor.groups import single_error


class Boom(BaseException):
    """A BaseException that is not an Exception: the actor lets it out, like a KeyboardInterrupt."""


def test_a_pool_cannot_be_made_except_by_open_pool() -> None:
    with pytest.raises(TypeError, match="open_pool"):
        Pool(ScriptedDriver(), None)
    with pytest.raises(TypeError, match="open_pool"):
        PoolContext(None)


@pytest.mark.parametrize(
    "name",
    [
        "Pool", "PoolContext", "PoolStatistics", "Transaction", "Stream", "PreparedStatement",
        "Statement", "SafetyLimits", "Backoff", "LogEntry",
    ],
)
def test_public_classes_nothing_subclasses_are_final(name: str) -> None:
    cls = getattr(supervisor, name)
    assert getattr(cls, "__final__", False) is True


async def test_awaiting_open_pool_instead_of_async_with_says_what_to_do() -> None:
    ctx: Any = open_pool(ScriptedDriver(), name="oops")
    assert type(ctx) is PoolContext
    with pytest.raises(TypeError, match=r"pool 'oops'.*async with open_pool"):
        await ctx


async def test_the_fast_path_hand_over_runs_protected_from_keyboard_interrupt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    protected: list[bool] = []
    lend = Actor.lend

    def spy(self: Actor, lease: Any, returning: Any = None) -> None:
        protected.append(trio.lowlevel.currently_ki_protected())
        lend(self, lease, returning)

    monkeypatch.setattr(Actor, "lend", spy)
    async with open_pool(ScriptedDriver(), size=1) as pool:
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().idle == 1
        async with pool.run():
            pass
    assert protected == [True]


async def test_the_hand_over_to_a_waiter_and_the_return_run_protected_from_keyboard_interrupt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[str, bool, bool]] = []
    lend, mark_idle = Actor.lend, Actor.mark_idle

    def spy_lend(self: Actor, lease: Any, returning: Any = None) -> None:
        seen.append(("lend", returning is not None, trio.lowlevel.currently_ki_protected()))
        lend(self, lease, returning)

    def spy_idle(self: Actor, now: float, returning: Any = None) -> None:
        seen.append(("idle", returning is not None, trio.lowlevel.currently_ki_protected()))
        mark_idle(self, now, returning)

    monkeypatch.setattr(Actor, "lend", spy_lend)
    monkeypatch.setattr(Actor, "mark_idle", spy_idle)
    async with open_pool(ScriptedDriver(), size=1) as pool:
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [("idle", False, True)]
        async with trio.open_nursery() as nursery:
            async with pool.run():
                nursery.start_soon(_use, pool)
                await trio.testing.wait_all_tasks_blocked()
                assert pool.statistics().waiting == 1
    # (what, straight from a returning lease, protected): the connection goes idle after
    # connecting, is lent, is handed from the returning lease straight to the waiter, then
    # goes back to the idle set when the waiter returns it
    assert seen == [
        ("idle", False, True),
        ("lend", False, True),
        ("lend", True, True),
        ("idle", True, True),
    ]


async def _use(pool: Pool) -> None:
    async with pool.run():
        pass


async def test_two_errors_at_once_give_the_body_error_with_the_other_attached() -> None:
    driver = ScriptedDriver()
    started = trio.Event()

    async def connect_then_blow_up(call: Any) -> None:
        await started.wait()
        raise Boom("actor side")

    driver.script("connect", None, connect_then_blow_up)
    with pytest.RaisesGroup(
        pytest.RaisesExc(RuntimeError, match="body cleanup failed")
    ) as info:  # the body's own nursery group, as the body raised it
        async with open_pool(driver, min_size=1, max_size=2) as pool:
            await trio.testing.wait_all_tasks_blocked()
            async with pool.run():
                # a second client makes the pool grow: that connect raises Boom
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_use, pool)
                    await trio.testing.wait_all_tasks_blocked()
                    started.set()
                    try:
                        await trio.sleep_forever()
                    except trio.Cancelled:
                        raise RuntimeError("body cleanup failed") from None
    error = info.value
    assert any("Boom raised at the same time: actor side" in note for note in error.__notes__)


async def test_a_keyboard_interrupt_beside_another_error_comes_out_as_keyboard_interrupt() -> None:
    driver = ScriptedDriver()
    body_waiting = trio.Event()

    async def interrupt(call: Any) -> None:
        await body_waiting.wait()
        raise KeyboardInterrupt

    driver.script("connect", interrupt)
    with pytest.raises(KeyboardInterrupt) as info:
        async with open_pool(driver, size=1):
            try:
                body_waiting.set()
                await trio.sleep_forever()
            except trio.Cancelled:
                raise ValueError("cleanup failed too") from None
    notes = getattr(info.value, "__notes__", [])
    assert any("ValueError raised at the same time: cleanup failed too" in n for n in notes)


def test_the_unwrap_rule_on_plain_groups() -> None:
    body = ValueError("body")
    other = KeyError("other")
    failure = supervisor.PoolClosed("failed: too many crashes", pool="p")
    copy = supervisor.PoolClosed("failed: too many crashes", pool="p")
    group = BaseExceptionGroup("nursery", [other, body, copy])
    assert single_error(group, pool="p", body=body, failure=failure) is body
    assert body.__context__ is other
    assert [n.split(":")[1].strip() for n in body.__notes__] == [
        "KeyError raised at the same time",
        "PoolClosed raised at the same time",
    ]
    only_failure = BaseExceptionGroup("nursery", [copy, trio.Cancelled._create()])
    assert single_error(only_failure, pool="p", body=None, failure=failure) is failure
    ki = KeyboardInterrupt()
    mixed = BaseExceptionGroup("nursery", [PoolError("x"), ki])
    assert single_error(mixed, pool="p", body=None, failure=None) is ki


async def test_a_keyboard_interrupt_while_the_pool_opens_comes_out_as_itself() -> None:
    driver = ScriptedDriver()

    async def interrupt(call: Any) -> None:
        raise KeyboardInterrupt

    driver.script("connect", interrupt)
    with pytest.raises(KeyboardInterrupt):
        async with open_pool(driver, size=1):
            await trio.sleep_forever()
