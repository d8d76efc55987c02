"""``python -m supervisor check URL``: open a one-connection pool on a database, run one query,
say what happened.

A quick way to see that a DSN, credentials and the driver work, through the same
:func:`supervisor.open_pool` an application uses. No password is ever printed: the pool's error
messages are redacted.
"""

from __future__ import annotations

import sys

import trio

from supervisor import PoolError, SafetyLimits, open_pool

__all__ = ["run"]


def run(url: str, timeout: float = 10.0) -> int:
    """Connect to ``url``, run ``select 1`` and print the result; the exit status is 0, or 1
    (with the reason on stderr) if the pool could not do it within ``timeout`` seconds."""

    async def check() -> int:
        limits = SafetyLimits(checkout_timeout=timeout, connect_timeout=timeout)
        async with open_pool(url, size=1, limits=limits, name="check") as pool:
            start = trio.current_time()
            value = await pool.fetch_val("select 1")
            elapsed = trio.current_time() - start
            stats = pool.statistics()
        print(f"ok: {pool.driver.name} answered 'select 1' -> {value!r} in {elapsed * 1000:.1f} ms"
              f" (connects={stats.connects})")
        return 0

    try:
        return trio.run(check)
    except PoolError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
