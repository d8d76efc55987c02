"""Session hygiene on SQLite files: what one lease leaves in its session is gone for the next
(temporary tables, views and triggers, attached databases, pragmas), and a clean lease costs no
reset. Then the same protocol on the scripted driver: which leases are followed by a
``reset_session`` call, and what comes after it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actors.driver import ConnectionLost
from actors.scripted import ScriptedDriver
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


# -- more kinds of leak, on real files ----------------------------------------------------------


@pytest.mark.parametrize("reset", ["auto", "always"])
async def test_a_pragma_the_pool_set_itself_is_put_back_after_a_lease_changed_it(
    url: str, reset: Any
) -> None:
    async with open_pool(url, size=1, reset=reset) as pool:
        assert await pool.fetch_val("pragma foreign_keys") == 1  # the driver turns it on
        await pool.execute("pragma foreign_keys = off")
        assert await pool.fetch_val("pragma foreign_keys") == 1


async def test_with_reset_never_attachments_and_pragmas_are_seen_by_the_next_lease(
    url: str, tmp_path: Path
) -> None:
    async with open_pool(url, size=1, reset="never") as pool:
        await pool.execute(f"attach database '{tmp_path / 'other.db'}' as other")
        await pool.execute("pragma foreign_keys = off")
        names = [row[1] for row in await pool.fetch_all("pragma database_list")]
        assert "other" in names
        assert await pool.fetch_val("pragma foreign_keys") == 0


async def test_temp_views_and_temp_triggers_on_main_tables_are_dropped(url: str) -> None:
    async with open_pool(url, size=1) as pool:
        await pool.execute("create table item (id integer primary key)")
        await pool.execute("create table audit (id integer)")
        async with pool.run() as conn:
            await conn.execute("create temp view recent as select id from item")
            await conn.execute(
                "create temp trigger copy after insert on main.item "
                "begin insert into audit values (new.id); end"
            )
            await conn.execute("insert into item values (1)")
            assert await conn.fetch_val("select count(*) from audit") == 1
        await pool.execute("insert into item values (2)")
        assert await pool.fetch_val("select count(*) from audit") == 1  # the trigger is gone
        assert await pool.fetch_val("select count(*) from temp.sqlite_master") == 0


async def test_the_shared_in_memory_database_survives_a_session_reset() -> None:
    async with open_pool("sqlite://:memory:", size=1) as pool:
        await pool.execute("create table kept (x integer)")
        await pool.execute("insert into kept values (7)")
        async with pool.run() as conn:
            await conn.execute("create temp table scratch (x integer)")
        assert await pool.fetch_val("select x from kept") == 7
        assert await pool.fetch_val("select count(*) from temp.sqlite_master") == 0


async def test_after_connect_settings_are_back_after_a_reset(url: str) -> None:
    async def setup(conn: Any) -> None:
        await conn.execute("pragma recursive_triggers = on")

    async with open_pool(url, size=1, after_connect=setup) as pool:
        assert await pool.fetch_val("pragma recursive_triggers") == 1
        async with pool.run() as conn:
            await conn.execute("pragma recursive_triggers = off")
            await conn.execute("create temp table scratch (x integer)")
        assert await pool.fetch_val("pragma recursive_triggers") == 1
        assert await pool.fetch_val("select count(*) from temp.sqlite_master") == 0


async def test_a_custom_reset_is_awaited_after_every_lease_with_a_working_handle(
    url: str,
) -> None:
    seen: list[int] = []

    async def reset(conn: Any) -> None:
        seen.append(await conn.fetch_val("select count(*) from temp.sqlite_master"))
        await conn.execute("drop table if exists temp.scratch")

    async with open_pool(url, size=1, reset=reset) as pool:
        await pool.fetch_val("select 1")
        await pool.wait()
        async with pool.run() as conn:
            await conn.execute("create temp table scratch (x integer)")
        await pool.wait()
        assert await pool.fetch_val("select count(*) from temp.sqlite_master") == 0
        await pool.wait()
        assert seen == [0, 1, 0]  # one call per lease, clean ones included


# -- the protocol, on the scripted driver -------------------------------------------------------


async def test_auto_sends_reset_session_only_after_a_dirty_lease() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1) as pool:
        await pool.execute("update t set x = 1")
        await pool.fetch_all("select 1")
        await pool.wait()
        assert "reset_session" not in driver.ops()
        await pool.execute("set search_path = app")
        await pool.wait()
        assert driver.ops(1, exclude={"ping"}) == [
            "execute", "fetch", "execute", "reset", "reset_session",
        ]


async def test_always_sends_reset_session_after_every_lease_and_never_sends_none() -> None:
    always = ScriptedDriver()
    async with open_pool(always, size=1, reset="always") as pool:
        await pool.fetch_all("select 1")
        await pool.wait()
        await pool.fetch_all("select 2")
        await pool.wait()
    assert always.ops().count("reset_session") == 2
    never = ScriptedDriver()
    async with open_pool(never, size=1, reset="never") as pool:
        await pool.execute("set search_path = app")
        await pool.wait()
        await pool.fetch_all("select 1")
    assert "reset_session" not in never.ops()


async def test_after_connect_runs_again_after_a_built_in_reset() -> None:
    driver = ScriptedDriver()

    async def setup(conn: Any) -> None:
        await conn.execute("select 'setup'")

    async with open_pool(driver, size=1, after_connect=setup) as pool:
        await pool.execute("set x = 1")
        await pool.wait()
    queries = [c.args[0] for c in driver.calls if c.op == "execute"]
    assert queries == ["select 'setup'", "set x = 1", "select 'setup'"]
    ops = driver.ops(1, exclude={"ping", "close"})
    assert ops == ["execute", "execute", "reset", "reset_session", "execute"]


async def test_a_failed_session_reset_replaces_the_connection() -> None:
    driver = ScriptedDriver()
    driver.script("reset_session", ConnectionLost("cannot reset"))
    async with open_pool(driver, size=1) as pool:
        await pool.execute("set x = 1")
        await pool.wait()
        await pool.fetch_all("select 1")
        assert driver.calls[-1].conn == 2
    assert driver.connections[0].closed


@pytest.mark.parametrize(
    ("query", "dirty"),
    [
        ("select 1", False),
        ("insert into t values (1)", False),
        ("update t set x = 1", False),
        ("create table t (x integer)", False),
        ("pragma foreign_keys = off", True),
        ("PRAGMA cache_size", True),
        ("select * from pragma_table_info('t')", False),  # read-only pragma functions
        ("attach database 'x.db' as x", True),
        ("detach database x", True),
        ("create temp table t (x integer)", True),
        ("CREATE TEMPORARY VIEW v AS SELECT 1", True),
        ("create temp trigger tr after insert on t begin select 1; end", True),
        ("create table temp.t (x integer)", True),
        ("insert into temp.t values (1)", True),
        ("create /* why */ temp table t (x integer)", True),
        ('create table "temp".t (x integer)', True),
        ("create table [temp].t (x integer)", True),
        ("select 'temporary' as word", False),
        ("CREATE TABLE 'temp'.t1 (x)", True),
        ("select 'unterminated", True),
    ],
)
def test_sqlite_counts_pragmas_attachments_and_temp_objects_as_session_state(
    query: str, dirty: bool
) -> None:
    # The method reads nothing from the connection: call it unbound, without a database.
    assert SqliteConnection.leaves_session_state(None, query) is dirty  # type: ignore[arg-type]
