"""Every PostgreSQL driver keeps the driver protocol's checkpoint rule on the real server: a
call made in an already-cancelled scope raises ``Cancelled`` *before* anything is sent, so the
statement never runs and the connection stays idle and usable (``actors/driver.py``,
"Checkpoint rule"; the pool relies on it and adds no check of its own before a driver call).

Why a test of its own: the systematic cancellation row (tests/faults/test_cancel_points.py)
found the native driver with ``io=trio`` sending the statement first (psycopg's protocol
generator writes the query before the first Trio wait), committing it in autocommit while the
client got ``Cancelled``. This checks the rule on each driver directly, for each kind of call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
import trio

from actors.driver import Connection, Driver, TransactionOptions
from actors.psycopg import PsycopgDriver

DRIVERS = ["psycopg io=trio", "psycopg io=thread", "hosted asyncpg", "hosted psycopg"]


def _make(kind: str, dsn: str) -> Driver:
    if kind == "psycopg io=trio":
        return PsycopgDriver(dsn, io="trio")
    if kind == "psycopg io=thread":
        return PsycopgDriver(dsn, io="thread")
    pytest.importorskip("trio_asyncio")
    from actors.aio import AsyncpgDriver, AsyncPsycopgDriver

    if kind == "hosted asyncpg":
        pytest.importorskip("asyncpg")
        return AsyncpgDriver(dsn)
    return AsyncPsycopgDriver(dsn)


@pytest.fixture(params=DRIVERS)
async def conn(request: pytest.FixtureRequest, pg_dsn: str) -> AsyncIterator[Connection]:
    driver = _make(str(request.param), pg_dsn)
    connection = await driver.connect(driver.options)
    try:
        yield connection
    finally:
        await connection.close()
        close = getattr(driver, "close", None)  # the hosted drivers stop their loop
        if close is not None:
            await close()


def _placeholder(conn: Connection) -> str:
    return "$1" if getattr(conn, "paramstyle", None) == "numeric" else "%s"


CALLS: dict[str, Callable[[Connection, str], Any]] = {
    "execute": lambda c, t: c.execute(f"insert into {t} values ({_placeholder(c)})", (1,)),
    "fetch": lambda c, t: c.fetch(f"insert into {t} values (2) returning id"),
    "begin": lambda c, t: c.begin(TransactionOptions()),
    "prepare": lambda c, t: c.prepare(f"insert into {t} values (3)"),
    "ping": lambda c, t: c.ping(),
}


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_a_call_in_an_already_cancelled_scope_sends_nothing(
    conn: Connection, call: str, make_table: Callable[[str], str], pg_dsn: str
) -> None:
    table = make_table("id int primary key")
    with trio.CancelScope() as scope:
        scope.cancel()
        await CALLS[call](conn, table)
    assert scope.cancelled_caught
    assert conn.status() == "idle"  # nothing half-sent: no drain, no cancel needed
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        row = c.execute(f"select count(*) from {table}").fetchone()
    assert row == (0,)  # the statement never ran
    assert await conn.fetch("select 41 + 1") == [(42,)]  # and the connection is usable
