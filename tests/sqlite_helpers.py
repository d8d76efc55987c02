"""Helpers shared by the SQLite driver and fault-injection tests.

They synchronise with real worker threads through Trio primitives (a progress handler that wakes
a ``trio.Event``), never through sleeps.
"""

from __future__ import annotations

import sqlite3

import trio

from actors.sqlite import SqliteConnection

SLOW_QUERY = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
    "SELECT count(*) FROM c"
)
"""A query that runs for minutes unless interrupted (SQLite steps it in the worker thread)."""


def arm_started_event(conn: SqliteConnection) -> trio.Event:
    """Return an event set (in the Trio thread) as soon as SQLite starts running a statement on
    ``conn``: the progress handler fires inside the worker thread every 1000 VM steps.

    Call :func:`disarm` once the statement is over.
    """
    started = trio.Event()
    token = trio.lowlevel.current_trio_token()
    fired = False

    def progress() -> int:
        nonlocal fired
        if not fired:
            fired = True
            token.run_sync_soon(started.set)
        return 0  # 0 = keep going

    conn.raw.set_progress_handler(progress, 1000)
    return started


def disarm(conn: SqliteConnection) -> None:
    """Remove the progress handler installed by :func:`arm_started_event` (no call in flight)."""
    assert not conn.in_flight
    conn.raw.set_progress_handler(None, 0)


def make_table_sql(rows: int) -> str:
    """An INSERT ... SELECT filling ``big(id, payload)`` with ``rows`` rows of ~40 characters."""
    return (
        f"INSERT INTO big(id, payload) "
        f"SELECT x, printf('row-%08d-%s', x, hex(randomblob(12))) FROM "
        f"(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows}) "
        f"SELECT x FROM c)"
    )


def raw_count(path: str, table: str) -> int:
    """Count rows with a fresh, independent ``sqlite3`` connection (the ground truth)."""
    with sqlite3.connect(path) as raw:
        (n,) = raw.execute(f"SELECT count(*) FROM {table}").fetchone()
    raw.close()
    return int(n)
