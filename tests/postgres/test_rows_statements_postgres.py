"""Rows, statements and execute_many on the real server, in both I/O modes: column names as
PostgreSQL reports them, statements prepared once per backend (and again on a new one), and
execute_many's total, atomicity and transaction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from actors.psycopg import PsycopgDriver
from supervisor import IntegrityError, open_pool
from supervisor.rows import class_row, dict_row, namedtuple_row, tuple_row

from .cluster import Admin

IO = pytest.mark.parametrize("io", ["trio", "thread"])


def _driver(dsn: str, io: str) -> PsycopgDriver:
    return PsycopgDriver(dsn, io=io)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Item:
    id: int
    label: str


async def _fill(pool: Any, table: str, n: int = 3) -> None:
    rows = [(i, chr(ord("a") + i - 1)) for i in range(1, n + 1)]
    await pool.execute_many(f"insert into {table} values (%s, %s)", rows)


# -- rows ---------------------------------------------------------------------------------------


@IO
async def test_a_pool_wide_dict_row_applies_to_fetch_all_fetch_one_and_streams(
    pg_dsn: str, make_table: Callable[[str], str], io: str
) -> None:
    table = make_table("id int primary key, label text")
    async with open_pool(_driver(pg_dsn, io), size=1, row_factory=dict_row) as pool:
        await _fill(pool, table)
        assert await pool.fetch_all(f"select id, label from {table} order by id") == [
            {"id": 1, "label": "a"}, {"id": 2, "label": "b"}, {"id": 3, "label": "c"},
        ]
        assert await pool.fetch_one(f"select label, id from {table} where id = %s", (2,)) == {
            "label": "b", "id": 2,
        }
        async with pool.run() as conn:
            streamed = [row async for row in conn.stream(
                f"select id, label from {table} order by id", batch_size=2
            )]
        assert streamed == [{"id": 1, "label": "a"}, {"id": 2, "label": "b"},
                            {"id": 3, "label": "c"}]


@IO
async def test_column_names_are_exactly_what_postgresql_reports(pg_dsn: str, io: str) -> None:
    async with open_pool(_driver(pg_dsn, io), size=1, row_factory=dict_row) as pool:
        row = await pool.fetch_one(
            'select 1 as "Mixed Case", 2 as UPPER, 3 as "größe", 4, count(*) from (values (1)) v'
        )
        assert row == {"Mixed Case": 1, "upper": 2, "größe": 3, "?column?": 4, "count": 1}


@IO
async def test_a_per_call_row_factory_overrides_the_pools_on_handles_and_statements(
    pg_dsn: str, make_table: Callable[[str], str], io: str
) -> None:
    table = make_table("id int primary key, label text")
    async with open_pool(_driver(pg_dsn, io), size=1, row_factory=dict_row) as pool:
        await _fill(pool, table)
        query = f"select id, label from {table} order by id"
        assert await pool.fetch_all(query, row_factory=tuple_row) == [
            (1, "a"), (2, "b"), (3, "c"),
        ]
        stmt = pool.statement(f"select id, label from {table} where id = %s")
        named = await stmt.fetch_one((1,), row_factory=namedtuple_row)
        assert named.id == 1 and named.label == "a"
        assert await stmt.fetch_all((2,), row_factory=class_row(Item)) == [Item(2, "b")]
        assert await stmt.fetch_all((3,)) == [{"id": 3, "label": "c"}]  # the pool's default
        async with pool.run() as conn:
            assert await conn.fetch_one(stmt, (2,), row_factory=tuple_row) == (2, "b")
            every = pool.statement(query)
            streamed = [row async for row in every.stream(batch_size=2,
                                                          row_factory=class_row(Item))]
        assert streamed == [Item(1, "a"), Item(2, "b"), Item(3, "c")]


@IO
async def test_names_of_a_large_result_are_right_too(
    pg_dsn: str, make_table: Callable[[str], str], io: str
) -> None:
    # Past 100 rows the driver decodes the names at once instead of keeping the result.
    async with open_pool(_driver(pg_dsn, io), size=1, row_factory=dict_row) as pool:
        rows = await pool.fetch_all("select g as n, g * 2 as twice from generate_series(1, 500) g")
        assert len(rows) == 500 and rows[-1] == {"n": 500, "twice": 1000}
        assert await pool.fetch_one("select 1 as small") == {"small": 1}


@IO
async def test_fetch_val_and_fetch_column_give_plain_values_whatever_the_row_factory(
    pg_dsn: str, make_table: Callable[[str], str], io: str
) -> None:
    table = make_table("id int primary key, label text")
    async with open_pool(_driver(pg_dsn, io), size=1, row_factory=dict_row) as pool:
        await _fill(pool, table)
        assert await pool.fetch_val(f"select count(*) from {table}") == 3
        assert await pool.fetch_column(f"select label from {table} order by id") == [
            "a", "b", "c",
        ]
        stmt = pool.statement(f"select label from {table} where id = %s")
        assert await stmt.fetch_val((1,)) == "a"
        assert await stmt.fetch_column((2,)) == ["b"]


@IO
async def test_the_driver_reports_no_columns_after_a_statement_without_rows(
    pg_dsn: str, io: str
) -> None:
    conn = await _driver(pg_dsn, io).connect(conninfo_to_dict(pg_dsn))
    try:
        assert conn.columns() == []
        await conn.fetch("select 1 as one, 2 as two")
        assert conn.columns() == ["one", "two"]
        assert conn.columns() == ["one", "two"]  # asking twice gives the same
        await conn.execute("set work_mem = '4MB'")
        assert conn.columns() == []
        cursor = await conn.open_cursor("select 1 as a, 'x' as b", None, 10)
        assert await cursor.fetch_batch() == [(1, "x")]
        assert cursor.columns() == ["a", "b"]
        await cursor.close()
    finally:
        await conn.close()


# -- statements ---------------------------------------------------------------------------------


async def _prepared_on(admin: Admin, pool: Any) -> list[str]:
    async with pool.run() as conn:
        names: list[str] = await conn.fetch_column(
            "select statement from pg_prepared_statements where name like '\\_pg3\\_%'"
        )
    return names


@IO
async def test_a_statement_is_prepared_once_per_backend_and_again_on_a_new_one(
    pg_dsn: str, pg_admin: Admin, io: str
) -> None:
    async with open_pool(_driver(pg_dsn, io), size=1, idle_interval=60.0) as pool:
        stmt = pool.statement("select %s::int * 3")
        assert await stmt.fetch_val((1,)) == 3
        async with pool.run() as conn:
            assert await conn.fetch_one(stmt, (2,)) == (6,)
            pid = await conn.fetch_val("select pg_backend_pid()")
        assert await _prepared_on(pg_admin, pool) == ["select $1::int * 3"]  # one, after two uses
        assert pg_admin.terminate(pid)
        assert await stmt.fetch_val((3,)) == 9  # a new backend: prepared there, transparently
        assert await pool.fetch_val("select pg_backend_pid()") != pid
        assert await _prepared_on(pg_admin, pool) == ["select $1::int * 3"]


@IO
async def test_a_statement_runs_every_verb_through_the_pool(
    pg_dsn: str, make_table: Callable[[str], str], io: str
) -> None:
    table = make_table("id int primary key, label text")
    async with open_pool(_driver(pg_dsn, io), size=2) as pool:
        insert = pool.statement(f"insert into {table} values (%s, %s)")
        assert await insert.execute((1, "a")) == 1
        assert await insert.execute_many([(2, "b"), (3, "c")]) == 2
        async with pool.transaction() as tx:
            assert await tx.execute(insert, (4, "d")) == 1
            assert await insert.execute((5, "e")) == 1  # joins the task's transaction
            tx.rollback()
        select = pool.statement(f"select label from {table} order by id")
        assert await select.fetch_column() == ["a", "b", "c"]


# -- execute_many -------------------------------------------------------------------------------


@IO
async def test_execute_many_returns_the_total_rows_affected(
    pg_dsn: str, make_table: Callable[[str], str], io: str
) -> None:
    table = make_table("id int primary key, label text")
    async with open_pool(_driver(pg_dsn, io), size=1) as pool:
        await _fill(pool, table, 5)
        assert await pool.execute_many(
            f"update {table} set label = label || %s where id <= %s", [("!", 2), ("?", 5)]
        ) == 7
        async with pool.run() as conn:
            assert await conn.execute_many(
                f"delete from {table} where id = %s", [(1,), (99,), (2,)]
            ) == 2
        assert await pool.execute_many(f"delete from {table} where id = %s", []) == 0
        assert await pool.fetch_column(f"select label from {table} order by id") == [
            "c?", "d?", "e?",
        ]


@IO
async def test_execute_many_is_atomic_on_a_handle_and_leaves_it_usable(
    pg_dsn: str, make_table: Callable[[str], str], io: str
) -> None:
    table = make_table("id int primary key")
    async with open_pool(_driver(pg_dsn, io), size=1) as pool:
        async with pool.run() as conn:
            with pytest.raises(IntegrityError):
                await conn.execute_many(
                    f"insert into {table} values (%s)", [(1,), (2,), (3,), (2,), (4,)]
                )
            assert conn.status() == "idle"
            assert await conn.fetch_val(f"select count(*) from {table}") == 0
            assert await conn.execute_many(f"insert into {table} values (%s)", [(7,)]) == 1


@IO
async def test_a_failing_execute_many_inside_a_transaction_fails_that_transaction(
    pg_dsn: str, make_table: Callable[[str], str], io: str
) -> None:
    table = make_table("id int primary key")
    async with open_pool(_driver(pg_dsn, io), size=1) as pool:
        with pytest.raises(IntegrityError):
            async with pool.transaction() as tx:
                await tx.execute(f"insert into {table} values (100)")
                await tx.execute_many(f"insert into {table} values (%s)", [(1,), (100,)])
        assert await pool.fetch_val(f"select count(*) from {table}") == 0
