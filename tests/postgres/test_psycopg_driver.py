"""The psycopg driver against a real PostgreSQL server, in both I/O modes.

Every test taking the ``conn`` / ``driver`` fixtures runs twice: ``io="trio"`` (psycopg's
AsyncConnection driven by Trio's fd waits) and ``io="thread"`` (sync psycopg in worker threads).
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import trio
import trio.testing

from actors.driver import ConnectionLost, DatabaseError, TransactionOptions
from actors.psycopg import PsycopgConnection, PsycopgCursor, PsycopgDriver, from_url

from .cluster import Admin, ServerInfo, free_port

# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(params=["trio", "thread"])
def io(request: pytest.FixtureRequest) -> str:
    """Both I/O modes."""
    return str(request.param)


@pytest.fixture
def driver(pg_dsn: str, io: str) -> PsycopgDriver:
    return PsycopgDriver(pg_dsn, io=io)  # type: ignore[arg-type]


@pytest.fixture
async def conn(driver: PsycopgDriver) -> AsyncIterator[PsycopgConnection]:
    c = await driver.connect(driver.options)
    try:
        yield c
    finally:
        await c.close()


async def _wait_active(admin: Admin, pid: int) -> None:
    """Poll the server until the backend is running a statement."""
    await admin.wait_state(pid, ["active"], timeout=5.0)


# --------------------------------------------------------------------------------------------
# basics


async def test_connect_execute_fetch(conn: PsycopgConnection, make_table: Any) -> None:
    t = make_table("id int primary key, v text")
    assert conn.status() == "idle"
    assert conn.backend_pid > 0
    assert await conn.execute(f"insert into {t} values (1, 'a'), (2, 'b'), (3, 'c')") == 3
    assert await conn.fetch(f"select id, v from {t} order by id") == [(1, "a"), (2, "b"), (3, "c")]
    assert await conn.execute(f"update {t} set v = 'z' where id > 1") == 2
    assert await conn.fetch(f"delete from {t} where id = 1") == []  # no rows: no error
    assert await conn.fetch(f"select count(*) from {t}") == [(2,)]
    assert await conn.execute(f"select * from {t}") == 2  # rowcount of a query
    await conn.ping()
    assert conn.status() == "idle"


async def test_params_sequence_and_mapping(conn: PsycopgConnection) -> None:
    assert await conn.fetch("select %s::int + %s::int, %s::text", (40, 2, "x")) == [(42, "x")]
    assert await conn.fetch("select %(a)s::int * 2, %(b)s::text", {"a": 21, "b": "y"}) == [
        (42, "y")
    ]
    # parameters are never interpolated into the SQL text
    evil = "'); drop table nothing; --"
    assert await conn.fetch("select %s::text", [evil]) == [(evil,)]
    # a literal % without parameters is left alone
    assert await conn.fetch("select 'a%b'") == [("a%b",)]


async def test_integrity_error_keeps_connection_usable(
    conn: PsycopgConnection, make_table: Any
) -> None:
    t = make_table("id int primary key")
    await conn.execute(f"insert into {t} values (1)")
    with pytest.raises(DatabaseError) as info:
        await conn.execute(f"insert into {t} values (%s)", [1])
    assert info.value.sqlstate == "23505"
    assert info.value.kind == "integrity"
    assert isinstance(info.value.__cause__, psycopg.errors.UniqueViolation)
    assert "duplicate key" in str(info.value)
    assert conn.status() == "idle"
    assert await conn.fetch(f"select count(*) from {t}") == [(1,)]


async def test_syntax_error_and_client_side_errors(conn: PsycopgConnection) -> None:
    with pytest.raises(DatabaseError) as info:
        await conn.fetch("selec 1")
    assert info.value.sqlstate == "42601"
    assert info.value.kind == "other"
    # wrong number of parameters: psycopg refuses before sending; no SQLSTATE, still usable
    with pytest.raises(DatabaseError) as info2:
        await conn.fetch("select %s, %s", [1])
    assert info2.value.sqlstate is None
    assert await conn.fetch("select 1") == [(1,)]


async def test_copy_through_execute_is_an_error_not_a_wedged_connection(
    conn: PsycopgConnection,
) -> None:
    with pytest.raises(DatabaseError):
        await conn.execute("copy (select generate_series(1, 1000)) to stdout")
    assert conn.status() == "idle"
    assert await conn.fetch("select 2") == [(2,)]


async def test_serialization_failure(driver: PsycopgDriver, make_table: Any) -> None:
    t = make_table("id int primary key, n int")
    a = await driver.connect(driver.options)
    b = await driver.connect(driver.options)
    try:
        await a.execute(f"insert into {t} values (1, 0)")
        await a.begin(TransactionOptions(isolation="serializable"))
        assert await a.fetch(f"select n from {t} where id = 1") == [(0,)]  # snapshot taken
        await b.begin(TransactionOptions(isolation="serializable"))
        await b.execute(f"update {t} set n = n + 1 where id = 1")
        await b.commit()
        with pytest.raises(DatabaseError) as info:
            await a.execute(f"update {t} set n = n + 10 where id = 1")
        assert info.value.sqlstate == "40001"
        assert info.value.kind == "serialization"
        assert a.status() == "error"
        await a.rollback()
        assert a.status() == "idle"
        assert await a.fetch(f"select n from {t}") == [(1,)]
    finally:
        await a.close()
        await b.close()


async def test_status_in_every_state(conn: PsycopgConnection) -> None:
    assert conn.status() == "idle"
    await conn.begin(TransactionOptions())
    assert conn.status() == "transaction"
    with pytest.raises(DatabaseError):
        await conn.execute("select 1/0")
    assert conn.status() == "error"
    with pytest.raises(DatabaseError) as info:  # every statement fails until rollback
        await conn.fetch("select 1")
    assert info.value.sqlstate == "25P02"
    await conn.rollback()
    assert conn.status() == "idle"
    with trio.move_on_after(0.05):
        await conn.fetch("select pg_sleep(2)")
    assert conn.status() == "unknown"  # mid-protocol
    await conn.cancel()
    await conn.reset()
    assert conn.status() == "idle"
    await conn.close()
    assert conn.status() == "unknown"


async def test_begin_isolation_and_read_only(conn: PsycopgConnection, make_table: Any) -> None:
    t = make_table("id int")
    await conn.begin(TransactionOptions(isolation="Repeatable Read", read_only=True))
    assert await conn.fetch("show transaction_isolation") == [("repeatable read",)]
    assert await conn.fetch("show transaction_read_only") == [("on",)]
    with pytest.raises(DatabaseError) as info:
        await conn.execute(f"insert into {t} values (1)")
    assert info.value.sqlstate == "25006"
    await conn.rollback()

    for name, shown in [
        ("read committed", "read committed"),
        ("serializable", "serializable"),
        ("read uncommitted", "read uncommitted"),
    ]:
        await conn.begin(TransactionOptions(isolation=name))
        assert await conn.fetch("show transaction_isolation") == [(shown,)]
        await conn.commit()

    await conn.begin(
        TransactionOptions(isolation="serializable", read_only=True, mode="deferrable")
    )
    assert await conn.fetch("show transaction_deferrable") == [("on",)]
    await conn.rollback()

    with pytest.raises(ValueError, match="isolation"):
        await conn.begin(TransactionOptions(isolation="snapshot"))
    with pytest.raises(ValueError, match="mode"):
        await conn.begin(TransactionOptions(mode="immediate"))
    assert conn.status() == "idle"  # nothing was sent

    await conn.begin(TransactionOptions())
    with pytest.raises(DatabaseError) as nested:
        await conn.begin(TransactionOptions())
    assert nested.value.sqlstate == "25001"
    await conn.rollback()


async def test_commit_and_rollback(conn: PsycopgConnection, make_table: Any) -> None:
    t = make_table("id int")
    await conn.begin(TransactionOptions())
    await conn.execute(f"insert into {t} values (1)")
    await conn.commit()
    await conn.begin(TransactionOptions())
    await conn.execute(f"insert into {t} values (2)")
    await conn.rollback()
    assert await conn.fetch(f"select id from {t}") == [(1,)]
    await conn.commit()  # no transaction: nothing happens
    await conn.rollback()
    assert conn.status() == "idle"


async def test_commit_of_a_failed_transaction_raises(
    conn: PsycopgConnection, make_table: Any
) -> None:
    t = make_table("id int")
    await conn.begin(TransactionOptions())
    await conn.execute(f"insert into {t} values (1)")
    with pytest.raises(DatabaseError):
        await conn.execute("select nonexistent_column")
    with pytest.raises(DatabaseError) as info:
        await conn.commit()
    assert info.value.sqlstate == "25P02"
    assert conn.status() == "idle"
    assert await conn.fetch(f"select count(*) from {t}") == [(0,)]


async def test_savepoints(conn: PsycopgConnection, make_table: Any) -> None:
    t = make_table("id int")
    await conn.begin(TransactionOptions())
    await conn.execute(f"insert into {t} values (1)")
    await conn.savepoint('sp "odd" name')
    await conn.execute(f"insert into {t} values (2)")
    await conn.rollback_to('sp "odd" name')
    await conn.execute(f"insert into {t} values (3)")
    await conn.savepoint("sp2")
    with pytest.raises(DatabaseError):
        await conn.execute("select 1/0")
    assert conn.status() == "error"
    await conn.rollback_to("sp2")
    assert conn.status() == "transaction"
    await conn.execute(f"insert into {t} values (4)")
    await conn.release("sp2")
    await conn.release('sp "odd" name')
    await conn.commit()
    assert await conn.fetch(f"select id from {t} order by id") == [(1,), (3,), (4,)]
    with pytest.raises(DatabaseError):  # no such savepoint outside a transaction
        await conn.release("sp2")


# --------------------------------------------------------------------------------------------
# streaming


async def _drain_cursor(cursor: PsycopgCursor) -> tuple[int, int, int]:
    count = total = biggest = 0
    while batch := await cursor.fetch_batch():
        count += len(batch)
        biggest = max(biggest, len(batch))
        total += sum(row[0] for row in batch)
    return count, total, biggest


async def test_stream_a_million_rows_with_bounded_memory(conn: PsycopgConnection) -> None:
    n = 1_000_000
    gc.collect()
    tracemalloc.start()
    try:
        cursor = await conn.open_cursor("select generate_series(1, %s)", [n], 5000)
        assert conn.status() == "transaction"  # the cursor's own transaction
        count, total, biggest = await _drain_cursor(cursor)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert total == n * (n + 1) // 2
    assert biggest == 5000
    # The full result as Python rows would take ~100 MB (a tuple + an int per row); a batch of
    # 5000 takes well under 1 MB.
    assert peak < 8 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"
    print(f"[measure] io={conn.io} stream 1e6 rows: tracemalloc peak {peak / 1e6:.2f} MB")
    assert conn.status() == "idle"  # exhausted: closed and committed
    await cursor.close()  # idempotent


async def test_stream_inside_a_transaction_and_early_close(
    conn: PsycopgConnection, make_table: Any
) -> None:
    t = make_table("id int")
    await conn.begin(TransactionOptions())
    await conn.execute(f"insert into {t} select generate_series(1, 100)")
    cursor = await conn.open_cursor(
        f"select id from {t} where id > %(min)s order by id", {"min": 10}, 7
    )
    assert await cursor.fetch_batch() == [(i,) for i in range(11, 18)]
    await conn.execute(f"insert into {t} values (1000)")  # the connection stays usable
    await cursor.close()
    assert conn.status() == "transaction"  # CLOSE, not COMMIT: the transaction is the caller's
    await cursor.close()
    await conn.commit()
    assert await conn.fetch(f"select count(*) from {t}") == [(101,)]

    # two cursors at once
    c1 = await conn.open_cursor("select generate_series(1, 5)", None, 2)
    c2 = await conn.open_cursor("select generate_series(10, 14)", None, 10)
    assert await c2.fetch_batch() == [(i,) for i in range(10, 15)]
    assert await c1.fetch_batch() == [(1,), (2,)]
    await c1.close()
    assert conn.status() == "idle"


async def test_stream_errors(conn: PsycopgConnection) -> None:
    with pytest.raises(DatabaseError):
        await conn.open_cursor("select * from no_such_table", None, 10)
    assert conn.status() == "idle"  # its own transaction was rolled back
    cursor = await conn.open_cursor("select 1/(3 - generate_series(1, 5))", None, 1)
    assert await cursor.fetch_batch() == [(0,)]
    with pytest.raises(DatabaseError) as info:
        while await cursor.fetch_batch():
            pass
    assert info.value.sqlstate == "22012"
    await cursor.close()
    assert conn.status() == "idle"
    with pytest.raises(ValueError):
        await conn.open_cursor("select 1", None, 0)


async def test_reset_forgets_cursors(conn: PsycopgConnection) -> None:
    cursor = await conn.open_cursor("select generate_series(1, 100)", None, 10)
    assert len(await cursor.fetch_batch()) == 10
    await conn.reset()
    assert conn.status() == "idle"
    with pytest.raises(DatabaseError):  # not a silent [] (which would look like the end)
        await cursor.fetch_batch()
    await cursor.close()


# --------------------------------------------------------------------------------------------
# prepared statements


async def _prepared_statements(conn: PsycopgConnection) -> list[str]:
    rows = await conn.fetch("select statement from pg_prepared_statements", None)
    return [str(r[0]) for r in rows]


async def test_prepare(conn: PsycopgConnection) -> None:
    query = "select %s::int + 1 as prepared_marker"
    await conn.prepare(query)
    assert await conn.fetch(query, [1]) == [(2,)]
    assert await conn.fetch(query, [2]) == [(3,)]
    statements = await _prepared_statements(conn)
    assert any("prepared_marker" in s for s in statements), statements


async def test_prepare_threshold_none_never_prepares(pg_dsn: str, io: str) -> None:
    driver = PsycopgDriver(pg_dsn, io=io, prepare_threshold=None)  # type: ignore[arg-type]
    conn = await driver.connect(driver.options)
    try:
        query = "select %s::int as unprepared_marker"
        await conn.prepare(query)
        for i in range(10):
            assert await conn.fetch(query, [i]) == [(i,)]
        assert not any("unprepared_marker" in s for s in await _prepared_statements(conn))
    finally:
        await conn.close()


async def test_automatic_preparation_after_threshold(pg_dsn: str, io: str) -> None:
    driver = PsycopgDriver(pg_dsn, io=io, prepare_threshold=2)  # type: ignore[arg-type]
    conn = await driver.connect(driver.options)
    try:
        query = "select %s::int as auto_marker"
        for i in range(4):
            await conn.fetch(query, [i])
        assert any("auto_marker" in s for s in await _prepared_statements(conn))
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------
# cancellation, termination, close


async def test_cancel_mid_query_releases_the_caller_at_once(
    conn: PsycopgConnection, pg_admin: Admin
) -> None:
    pid = conn.backend_pid
    scope = trio.CancelScope()
    returned = trio.Event()
    times: dict[str, float] = {}

    async def client() -> None:
        with scope:
            await conn.fetch("select pg_sleep(10)")
        times["returned"] = trio.current_time()
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        await _wait_active(pg_admin, pid)
        times["cancel"] = trio.current_time()
        scope.cancel()
        with trio.fail_after(2):
            await returned.wait()
    latency = times["returned"] - times["cancel"]
    assert latency < 0.5, latency
    assert conn.status() == "unknown"
    assert pg_admin.state(pid) == "active"  # the server is still sleeping: nobody waited

    start = trio.current_time()
    await conn.cancel()
    await conn.reset()
    recovered = trio.current_time() - start
    assert conn.status() == "idle"
    idle_after = await pg_admin.wait_state(pid, ["idle"], timeout=2.0)
    print(
        f"[measure] io={conn.io} cancel latency {latency * 1000:.2f} ms; cancel+reset "
        f"{recovered * 1000:.1f} ms; backend idle {idle_after * 1000:.1f} ms after reset"
    )
    assert recovered < 2.0
    assert await conn.fetch("select 42") == [(42,)]


async def test_cancel_inside_transaction_rolls_back(
    conn: PsycopgConnection, pg_admin: Admin, make_table: Any, pg_dsn: str
) -> None:
    t = make_table("id int")
    pid = conn.backend_pid
    await conn.begin(TransactionOptions())
    await conn.execute(f"insert into {t} values (1)")
    with trio.move_on_after(0.1):
        await conn.fetch("select pg_sleep(10)")
    await conn.cancel()
    await conn.reset()
    assert conn.status() == "idle"
    await pg_admin.wait_state(pid, ["idle"], timeout=2.0)  # not "idle in transaction"
    with psycopg.connect(pg_dsn) as other:
        assert other.execute(f"select count(*) from {t}").fetchone() == (0,)


async def test_cancel_while_sending_a_huge_parameter(conn: PsycopgConnection) -> None:
    # Interrupted with part of a 32 MB message still unsent: reset() flushes the rest and
    # drains the result, the session stays in sync.
    big = "z" * (32 * 1024 * 1024)
    with trio.move_on_after(0.002):
        await conn.fetch("select length(%s::text)", [big])
    assert conn.status() in ("unknown", "idle")
    await conn.cancel()
    await conn.reset()
    assert conn.status() == "idle"
    assert await conn.fetch("select 'in sync'") == [("in sync",)]


async def test_cancel_and_reset_when_nothing_runs(conn: PsycopgConnection) -> None:
    await conn.cancel()  # nothing in flight: no error
    await conn.reset()
    assert conn.status() == "idle"
    assert await conn.fetch("select 1") == [(1,)]


async def test_reset_without_cancel_waits_for_the_statement(conn: PsycopgConnection) -> None:
    with trio.move_on_after(0.05):
        await conn.fetch("select pg_sleep(0.3), 7")
    assert conn.status() == "unknown"
    await conn.reset()  # drains the (successful) result
    assert conn.status() == "idle"
    assert await conn.fetch("select 8") == [(8,)]


async def test_terminated_idle_backend_is_connection_lost(
    conn: PsycopgConnection, pg_admin: Admin
) -> None:
    pid = conn.backend_pid
    assert pg_admin.terminate(pid)
    await pg_admin.wait_state(pid, [None], timeout=5.0)  # the backend is gone
    with pytest.raises(ConnectionLost):
        await conn.fetch("select 1")
    with pytest.raises(ConnectionLost):
        await conn.ping()
    with pytest.raises(ConnectionLost):
        await conn.reset()
    await conn.close()


async def test_terminated_busy_backend_is_connection_lost(
    conn: PsycopgConnection, pg_admin: Admin
) -> None:
    pid = conn.backend_pid
    outcome: dict[str, Any] = {}
    done = trio.Event()

    async def client() -> None:
        try:
            await conn.fetch("select pg_sleep(10)")
        except Exception as exc:
            outcome["error"] = exc
        outcome["at"] = trio.current_time()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        await _wait_active(pg_admin, pid)
        start = trio.current_time()
        assert pg_admin.terminate(pid)
        with trio.fail_after(3):
            await done.wait()
    assert isinstance(outcome["error"], ConnectionLost), outcome
    assert outcome["at"] - start < 2.0


async def test_close_from_another_task_wakes_the_blocked_call(
    conn: PsycopgConnection, pg_admin: Admin
) -> None:
    pid = conn.backend_pid
    outcome: dict[str, Any] = {}
    done = trio.Event()

    async def client() -> None:
        try:
            await conn.fetch("select pg_sleep(10)")
        except Exception as exc:
            outcome["error"] = exc
        outcome["at"] = trio.current_time()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        await _wait_active(pg_admin, pid)
        start = trio.current_time()
        await conn.close()
        with trio.fail_after(2):
            await done.wait()
    assert isinstance(outcome["error"], ConnectionLost), outcome
    assert outcome["at"] - start < 0.5
    assert conn.closed
    assert conn.status() == "unknown"
    await conn.close()  # idempotent
    with pytest.raises(ConnectionLost):
        await conn.fetch("select 1")
    # close() sent a best-effort cancel: the orphaned pg_sleep does not run for 10 s
    await pg_admin.wait_state(pid, [None], timeout=3.0)


async def test_two_tasks_on_one_connection_is_refused(conn: PsycopgConnection) -> None:
    errors: list[BaseException] = []

    async def second() -> None:
        try:
            await conn.fetch("select 2")
        except RuntimeError as exc:
            errors.append(exc)

    with trio.move_on_after(0.3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.fetch, "select pg_sleep(0.2)")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second)
    assert len(errors) == 1 and "two tasks" in str(errors[0])
    await conn.reset()
    assert await conn.fetch("select 3") == [(3,)]


# --------------------------------------------------------------------------------------------
# connecting, secrets


async def test_wrong_password_is_a_database_error_without_the_password(
    pg_server: ServerInfo, io: str
) -> None:
    if pg_server.password is None:
        pytest.skip("the password of TCS_POSTGRES_DSN is not known to the suite")
    wrong = "Wrong-Pa55word-31337"
    driver = PsycopgDriver(pg_server.dsn, io=io, password=wrong)  # type: ignore[arg-type]
    assert wrong not in repr(driver)
    assert driver.secrets(driver.options) == [wrong]
    with pytest.raises(DatabaseError) as info:
        await driver.connect(driver.options)
    assert info.value.sqlstate == "28P01"
    text = f"{info.value} {info.value!r} {info.value.__cause__!r} {info.value.__context__!r}"
    assert wrong not in text
    assert pg_server.password not in text
    assert "password authentication failed" in str(info.value)


async def test_repr_hides_the_password(pg_server: ServerInfo) -> None:
    driver = PsycopgDriver(pg_server.dsn)
    if pg_server.password:
        assert pg_server.password not in repr(driver)
        assert "***" in repr(driver)
        assert driver.secrets(driver.options) == [pg_server.password]
    conn = await driver.connect(driver.options)
    try:
        if pg_server.password:
            assert pg_server.password not in repr(conn)
    finally:
        await conn.close()


async def test_unknown_database(pg_dsn: str, io: str) -> None:
    driver = PsycopgDriver(pg_dsn, io=io, dbname="no_such_db_tcs")  # type: ignore[arg-type]
    with pytest.raises(DatabaseError) as info:
        await driver.connect(driver.options)
    assert info.value.sqlstate == "3D000"


async def test_unreachable_server_is_connection_lost(io: str) -> None:
    driver = PsycopgDriver(
        f"host=127.0.0.1 port={free_port()} user=x password=hunter2-secret dbname=x",
        io=io,  # type: ignore[arg-type]
        connect_timeout=5,
    )
    with trio.fail_after(5):
        with pytest.raises(ConnectionLost) as info:
            await driver.connect(driver.options)
    assert "hunter2-secret" not in str(info.value)


async def test_connect_is_cancellable(io: str) -> None:
    # a listening socket that never answers the startup packet: the connect hangs until cancelled
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        driver = PsycopgDriver(f"host=127.0.0.1 port={port} user=x dbname=x sslmode=disable", io=io)  # type: ignore[arg-type]
        start = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            await driver.connect(driver.options)
        assert scope.cancelled_caught
        assert trio.current_time() - start < 1.0


async def test_connect_timeout_bounds_each_attempt(io: str) -> None:
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        driver = PsycopgDriver(
            f"host=127.0.0.1 port={port} user=x dbname=x sslmode=disable", io=io, connect_timeout=2
        )  # type: ignore[arg-type]
        start = trio.current_time()
        with trio.fail_after(6):
            with pytest.raises(ConnectionLost, match="timeout"):
                await driver.connect(driver.options)
        assert trio.current_time() - start >= 1.5


async def test_host_name_and_unix_socket(pg_server: ServerInfo, io: str) -> None:
    cluster = pg_server.cluster
    if cluster is None:
        pytest.skip("needs the suite's own cluster")
    # "localhost" is resolved by the driver (Trio's getaddrinfo), one attempt per address
    by_name = PsycopgDriver(pg_server.dsn, io=io, host="localhost")  # type: ignore[arg-type]
    conn = await by_name.connect(by_name.options)
    try:
        assert await conn.fetch("select current_user") == [(cluster.user,)]
    finally:
        await conn.close()
    unix = PsycopgDriver(  # type: ignore[arg-type]
        f"host={cluster.sockdir} port={cluster.port} user={cluster.user} dbname={cluster.database}",
        io=io,
    )
    conn = await unix.connect(unix.options)
    try:
        assert await conn.fetch("select inet_server_addr() is null") == [(True,)]
    finally:
        await conn.close()


async def test_connect_with_rotated_options(pg_server: ServerInfo) -> None:
    # the pool's configure= hook passes modified options to connect()
    driver = PsycopgDriver(pg_server.dsn, application_name="first")
    options = {**driver.options, "application_name": "rotated"}
    conn = await driver.connect(options)
    try:
        assert await conn.fetch("show application_name") == [("rotated",)]
    finally:
        await conn.close()


def test_from_url_and_options() -> None:
    d = from_url(
        "postgres://u:pw-123@db.example:6543/app?io=thread&prepare_threshold=none&sslmode=disable"
    )
    assert d.io == "thread"
    assert d.prepare_threshold is None
    assert d.options["host"] == "db.example"
    assert d.options["port"] == "6543"
    assert d.options["sslmode"] == "disable"
    assert d.secrets(d.options) == ["pw-123"]
    assert "pw-123" not in repr(d)
    assert from_url("postgresql:///app").name == "postgresql"
    assert from_url("postgresql://h/app?prepare_threshold=3").prepare_threshold == 3
    with pytest.raises(ValueError, match="postgresql://"):
        from_url("mysql://u:pw@h/db")
    with pytest.raises(ValueError) as bad:
        from_url("postgresql://u:sekrit-pw@h/db?bogus_param=1")
    assert "sekrit-pw" not in str(bad.value)
    with pytest.raises(ValueError):
        PsycopgDriver("", io="asyncio")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PsycopgDriver("", prepare_threshold=-1)
    with pytest.raises(ValueError):
        PsycopgDriver("", connect_timeout=0)


async def test_thread_mode_reset_waits_for_the_abandoned_call(pg_dsn: str) -> None:
    # io="thread": a cancelled caller's call may still be running (or about to start) in its
    # worker thread. reset() must wait for a running one, and one that had not started yet must
    # never run (it would send a statement behind the next client's back).
    driver = PsycopgDriver(pg_dsn, io="thread")
    conn = await driver.connect(driver.options)
    backend = conn._b
    op_lock = backend._op_lock  # type: ignore[attr-defined]
    ran: list[str] = []
    try:
        # 1. a call that had not started when its caller was cancelled never runs
        op_lock.acquire()  # as if another call were running in its thread
        scope = trio.CancelScope()

        async def caller() -> None:
            with scope:
                await backend._call(lambda c: ran.append("stale"))  # type: ignore[attr-defined]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
        op_lock.release()
        for _ in range(3):  # later calls: the stale one, waiting longer, would run first
            await backend._call(lambda c: ran.append("later"))  # type: ignore[attr-defined]
        assert ran == ["later"] * 3

        # 2. reset() waits for a call still running in its thread
        op_lock.acquire()
        finished = trio.Event()

        async def resetter() -> None:
            await conn.reset()
            finished.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(resetter)
            await trio.testing.wait_all_tasks_blocked()
            assert not finished.is_set()
            op_lock.release()
        assert conn.status() == "idle"
        await conn.begin(TransactionOptions())  # no stale BEGIN got in first
        await conn.rollback()
    finally:
        await conn.close()
