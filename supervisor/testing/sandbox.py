"""``sandbox(pool)``: run a test's database work on one connection, rolled back at the end.

The rules are those of :mod:`supervisor.sandbox` (Ecto's SQL.Sandbox for Trio); this is the
public entry point::

    async with open_pool(dsn) as pool:
        async with sandbox(pool) as box:
            await pool.execute("insert into users values (1, 'ada')")   # rolled back at the end
            async with trio.open_nursery() as nursery:                 # child tasks share it
                nursery.start_soon(handler, pool)
            box.allow(server_task)                                     # a task from elsewhere
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from supervisor import ConfigError, Pool
from supervisor.sandbox import Sandbox, open_sandbox
from supervisor.validate import check_number

__all__ = ["Sandbox", "sandbox"]


@asynccontextmanager
async def sandbox(
    pool: Pool, *, shared: bool = False, ownership_timeout: float | None = 120.0
) -> AsyncIterator[Sandbox]:
    """Open a sandbox on ``pool`` for the calling task: everything it and the tasks it starts
    (and tasks admitted with ``box.allow(task)``, or every task with ``shared=True``) do with
    ``pool`` runs on one connection inside a transaction rolled back when the block ends.
    ``ownership_timeout`` bounds how long the sandbox may hold its connection (None: no bound).
    """
    if not isinstance(pool, Pool):
        raise ConfigError(f"sandbox() takes a Pool, not {type(pool).__name__}")
    if not isinstance(shared, bool):
        raise ConfigError(f"sandbox shared must be True or False, not {shared!r}", pool=pool.name)
    check_number("sandbox ownership_timeout", ownership_timeout, pool=pool.name, optional=True)
    async with open_sandbox(
        pool._lender, shared=shared, ownership_timeout=ownership_timeout
    ) as box:
        yield box
