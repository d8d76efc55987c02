"""The SQL sandbox on the real server: nothing reaches the database for good, a failing
statement does not poison the test (PostgreSQL aborts a whole transaction on an error: the
sandbox's per-block savepoints undo only the failed block), the application's transactions
are savepoints."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from supervisor import IntegrityError, open_pool
from supervisor.testing import sandbox


def _count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn) as c:
        row = c.execute(f"select count(*) from {table}").fetchone()
        assert row is not None
        return int(row[0])


async def test_the_sandbox_rolls_everything_back_and_survives_a_failed_statement(
    pg_dsn: str, make_table: Callable[[str], str]
) -> None:
    table = make_table("id int primary key")
    async with open_pool(pg_dsn, size=2) as pool:
        async with sandbox(pool):
            await pool.execute(f"insert into {table} values (1)")
            with pytest.raises(IntegrityError):
                await pool.execute(f"insert into {table} values (1)")
            async with pool.transaction(isolation="serializable") as tx:  # a savepoint here
                await tx.execute(f"insert into {table} values (2)")
            assert await pool.fetch_column(f"select id from {table} order by id") == [1, 2]
            assert _count(pg_dsn, table) == 0
        assert _count(pg_dsn, table) == 0
        assert await pool.fetch_val(f"select count(*) from {table}") == 0
        async with pool.run() as conn:
            assert conn.status() == "idle"
