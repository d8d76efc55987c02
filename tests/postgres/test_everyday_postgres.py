"""Everyday application features on the real server: session hygiene between leases, named
rows, statements shared by every connection, execute_many."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from supervisor import QueryError, open_pool
from supervisor.rows import class_row, dict_row, namedtuple_row

LEAKS = {
    "set search_path": ("set search_path = pg_catalog", "show search_path", '"$user", public'),
    "set_config": (
        "select set_config('application_name', 'leaked', false)",
        "show application_name",
        None,
    ),
    "temp table": (
        "create temp table leak (x int)",
        "select count(*) from pg_tables where tablename = 'leak'",
        0,
    ),
    "listen": ("listen leak_channel", "select count(*) from pg_listening_channels()", 0),
    "advisory lock": (
        "select pg_advisory_lock(4242)",
        "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()",
        0,
    ),
    "prepare": ("prepare leak as select 1", "select count(*) from pg_prepared_statements", 0),
}


@pytest.mark.parametrize("reset", ["auto", "always"])
@pytest.mark.parametrize("leak", sorted(LEAKS))
async def test_the_next_lease_never_sees_session_state_left_by_the_previous(
    pg_dsn: str, reset: str, leak: str
) -> None:
    dirty, probe, clean = LEAKS[leak]
    async with open_pool(pg_dsn, size=1, reset=reset) as pool:  # type: ignore[arg-type]
        baseline = await pool.fetch_val(probe)
        async with pool.run() as conn:
            pid = await conn.fetch_val("select pg_backend_pid()")
            await conn.fetch_all(dirty)
        async with pool.run() as conn:
            assert await conn.fetch_val("select pg_backend_pid()") == pid  # same connection
            after = await conn.fetch_val(probe)
        assert after == (baseline if clean is None else clean)


async def test_with_reset_never_the_leak_is_visible(pg_dsn: str) -> None:
    async with open_pool(pg_dsn, size=1, reset="never") as pool:
        async with pool.run() as conn:
            await conn.execute("set search_path = pg_catalog")
        assert await pool.fetch_val("show search_path") == "pg_catalog"


async def test_a_with_hold_cursor_does_not_survive_into_the_next_lease(pg_dsn: str) -> None:
    async with open_pool(pg_dsn, size=1) as pool:
        async with pool.transaction() as tx:
            await tx.execute("declare held cursor with hold for select 1")
        assert await pool.fetch_val("select count(*) from pg_cursors") == 0


async def test_after_connect_settings_come_back_after_a_reset(pg_dsn: str) -> None:
    async def setup(conn: object) -> None:
        await conn.execute("set application_name = 'from_after_connect'")  # type: ignore[attr-defined]

    async with open_pool(pg_dsn, size=1, after_connect=setup) as pool:
        async with pool.run() as conn:
            await conn.execute("set application_name = 'changed'")
        assert await pool.fetch_val("show application_name") == "from_after_connect"


async def test_a_custom_reset_is_awaited_after_every_lease(pg_dsn: str) -> None:
    calls: list[str] = []

    async def reset(conn: object) -> None:
        calls.append("reset")
        await conn.execute("reset all")  # type: ignore[attr-defined]

    async with open_pool(pg_dsn, size=1, reset=reset) as pool:
        await pool.fetch_val("select 1")
        await pool.fetch_val("select 2")
        await pool.fetch_val("select 3")
    assert calls.count("reset") >= 2


@dataclass
class Item:
    id: int
    label: str


async def test_rows_come_back_as_the_row_factory_makes_them(
    pg_dsn: str, make_table: Callable[[str], str]
) -> None:
    table = make_table("id int primary key, label text")
    async with open_pool(pg_dsn, size=1, row_factory=dict_row) as pool:
        assert await pool.execute_many(
            f"insert into {table} values (%s, %s)", [(1, "a"), (2, "b"), (3, "c")]
        ) == 3
        assert await pool.fetch_all(f"select id, label from {table} order by id limit 2") == [
            {"id": 1, "label": "a"}, {"id": 2, "label": "b"},
        ]
        row = await pool.fetch_one(
            'select 1 as "Mixed Case", 2 as two', row_factory=namedtuple_row
        )
        assert row == (1, 2) and row.two == 2
        items = await pool.fetch_all(
            f"select * from {table} order by id", row_factory=class_row(Item)
        )
        assert items[2] == Item(3, "c")
        async with pool.run() as conn:
            streamed = [r async for r in conn.stream(f"select id from {table} order by id",
                                                     batch_size=2)]
        assert streamed == [{"id": 1}, {"id": 2}, {"id": 3}]
        assert await pool.fetch_val(f"select count(*) from {table}") == 3


async def test_execute_many_is_atomic(pg_dsn: str, make_table: Callable[[str], str]) -> None:
    table = make_table("id int primary key")
    async with open_pool(pg_dsn, size=1) as pool:
        with pytest.raises(QueryError):
            await pool.execute_many(f"insert into {table} values (%s)", [(1,), (2,), (1,)])
        assert await pool.fetch_val(f"select count(*) from {table}") == 0


async def test_a_statement_is_prepared_once_per_connection_and_survives_a_reset(
    pg_dsn: str,
) -> None:
    async with open_pool(pg_dsn, size=1, row_factory=dict_row) as pool:
        stmt = pool.statement("select %s::int + 1 as n")
        for i in range(8):  # psycopg prepares after its threshold; the statement asks at once
            assert await stmt.fetch_one((i,)) == {"n": i + 1}
        async with pool.run() as conn:
            names = await conn.fetch_column("select name from pg_prepared_statements")
            assert len(names) == 1
            await conn.execute("set search_path = public")  # dirties the session: DISCARD ALL
        assert await stmt.fetch_val((41,)) == 42  # prepared again, transparently
        async with pool.run() as conn:
            assert await conn.fetch_one(stmt, (1,)) == {"n": 2}


async def test_set_role_does_not_survive_into_the_next_lease(pg_dsn: str, pg_server: Any) -> None:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    role = "tcs_reader_role"
    user = str(conninfo_to_dict(pg_dsn)["user"])
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as admin:
        admin.execute(f"drop role if exists {role}")
        admin.execute(f"create role {role}")
        admin.execute(f'grant {role} to "{user}"')
    try:
        async with open_pool(pg_dsn, size=1) as pool:
            me = await pool.fetch_val("select current_user")
            async with pool.run() as conn:
                await conn.execute(f"set role {role}")
                assert await conn.fetch_val("select current_user") == role
            assert await pool.fetch_val("select current_user") == me
    finally:
        with psycopg.connect(pg_server.admin_dsn, autocommit=True) as admin:
            admin.execute(f"drop role if exists {role}")


@pytest.mark.parametrize("io", ["trio", "thread"])
async def test_execute_many_is_pipelined_and_joins_the_callers_transaction(
    pg_dsn: str, make_table: Callable[[str], str], io: str
) -> None:
    from actors.psycopg import PsycopgDriver

    table = make_table("id int primary key")
    async with open_pool(PsycopgDriver(pg_dsn, io=io), size=1) as pool:  # type: ignore[arg-type]
        async with pool.transaction() as tx:
            added = await pool.execute_many(
                f"insert into {table} values (%s)", [(i,) for i in range(50)]
            )
            assert added == 50
            tx.rollback()  # the caller's transaction: all 50 go with it
        assert await pool.fetch_val(f"select count(*) from {table}") == 0
        assert await pool.execute_many(f"insert into {table} values (%s)", [(1,), (2,)]) == 2
