"""Session hygiene on the real server: every kind of session state one lease can leave behind is
gone for the next under reset="auto" and "always" (and visible under "never", which proves that
each probe sees the leak), a clean lease costs no round trip, and prepared statements, the
driver's and psycopg's, are forgotten with the session (the seam this needs is guarded here).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import actors.psycopg.seam as seam
from actors.psycopg import PsycopgDriver
from supervisor import open_pool

from .cluster import Admin, ServerInfo

# Each kind of leak: what the dirty lease runs, and a probe telling whether it is still there.
# Probes run on the next lease (``conn``) or from the admin side (``admin``, ``pid``).
Dirty = Callable[[Any], Awaitable[None]]
Probe = Callable[[Any, Admin, int], Awaitable[bool]]


async def _run(conn: Any, sql: str) -> None:
    await conn.fetch_all(sql)


def _statement(sql: str) -> Dirty:
    return lambda conn: _run(conn, sql)


async def _held_cursor(conn: Any) -> None:
    async with conn.transaction() as tx:
        await tx.execute("declare leak_held cursor with hold for select 1")


async def _search_path_changed(conn: Any, admin: Admin, pid: int) -> bool:
    return bool(await conn.fetch_val("show search_path") != '"$user", public')


async def _temp_table(conn: Any, admin: Admin, pid: int) -> bool:
    return await conn.fetch_val("select to_regclass('pg_temp.leak_t')::text") is not None


async def _listening(conn: Any, admin: Admin, pid: int) -> bool:
    return bool(await conn.fetch_val("select count(*) from pg_listening_channels()"))


def _advisory(key: int) -> Probe:
    async def probe(conn: Any, admin: Admin, pid: int) -> bool:
        # From the admin side: the lock belongs to the session, whoever asks.
        held = admin.value(
            "select count(*) from pg_locks where locktype = 'advisory' and objid = %s"
            " and pid = %s",
            (key, pid),
        )
        return bool(held)

    return probe


async def _prepared(conn: Any, admin: Admin, pid: int) -> bool:
    return bool(
        await conn.fetch_val("select count(*) from pg_prepared_statements where name = 'leak_p'")
    )


async def _cursor_held(conn: Any, admin: Admin, pid: int) -> bool:
    return bool(await conn.fetch_val("select count(*) from pg_cursors where name = 'leak_held'"))


async def _role_changed(conn: Any, admin: Admin, pid: int) -> bool:
    return bool(await conn.fetch_val("select current_user <> session_user"))


ROLE = f"tcs_reset_role_{uuid.uuid4().hex[:8]}"

LEAKS: dict[str, tuple[Dirty, Probe]] = {
    "set search_path": (_statement("set search_path = pg_catalog"), _search_path_changed),
    "set_config search_path": (
        _statement("select set_config('search_path', 'x', false)"),
        _search_path_changed,
    ),
    "set in a multi-statement text": (
        _statement("select 1; set search_path = pg_catalog"),
        _search_path_changed,
    ),
    "set role": (_statement(f"set role {ROLE}"), _role_changed),
    "create temp table": (_statement("create temp table leak_t (x int)"), _temp_table),
    "listen": (_statement("listen leak_channel"), _listening),
    "pg_advisory_lock": (_statement("select pg_advisory_lock(4242)"), _advisory(4242)),
    "pg_try_advisory_lock": (_statement("select pg_try_advisory_lock(4243)"), _advisory(4243)),
    "prepare": (_statement("prepare leak_p as select 1"), _prepared),
    "declare with hold": (_held_cursor, _cursor_held),
}


@pytest.fixture(scope="module")
def role(pg_server: ServerInfo) -> Iterator[str]:
    """A role the test user may SET ROLE to (made by the admin)."""
    user = str(conninfo_to_dict(pg_server.dsn)["user"])
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as admin:
        admin.execute(f"create role {ROLE}")
        admin.execute(f'grant {ROLE} to "{user}"')
    yield ROLE
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as admin:
        admin.execute(f"drop role if exists {ROLE}")


async def _leak_and_probe(
    pg_dsn: str, admin: Admin, leak: str, reset: str, io: str = "trio"
) -> bool:
    """Run one kind of leak in a lease; return whether the next lease (same backend) sees it."""
    dirty, probe = LEAKS[leak]
    driver = PsycopgDriver(pg_dsn, io=io)  # type: ignore[arg-type]
    async with open_pool(driver, size=1, reset=reset, idle_interval=60.0) as pool:  # type: ignore[arg-type]
        async with pool.run() as conn:
            pid = await conn.fetch_val("select pg_backend_pid()")
            await dirty(conn)
            assert await probe(conn, admin, pid), "the probe does not see its own leak"
        await pool.wait()  # the reset (if any) is over: the connection is idle again
        async with pool.run() as conn:
            assert await conn.fetch_val("select pg_backend_pid()") == pid  # same session
            return await probe(conn, admin, pid)


@pytest.mark.parametrize("reset", ["auto", "always"])
@pytest.mark.parametrize("leak", sorted(LEAKS))
async def test_under_auto_and_always_no_kind_of_session_state_reaches_the_next_lease(
    pg_dsn: str, pg_admin: Admin, role: str, leak: str, reset: str
) -> None:
    assert await _leak_and_probe(pg_dsn, pg_admin, leak, reset) is False


@pytest.mark.parametrize("leak", sorted(LEAKS))
async def test_in_thread_mode_no_kind_of_session_state_reaches_the_next_lease(
    pg_dsn: str, pg_admin: Admin, role: str, leak: str
) -> None:
    assert await _leak_and_probe(pg_dsn, pg_admin, leak, "auto", io="thread") is False


@pytest.mark.parametrize("leak", sorted(LEAKS))
async def test_under_never_each_kind_of_session_state_is_seen_by_the_next_lease(
    pg_dsn: str, pg_admin: Admin, role: str, leak: str
) -> None:
    assert await _leak_and_probe(pg_dsn, pg_admin, leak, "never") is True


@pytest.mark.parametrize("io", ["trio", "thread"])
async def test_under_auto_a_clean_lease_costs_no_reset_and_a_dirty_one_sends_discard_all(
    pg_dsn: str, pg_admin: Admin, io: str
) -> None:
    # The backend's last statement, from pg_stat_activity: a reset would be the last one.
    driver = PsycopgDriver(pg_dsn, io=io)  # type: ignore[arg-type]
    async with open_pool(driver, size=1, idle_interval=60.0) as pool:
        pid = await pool.fetch_val("select pg_backend_pid()")
        async with pool.transaction() as tx:
            await tx.fetch_all("select 1 as clean_lease")
        await pool.wait()
        last = pg_admin.value("select query from pg_stat_activity where pid = %s", (pid,))
        assert last == "COMMIT"
        await pool.fetch_all("select 2 as clean_lease")
        await pool.wait()
        last = pg_admin.value("select query from pg_stat_activity where pid = %s", (pid,))
        assert last == "select 2 as clean_lease"
        await pool.execute("set work_mem = '8MB'")
        await pool.wait()
        last = pg_admin.value("select query from pg_stat_activity where pid = %s", (pid,))
        assert last == "DISCARD ALL"


async def test_after_connect_runs_again_after_the_reset(pg_dsn: str, pg_admin: Admin) -> None:
    async def setup(conn: Any) -> None:
        await conn.execute("set search_path = pg_catalog, public")
        await conn.execute("set application_name = 'tcs_after_connect'")

    async with open_pool(pg_dsn, size=1, after_connect=setup, idle_interval=60.0) as pool:
        async with pool.run() as conn:
            await conn.execute("set search_path = public")
            await conn.execute("set application_name = 'changed'")
        async with pool.run() as conn:
            assert await conn.fetch_val("show search_path") == "pg_catalog, public"
            assert await conn.fetch_val("show application_name") == "tcs_after_connect"


async def test_a_custom_reset_is_awaited_after_every_lease_with_a_handle_that_executes(
    pg_dsn: str,
) -> None:
    seen: list[str] = []

    async def reset(conn: Any) -> None:
        seen.append(await conn.fetch_val("show search_path"))
        await conn.execute("reset search_path")

    async with open_pool(pg_dsn, size=1, reset=reset, idle_interval=60.0) as pool:
        await pool.fetch_val("select 1")
        await pool.wait()
        await pool.execute("set search_path = pg_catalog")
        await pool.wait()
        assert await pool.fetch_val("show search_path") == '"$user", public'
        await pool.wait()
    assert seen == ['"$user", public', "pg_catalog", '"$user", public']


# -- prepared statements across resets ----------------------------------------------------------


@pytest.mark.parametrize("io", ["trio", "thread"])
async def test_a_statement_keeps_working_across_resets_even_when_the_first_had_nothing_to_drop(
    pg_dsn: str, io: str
) -> None:
    # psycopg notices DISCARD ALL by itself only the first time it sees that text while it has
    # statements prepared: the second reset here would leave it executing a name that is gone.
    driver = PsycopgDriver(pg_dsn, io=io)  # type: ignore[arg-type]
    async with open_pool(driver, size=1, idle_interval=60.0) as pool:
        stmt = pool.statement("select %s::int * 2 as doubled")
        names = pool.statement("select count(*) from pg_prepared_statements")
        await pool.execute("set search_path = public")  # reset 1: nothing prepared yet
        for round_ in range(3):
            assert await stmt.fetch_val((round_,)) == 2 * round_
            assert await stmt.fetch_val((10,)) == 20
            async with pool.run() as conn:
                assert await conn.fetch_val(names) >= 1
                await conn.execute("set search_path = public")  # dirty: DISCARD ALL follows
            async with pool.run() as conn:
                assert await conn.fetch_val(
                    "select count(*) from pg_prepared_statements where name like '_pg3_%'"
                ) == 0


async def test_a_custom_reset_running_discard_all_keeps_statements_working(pg_dsn: str) -> None:
    async def reset(conn: Any) -> None:
        await conn.execute("discard all")

    async with open_pool(pg_dsn, size=1, reset=reset, idle_interval=60.0) as pool:
        stmt = pool.statement("select %s::int + 100")
        for i in range(3):
            await pool.fetch_val("select 1")  # a lease without it: DISCARD ALL drops nothing
            await pool.wait()
            assert await stmt.fetch_val((i,)) == 100 + i
            await pool.wait()
            assert await stmt.fetch_val((i,)) == 100 + i
            await pool.wait()


@pytest.mark.parametrize("io", ["trio", "thread"])
@pytest.mark.parametrize("command", ["discard all", "deallocate all"])
async def test_a_client_dropping_every_prepared_statement_itself_breaks_no_statement(
    pg_dsn: str, io: str, command: str
) -> None:
    driver = PsycopgDriver(pg_dsn, io=io)  # type: ignore[arg-type]
    async with open_pool(driver, size=1, reset="never", idle_interval=60.0) as pool:
        stmt = pool.statement("select %s::int + 1")
        async with pool.run() as conn:
            await conn.execute(command)  # nothing prepared yet
            assert await conn.fetch_val(stmt, (1,)) == 2
            await conn.execute(command)  # now it drops the statement's server side
            assert await conn.fetch_val(stmt, (2,)) == 3
            assert await conn.fetch_val(stmt, (3,)) == 4


async def test_psycopg_prepare_manager_still_has_what_forget_prepared_empties() -> None:
    # The seam (actors.psycopg.seam.forget_prepared) relies on these psycopg 3.3 internals.
    from collections import deque

    from psycopg._preparing import PrepareManager

    manager = PrepareManager()
    assert callable(manager.clear)
    assert isinstance(manager._to_flush, deque)
    assert hasattr(manager, "_names") and hasattr(manager, "_counts")


@pytest.mark.parametrize("io", ["trio", "thread"])
async def test_reset_session_makes_psycopg_forget_its_prepared_statements(
    pg_dsn: str, io: str
) -> None:
    conn = await PsycopgDriver(pg_dsn, io=io).connect(conninfo_to_dict(pg_dsn))  # type: ignore[arg-type]
    query = "select %s::int - 1"
    count = "select count(*) from pg_prepared_statements where name like '_pg3_%'"
    try:
        await conn.prepare(query)
        assert await conn.fetch(query, (5,)) == [(4,)]
        assert await conn.fetch(count) == [(1,)]
        psy = conn._b.conn
        assert psy._prepared._names  # psycopg knows the name it prepared
        await conn.reset_session()
        assert not psy._prepared._names and not psy._prepared._counts
        assert not psy._prepared._to_flush  # nothing left to deallocate: no extra round trip
        assert conn._prepared == {}  # the driver's own marks are gone too
        assert await conn.fetch(count) == [(0,)]
        assert await conn.fetch(query, (3,)) == [(2,)]  # not prepared now, and it works
        await conn.prepare(query)
        assert await conn.fetch(query, (3,)) == [(2,)]
        assert await conn.fetch(count) == [(1,)]
        await conn.reset_session()  # a second reset: psycopg alone would not forget this time
        assert await conn.fetch(query, (7,)) == [(6,)]
    finally:
        await conn.close()


def test_forget_prepared_is_part_of_the_seam() -> None:
    assert "forget_prepared" in seam.__all__
    assert "_prepared" in (seam.__doc__ or "")


# -- what reset="auto" counts as dirty (a text scan, no I/O) ------------------------------------

@pytest.mark.parametrize(
    ("query", "dirty"),
    [
        ("select 1", False),
        ("UPDATE t SET x = 1", False),
        ("insert into t (reset, listen) values (1, 2)", False),
        ("set local work_mem = '8MB'", False),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", False),
        ("set constraints all deferred", False),
        ("select pg_advisory_xact_lock(1)", False),
        ("declare c cursor for select 1", False),
        ("SET search_path = a", True),
        ("  /* why */ -- note\n  set search_path = a", True),
        ("select 1; set search_path = a", True),
        ("set role someone", True),
        ("set session authorization someone", True),
        ("reset all", True),
        ("listen ch", True),
        ("unlisten *", True),
        ("prepare p as select 1", True),
        ("deallocate p", True),
        ("declare c cursor with hold for select 1", True),
        ("create temp table t (x int)", True),
        ("CREATE TEMPORARY VIEW v AS SELECT 1", True),
        ("create global temporary table t (x int)", True),
        ("load 'auto_explain'", True),
        ("discard plans", True),
        ("do $$ begin perform 1; end $$", True),
        ("select set_config('search_path', 'x', false)", True),
        ("select pg_advisory_lock(1)", True),
        ("select pg_try_advisory_lock(1)", True),
        ("select pg_advisory_lock_shared(1)", True),
        ("create or replace temp view v as select 1", True),
        ("select 1 as x into temp table t", True),
        ("SELECT * INTO TEMPORARY t FROM u", True),
        ("select 1 as x into local temp t", True),
        ("create table pg_temp.t (x int)", True),
        ("create view pg_temp_3.v as select 1", True),
        ("select x into tempest from t", False),
        ("select temp_col from t", False),
        ("WITH c AS (SELECT 1 AS a) SELECT * INTO TEMP t FROM c", True),
        ("SELECT string_agg(x, ';') AS s INTO TEMP t FROM (VALUES ('a')) v(x)", True),
        ("EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1", True),
        ('CREATE TABLE "pg_temp".t (x int)', True),
        ("CREATE /* why */ TEMP TABLE t (x int)", True),
        ("select ';' as a; /* note; */ set search_path = a", True),
        ("select 'set search_path = a'", False),
        ("select 1 -- set search_path = a", False),
        ("SELECT $$it's$$;\n-- switch\nSET search_path = a", True),
        ("SELECT E'\\''; /* c */ SET search_path = a", True),
        ('SELECT 1 AS "it\'s"; -- x\nSET search_path = a', True),
        ("/* a /* b */ c */ SET search_path = a", True),  # nested: not read, so True
        ("select 'a' || 'unterminated -- reset", True),  # not read for sure, so True
        ('SET"search_path" TO a', True),
        ('SELECT "pg_advisory_lock"(1)', True),
        ("select pg_catalog.\"set_config\"('a', 'b', false)", True),
        ("select dblink_connect_u('x')", True),
        ("select $tag$ set role x $tag$", False),
        ("select $1::text, 'reset'", False),
    ],
)
def test_leaves_session_state_flags_exactly_the_statements_that_change_the_session(
    query: str, dirty: bool
) -> None:
    from actors.psycopg import PsycopgConnection

    # The method reads nothing from the connection: call it unbound, without a server.
    assert PsycopgConnection.leaves_session_state(None, query) is dirty  # type: ignore[arg-type]


# Whether the state is there: the temporary table, the changed setting.
_TEMP = "select to_regclass('pg_temp.tcs_leak') is not null"
_NAME = "select current_setting('application_name') = 'tcs_leaked'"


@pytest.mark.parametrize(
    ("statement", "probe"),
    [
        # temporary tables, however the statement that makes them starts
        ("WITH c AS (SELECT 1 AS a) SELECT * INTO TEMP tcs_leak FROM c", _TEMP),
        ("SELECT string_agg(x, ';') AS s INTO TEMP tcs_leak FROM (VALUES ('a')) v(x)", _TEMP),
        ("EXPLAIN ANALYZE CREATE TEMP TABLE tcs_leak AS SELECT 1", _TEMP),
        ('CREATE TABLE "pg_temp".tcs_leak (x int)', _TEMP),
        ("CREATE /* a comment */ TEMP TABLE tcs_leak (x int)", _TEMP),
        ("SELECT $$it's$$;\n-- a note\nCREATE TEMP TABLE tcs_leak (x int)", _TEMP),
        ("SELECT E'\\''; /* c */ CREATE TEMP TABLE tcs_leak (x int)", _TEMP),
        ('SELECT 1 AS "it\'s"; -- x\nCREATE TEMP TABLE tcs_leak (x int)', _TEMP),
        # a setting changed behind quotes or comments
        ("SELECT $$it's$$;\n-- switch\nSET application_name TO tcs_leaked", _NAME),
        ("SELECT E'\\''; /* c */ SET application_name TO tcs_leaked", _NAME),
        ('SELECT 1 AS "it\'s"; -- x\nSET application_name TO tcs_leaked', _NAME),
        ("/* a /* b */ c */ SET application_name TO tcs_leaked", _NAME),
        ('SET"application_name" TO tcs_leaked', _NAME),
    ],
)
async def test_session_state_made_behind_quotes_or_comments_never_reaches_the_next_lease(
    pg_dsn: str, statement: str, probe: str
) -> None:
    from supervisor import open_pool

    async with open_pool(pg_dsn, size=1, reset="auto") as pool:
        async with pool.run() as conn:
            await conn.execute(statement)
            assert await conn.fetch_val(probe) is True  # there in the lease that made it
        assert await pool.fetch_val(probe) is False  # and gone in the next one
