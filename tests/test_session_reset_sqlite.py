"""Session hygiene on SQLite files: what one lease leaves in its session is gone for the next
(temporary tables, attached databases, pragmas), and a clean lease costs no reset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actors.sqlite import SqliteConnection
from supervisor import open_pool


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'app.db'}"


@pytest.mark.parametrize("reset", ["auto", "always"])
async def test_temp_tables_attachments_and_pragmas_do_not_leak(
    url: str, tmp_path: Path, reset: Any
) -> None:
    other = tmp_path / "other.db"
    async with open_pool(url, size=1, reset=reset) as pool:
        before = await pool.fetch_val("pragma recursive_triggers")
        async with pool.run() as conn:
            await conn.execute("create temp table scratch (x integer)")
            await conn.execute(f"attach database '{other}' as other")
            await conn.execute(f"pragma recursive_triggers = {1 - before}")
        async with pool.run() as conn:
            assert await conn.fetch_column(
                "select name from temp.sqlite_master where type = 'table'"
            ) == []
            names = [r[1] for r in await conn.fetch_all("pragma database_list")]
            assert "other" not in names and "main" in names
            assert await conn.fetch_val("pragma recursive_triggers") == before


async def test_with_reset_never_a_temp_table_is_seen_by_the_next_lease(url: str) -> None:
    async with open_pool(url, size=1, reset="never") as pool:
        await pool.execute("create temp table scratch (x integer)")
        assert await pool.fetch_val("select count(*) from temp.scratch") == 0


async def test_auto_resets_only_after_a_lease_that_may_have_left_state(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    resets: list[int] = []
    original = SqliteConnection.reset_session

    async def counting(self: SqliteConnection) -> None:
        resets.append(1)
        await original(self)

    monkeypatch.setattr(SqliteConnection, "reset_session", counting)
    async with open_pool(url, size=1) as pool:
        await pool.execute("create table if not exists t (x integer)")
        for _ in range(5):
            await pool.execute("insert into t values (1)")
            await pool.fetch_val("select count(*) from t")
        async with pool.transaction() as tx:
            await tx.execute("update t set x = 2")
        assert resets == []  # clean leases: no reset, no extra call
        await pool.execute("pragma cache_size = 100")
        await pool.fetch_val("select 1")
        assert resets == [1]


async def test_execute_many_on_sqlite_is_atomic(url: str) -> None:
    from supervisor import IntegrityError

    async with open_pool(url, size=1) as pool:
        await pool.execute("create table u (id integer primary key)")
        assert await pool.execute_many("insert into u values (?)", [(1,), (2,)]) == 2
        with pytest.raises(IntegrityError):
            await pool.execute_many("insert into u values (?)", [(3,), (1,)])
        assert await pool.fetch_column("select id from u order by id") == [1, 2]
