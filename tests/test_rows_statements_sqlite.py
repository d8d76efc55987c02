"""Rows, statements and execute_many on SQLite files (and the test drivers' versions of the
optional protocol methods: the scripted driver's column names, the fault driver's forwarding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from actors.driver import ConnectionLost
from actors.faults import FaultDriver
from actors.scripted import ScriptedDriver
from actors.sqlite import SqliteDriver
from supervisor import IntegrityError, PoolError, open_pool
from supervisor.rows import class_row, dict_row, namedtuple_row, tuple_row


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'app.db'}"


@dataclass(frozen=True)
class Item:
    id: int
    label: str


async def _fill(pool: Any) -> None:
    await pool.execute("create table item (id integer primary key, label text not null)")
    await pool.execute_many("insert into item values (?, ?)", [(1, "a"), (2, "b"), (3, "c")])


# -- rows ---------------------------------------------------------------------------------------


async def test_a_pool_wide_dict_row_makes_every_fetch_a_dict_keyed_by_column_name(
    url: str,
) -> None:
    async with open_pool(url, size=1, row_factory=dict_row) as pool:
        await _fill(pool)
        assert await pool.fetch_all("select id, label from item order by id") == [
            {"id": 1, "label": "a"},
            {"id": 2, "label": "b"},
            {"id": 3, "label": "c"},
        ]
        assert await pool.fetch_one("select label, id from item where id = 2") == {
            "label": "b",
            "id": 2,
        }
        async with pool.run() as conn:
            streamed = [row async for row in conn.stream("select id from item order by id",
                                                        batch_size=2)]
        assert streamed == [{"id": 1}, {"id": 2}, {"id": 3}]


async def test_column_names_are_the_ones_the_database_reports(url: str) -> None:
    async with open_pool(url, size=1, row_factory=dict_row) as pool:
        row = await pool.fetch_one('select 1 as "Mixed Case", 2 as "two words", 3 as lower')
        assert row == {"Mixed Case": 1, "two words": 2, "lower": 3}


async def test_a_per_call_row_factory_overrides_the_pools(url: str) -> None:
    async with open_pool(url, size=1, row_factory=dict_row) as pool:
        await _fill(pool)
        assert await pool.fetch_all(
            "select id, label from item order by id", row_factory=tuple_row
        ) == [(1, "a"), (2, "b"), (3, "c")]
        named = await pool.fetch_one(
            "select id, label from item where id = 1", row_factory=namedtuple_row
        )
        assert named == (1, "a") and named.id == 1 and named.label == "a"
        async with pool.run() as conn:
            items = await conn.fetch_all(
                "select id, label from item order by id", row_factory=class_row(Item)
            )
            assert items == [Item(1, "a"), Item(2, "b"), Item(3, "c")]
            streamed = [row async for row in conn.stream(
                "select label, id from item order by id", batch_size=2,
                row_factory=class_row(Item),
            )]
            assert streamed == items


async def test_fetch_val_and_fetch_column_give_plain_values_whatever_the_row_factory(
    url: str,
) -> None:
    async with open_pool(url, size=1, row_factory=dict_row) as pool:
        await _fill(pool)
        assert await pool.fetch_val("select count(*) from item") == 3
        assert await pool.fetch_column("select label from item order by id") == ["a", "b", "c"]


async def test_an_optional_fetch_one_without_a_row_is_none_with_any_row_factory(url: str) -> None:
    async with open_pool(url, size=1, row_factory=dict_row) as pool:
        await _fill(pool)
        assert await pool.fetch_one("select * from item where id = 99", optional=True) is None


# -- statements ---------------------------------------------------------------------------------


async def test_a_statement_runs_through_the_pool_and_in_place_of_a_query_on_a_handle(
    url: str,
) -> None:
    async with open_pool(url, size=1) as pool:
        await _fill(pool)
        stmt = pool.statement("select id, label from item where id = ?")
        assert await stmt.fetch_all((1,)) == [(1, "a")]
        assert await stmt.fetch_one((2,), row_factory=dict_row) == {"id": 2, "label": "b"}
        assert await stmt.fetch_val((3,)) == 3
        assert await stmt.fetch_column((3,)) == [3]
        async with pool.run() as conn:
            assert await conn.fetch_one(stmt, (1,), row_factory=class_row(Item)) == Item(1, "a")
            assert await conn.fetch_all(stmt, (2,)) == [(2, "b")]
            every = pool.statement("select id from item order by id")
            streamed = [row async for row in every.stream(batch_size=2,
                                                          row_factory=namedtuple_row)]
            assert [row.id for row in streamed] == [1, 2, 3]
        insert = pool.statement("insert into item values (?, ?)")
        assert await insert.execute((4, "d")) == 1
        assert await insert.execute_many([(5, "e"), (6, "f")]) == 2
        assert await pool.fetch_val("select count(*) from item") == 6


async def test_a_statement_keeps_working_after_a_session_reset(url: str) -> None:
    async with open_pool(url, size=1) as pool:
        await _fill(pool)
        stmt = pool.statement("select label from item where id = ?")
        assert await stmt.fetch_val((1,)) == "a"
        async with pool.run() as conn:
            await conn.execute("create temp table scratch (x integer)")  # dirty: reset follows
        assert await stmt.fetch_val((2,)) == "b"


# -- execute_many -------------------------------------------------------------------------------


async def test_execute_many_returns_the_total_rows_affected(url: str) -> None:
    async with open_pool(url, size=1) as pool:
        await _fill(pool)
        assert await pool.execute_many(
            "update item set label = label || ? where id <= ?", [("!", 2), ("?", 3)]
        ) == 5
        async with pool.run() as conn:
            assert await conn.execute_many("delete from item where id = ?", [(1,), (9,)]) == 1
        assert await pool.execute_many("delete from item where id = ?", []) == 0


async def test_execute_many_is_atomic_a_failing_row_inserts_none(url: str) -> None:
    async with open_pool(url, size=1) as pool:
        await _fill(pool)
        async with pool.run() as conn:
            with pytest.raises(IntegrityError):
                await conn.execute_many(
                    "insert into item values (?, ?)", [(10, "x"), (11, "y"), (1, "dup")]
                )
            assert conn.status() == "idle"
        assert await pool.fetch_column("select id from item order by id") == [1, 2, 3]


async def test_execute_many_inside_a_transaction_is_part_of_it(url: str) -> None:
    async with open_pool(url, size=1) as pool:
        await _fill(pool)
        async with pool.transaction() as tx:
            assert await pool.execute_many("delete from item where id = ?", [(1,), (2,)]) == 2
            assert await tx.fetch_val("select count(*) from item") == 1
            tx.rollback()
        assert await pool.fetch_val("select count(*) from item") == 3
        async with pool.transaction() as tx:
            await tx.execute_many("delete from item where id = ?", [(3,)])
        assert await pool.fetch_column("select id from item order by id") == [1, 2]


# -- the scripted driver's column names ---------------------------------------------------------


async def test_the_scripted_driver_names_columns_c0_c1_by_default_or_as_scripted() -> None:
    driver = ScriptedDriver(columns={"select a, b": ["a", "b"]})
    driver.script("fetch", [(1, 2)], [(3, 4)])
    driver.script("open_cursor", [(5, 6), (7, 8)])
    async with open_pool(driver, size=1, row_factory=dict_row) as pool:
        assert await pool.fetch_all("select a, b") == [{"a": 1, "b": 2}]
        assert await pool.fetch_one("select x") == {"c0": 3, "c1": 4}
        async with pool.run() as conn:
            rows = [row async for row in conn.stream("select a, b", batch_size=1)]
    assert rows == [{"a": 5, "b": 6}, {"a": 7, "b": 8}]
    assert driver.ops(exclude={"ping"}) == ["connect", "fetch", "fetch", "open_cursor", "close"]


async def test_the_scripted_driver_records_execute_many_as_one_call() -> None:
    driver = ScriptedDriver()
    driver.script("execute_many", 3)
    async with open_pool(driver, size=1) as pool:
        assert await pool.execute_many("insert", [(1,), (2,), (3,)]) == 3
    calls = [c for c in driver.calls if c.op == "execute_many"]
    assert [c.args for c in calls] == [("insert", [(1,), (2,), (3,)])]
    assert driver.ops(exclude={"ping"}) == [
        "connect", "begin", "execute_many", "commit", "close",
    ]


# -- the fault driver forwards the optional methods ---------------------------------------------


async def test_a_fault_driver_over_sqlite_keeps_names_and_execute_many(tmp_path: Path) -> None:
    faults = FaultDriver(SqliteDriver(tmp_path / "f.db"))
    async with open_pool(faults, size=1, row_factory=dict_row) as pool:
        await pool.execute("create table t (id integer primary key)")
        assert await pool.execute_many("insert into t values (?)", [(1,), (2,)]) == 2
        assert await pool.fetch_all("select id from t order by id") == [{"id": 1}, {"id": 2}]
        faults.fail_next("execute_many", ConnectionLost)
        with pytest.raises(ConnectionLost):
            await pool.execute_many("insert into t values (?)", [(3,)])
        assert await pool.fetch_column("select id from t order by id") == [1, 2]
        assert faults.count("forced", "execute_many") == 1


async def test_a_fault_driver_has_the_optional_methods_only_when_the_inner_one_has() -> None:
    class Bare:  # a driver whose connections have none of the optional methods
        name = "bare"
        options: dict[str, Any] = {}

        def secrets(self, options: Any) -> list[str]:
            return []

        async def connect(self, options: Any) -> Any:
            conn = await ScriptedDriver().connect(options)
            return _Plain(conn)

    faults = FaultDriver(Bare())
    conn = await faults.connect({})
    for name in ("columns", "execute_many", "leaves_session_state", "reset_session"):
        assert getattr(conn, name, None) is None, name
    wrapped = await FaultDriver(ScriptedDriver()).connect({})
    for name in ("columns", "execute_many", "leaves_session_state", "reset_session"):
        assert callable(getattr(wrapped, name, None)), name


class _Plain:
    """Only the required protocol methods of a scripted connection."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name in ("columns", "execute_many", "leaves_session_state", "reset_session"):
            raise AttributeError(name)
        return getattr(self._inner, name)


async def test_rows_other_than_tuples_need_a_driver_that_reports_column_names() -> None:
    class NoNames(ScriptedDriver):
        async def connect(self, options: Any) -> Any:
            return _Plain(await super().connect(options))

    driver = NoNames()
    driver.script("fetch", [(1,)])
    async with open_pool(driver, size=1) as pool:
        with pytest.raises(PoolError, match="column names"):
            await pool.fetch_all("select 1", row_factory=dict_row)
