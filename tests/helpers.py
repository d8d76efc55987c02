"""Helpers shared by the scripted-driver unit tests (imported as ``from helpers import ...``).

Each one was written out in several test modules before; it lives here once. They synchronise
through Trio primitives (events, ``wait_all_tasks_blocked``), never through sleeps. Helpers for
real SQLite worker threads are in :mod:`sqlite_helpers`; why these are modules and not fixtures
in ``conftest.py`` is said in ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing

from actors.scripted import Call, ScriptedDriver
from supervisor import Pool

QUIET = {"ping", "connect", "close"}
"""Driver operations that are not part of a lease's protocol (timers, connecting, closing)."""


async def settle() -> None:
    """Let every task run until all are blocked (the scheduler has nothing left to do)."""
    await trio.testing.wait_all_tasks_blocked()


def ops(driver: ScriptedDriver) -> list[str]:
    """The operations ``driver`` recorded, without the :data:`QUIET` ones."""
    return driver.ops(exclude=QUIET)


def hang(entered: trio.Event) -> Callable[[Call], Awaitable[Any]]:
    """A script step that sets ``entered`` once it runs, then never returns (until cancelled)."""

    async def step(call: Call) -> Any:
        entered.set()
        await trio.sleep_forever()

    return step


def driver_bug(driver: ScriptedDriver, exc: Exception) -> Callable[[Call], Awaitable[Any]]:
    """A script step that raises ``exc`` and leaves its connection mid-protocol (status
    ``"unknown"``), as a driver bug in the middle of a message does: a driver crash."""

    async def step(call: Call) -> Any:
        conn = next(c for c in driver.connections if c.id == call.conn)
        conn.forced_status = "unknown"
        raise exc

    return step


def gate_step(
    entered: trio.Event, gate: trio.Event, result: Any = None
) -> Callable[[Call], Awaitable[Any]]:
    """A script step that sets ``entered`` once it runs, then waits for ``gate`` and returns
    ``result``."""

    async def step(call: Call) -> Any:
        entered.set()
        await gate.wait()
        return result

    return step


async def hold_until(
    pool: Pool,
    release: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Check out a connection of ``pool`` and keep it until ``release`` is set; for
    ``nursery.start``, which returns once the connection is lent."""
    async with pool.run():
        task_status.started()
        await release.wait()


@asynccontextmanager
async def held(pool: Pool, n: int = 1) -> AsyncIterator[trio.Event]:
    """Hold ``n`` connections, each in its own task (a pool is re-entrant per task, so the test
    task itself could not take a second one), until the yielded event is set or the block ends.
    """
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            await nursery.start(hold_until, pool, release)
        try:
            yield release
        finally:
            release.set()
