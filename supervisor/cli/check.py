"""``python -m supervisor check URL``: open a one-connection pool on a database, run one query,
say what happened.

A quick way to see that a DSN, credentials and the driver work, through the same
:func:`supervisor.open_pool` an application uses. No password is ever printed: the pool's error
messages are redacted, and :func:`~supervisor.cli.args.failure_line` removes the URL's password
from anything else.

It waits the whole ``timeout`` it is given: the pool's CoDel queue, which would shed the waiting
query after about a second while the database is down (``queue_target=0.05``,
``queue_interval=1.0``), is given a target and an interval of ``timeout`` too, so only
``checkout_timeout`` decides.

It never creates an SQLite file: a file URL whose file does not exist fails at once, and an
existing file is opened read-only (SQLite's ``mode=ro`` URI parameter), so checking cannot
change it either.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from actors.driver import Driver
from actors.sqlite import SqliteDriver, from_url
from supervisor import PoolError, SafetyLimits, open_pool
from supervisor.cli.args import failure_line

__all__ = ["CheckFailed", "check", "run", "target_for"]


class CheckFailed(Exception):
    """The check cannot even start (for example an SQLite file that does not exist)."""


def target_for(url: str) -> str | Driver:
    """What to open for ``url``: the URL itself, or, for an SQLite file, a read-only driver on
    it (:class:`CheckFailed` if the file does not exist)."""
    if not url.lower().startswith("sqlite:"):
        return url
    try:
        driver = from_url(url)
    except ValueError as exc:
        raise CheckFailed(f"bad SQLite URL: {exc}") from None
    if driver.is_memory:
        return driver
    path = Path(driver.path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise CheckFailed(f"SQLite database {driver.path!r} {what} (check never creates one)")
    # WAL off: switching the journal mode is a write, which a read-only connection cannot do.
    return SqliteDriver(
        path.resolve().as_uri() + "?mode=ro",
        uri=True,
        wal=False,
        timeout=float(driver.options["timeout"]),
    )


async def check(target: str | Driver, timeout: float = 10.0) -> str:
    """Open a one-connection pool on ``target``, run ``select 1`` and return the ``ok: ...``
    line; a :class:`~supervisor.PoolError` if that cannot be done within ``timeout`` seconds."""
    limits = SafetyLimits(checkout_timeout=timeout, connect_timeout=timeout)
    async with open_pool(
        target,
        size=1,
        limits=limits,
        queue_target=timeout,
        queue_interval=timeout,
        name="check",
    ) as pool:
        start = trio.current_time()
        value = await pool.fetch_val("select 1")
        elapsed = trio.current_time() - start
        stats = pool.statistics()
    return (
        f"ok: {pool.driver.name} answered 'select 1' -> {value!r} in {elapsed * 1000:.1f} ms"
        f" (connects={stats.connects})"
    )


def run(url: str, timeout: float = 10.0) -> int:
    """Connect to ``url``, run ``select 1`` and print the result; the exit status is 0, or 1
    (one line with the reason on stderr) if the pool could not do it within ``timeout``
    seconds."""
    try:
        line = trio.run(check, target_for(url), timeout)
    except (PoolError, CheckFailed) as exc:
        print(failure_line(exc, url), file=sys.stderr)
        return 1
    print(line)
    return 0

