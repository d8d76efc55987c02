"""The asyncio drivers hosted through trio-asyncio (``actors.aio``) against a real server.

Every test runs for both drivers (asyncpg, psycopg's AsyncConnection), through the pool's
public API with the driver object as the target, plus a few driver-level checks of the
protocol rules (status "unknown" after an interrupted call, close under a call in flight).
An autouse fixture fails any test after which asyncio or a driver logged an error or warned
(pending tasks destroyed, unclosed connections, unretrieved exceptions), garbage collected.
"""

from __future__ import annotations

import gc
import logging
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
import trio
import trio_asyncio  # type: ignore[import-untyped]
from psycopg.conninfo import conninfo_to_dict

from actors.aio import AsyncpgDriver, AsyncPsycopgDriver, from_url
from actors.aio.base import AioDriverBase
from actors.driver import ConnectionLost as DriverConnectionLost
from actors.driver import DatabaseError, TransactionOptions
from supervisor import (
    Backoff,
    CheckoutTimeout,
    ConnectionLost,
    IntegrityError,
    Pool,
    QueryError,
    QueueDropped,
    SafetyLimits,
    SerializationFailure,
    TransactionFailed,
    open_pool,
)

from .cluster import Admin, PostgresCluster

asyncpg = pytest.importorskip("asyncpg")

KINDS = ["asyncpg", "psycopg"]


# --------------------------------------------------------------------------------------------
# helpers


def _app() -> str:
    return f"tcs_aio_{uuid.uuid4().hex[:8]}"


def make_driver(kind: str, dsn: str, app: str | None = None) -> AioDriverBase:
    """A driver of ``kind`` for ``dsn`` whose sessions carry ``application_name=app``."""
    if kind == "asyncpg":
        settings = {"application_name": app} if app else {}
        if dsn.startswith(("postgresql://", "postgres://")):
            return AsyncpgDriver(dsn, server_settings=settings)
        params = conninfo_to_dict(dsn)
        if "dbname" in params:
            params["database"] = params.pop("dbname")
        return AsyncpgDriver("", server_settings=settings, **params)
    return AsyncPsycopgDriver(dsn, **({"application_name": app} if app else {}))


def ph(kind: str, n: int) -> str:
    """The driver's own placeholder for parameter ``n`` (1-based)."""
    return f"${n}" if kind == "asyncpg" else "%s"


async def _until(check: Callable[[], Any], *, timeout: float, what: str) -> float:
    """Poll an external state (the server) until ``check()``; bounded."""
    start = trio.current_time()
    while True:
        if await trio.to_thread.run_sync(check):
            return trio.current_time() - start
        if trio.current_time() - start > timeout:
            raise AssertionError(f"{what}: not reached within {timeout}s")
        await trio.sleep(0.005)


def _all_idle(pool: Pool) -> bool:
    s = pool.statistics()
    return s.idle == s.size and s.busy == 0 and s.connecting == 0


def _count(dsn: str, sql: str) -> Any:
    with psycopg.connect(dsn) as c:
        row = c.execute(sql).fetchone()
        return row[0] if row else None


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def no_asyncio_noise(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing logged at WARNING or above, no warning raised, even after a gc pass."""
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    noisy = [str(w.message) for w in caught if not _foreign(w)]
    assert noisy == [], noisy
    records = [
        f"{r.name}: {r.getMessage()}"
        for r in [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
        if r.levelno >= logging.WARNING
    ]
    assert records == [], records


def _foreign(w: warnings.WarningMessage) -> bool:
    # Files left open by other test helpers (not asyncio objects) are not our concern.
    return issubclass(w.category, ResourceWarning) and "unclosed file" in str(w.message)


@pytest.fixture
async def driver(kind: str, pg_dsn: str) -> AsyncIterator[AioDriverBase]:
    d = make_driver(kind, pg_dsn, _app())
    try:
        yield d
    finally:
        await d.close()
        assert not d.loop_running


@pytest.fixture
async def pool(driver: AioDriverBase) -> AsyncIterator[Pool]:
    async with open_pool(driver, size=2, name="aio") as p:
        yield p
    assert not driver.loop_running  # the last connection closed: the loop stopped


# --------------------------------------------------------------------------------------------
# queries, transactions, streams


async def test_queries_one_shots_and_prepared(pool: Pool, kind: str, make_table: Any) -> None:
    t = make_table("id int primary key, v text")
    p1, p2, p3, p4 = (ph(kind, n) for n in (1, 2, 3, 4))
    assert await pool.execute(f"insert into {t} values ({p1}, {p2}), ({p3}, {p4})",
                              [1, "a", 2, "b"]) == 2
    assert await pool.execute(f"update {t} set v = v || 'x'") == 2
    assert await pool.fetch_all(f"select id, v from {t} order by id") == [(1, "ax"), (2, "bx")]
    assert await pool.fetch_one(f"select v from {t} where id = {p1}", [2]) == ("bx",)
    assert await pool.fetch_val(f"select count(*) from {t}") == 2
    assert await pool.fetch_column(f"select id from {t} order by id") == [1, 2]
    assert await pool.execute(f"delete from {t} where id = {p1}", [1]) == 1
    async with pool.run() as conn:
        stmt = await conn.prepare(f"select {p1}::int * 2 as doubled_marker")
        assert await stmt.fetch_val([21]) == 42
        assert await stmt.fetch_val([5]) == 10
        assert conn.status() == "idle"
    assert pool.statistics().connects == 2


async def test_errors_are_mapped_and_keep_the_connection(
    pool: Pool, kind: str, make_table: Any
) -> None:
    t = make_table("id int primary key")
    pid = await pool.fetch_val("select pg_backend_pid()")
    await pool.execute(f"insert into {t} values (1)")
    with pytest.raises(IntegrityError) as integrity:
        await pool.execute(f"insert into {t} values (1)")
    assert integrity.value.sqlstate == "23505"
    cause = integrity.value.__cause__
    if kind == "asyncpg":
        assert isinstance(cause, asyncpg.exceptions.UniqueViolationError)
    else:
        assert isinstance(cause, psycopg.errors.UniqueViolation)
    with pytest.raises(QueryError) as syntax:
        await pool.fetch_all("selec 1")
    assert syntax.value.sqlstate == "42601"
    with pytest.raises(QueryError) as zero:
        await pool.fetch_val("select 1/0")
    assert zero.value.sqlstate == "22012"
    assert not isinstance(zero.value, IntegrityError | SerializationFailure)
    # nothing was reconnected
    assert pool.statistics().connects == 2
    assert pid in {await pool.fetch_val("select pg_backend_pid()") for _ in range(4)}


async def test_serialization_failure(pool: Pool, kind: str, pg_dsn: str, make_table: Any) -> None:
    t = make_table("id int primary key, v int")
    await pool.execute(f"insert into {t} values (1, 0)")
    with pytest.raises(SerializationFailure) as info:
        async with pool.transaction(isolation="repeatable read") as tx:
            assert await tx.fetch_val(f"select v from {t} where id = 1") == 0  # the snapshot
            with psycopg.connect(pg_dsn, autocommit=True) as other:
                other.execute(f"update {t} set v = 5 where id = 1")
            await tx.execute(f"update {t} set v = v + 1 where id = 1")
    assert info.value.sqlstate == "40001"
    assert await pool.fetch_val(f"select v from {t} where id = 1") == 5

    async def bump(tx: Any) -> int:
        await tx.execute(f"update {t} set v = v + 1 where id = 1")
        return int(await tx.fetch_val(f"select v from {t} where id = 1"))

    assert await pool.run_transaction(bump) == 6


async def test_flat_nesting_savepoints_and_options(
    pool: Pool, kind: str, pg_dsn: str, make_table: Any
) -> None:
    t = make_table("id int")
    async with pool.transaction() as tx:
        await tx.execute(f"insert into {t} values (1)")
        async with tx.transaction(savepoint=True) as sp:
            await sp.execute(f"insert into {t} values (2)")
            sp.rollback("not this one")
        assert sp.committed is False
        with pytest.raises(QueryError):
            async with tx.transaction(savepoint=True) as bad:
                await bad.execute("select 1/0")
        assert tx.status() == "transaction"
        async with tx.transaction(savepoint=True) as sp2:
            await sp2.execute(f"insert into {t} values (3)")
    assert tx.committed
    assert await pool.fetch_column(f"select id from {t} order by id") == [1, 3]

    with pytest.raises(TransactionFailed):
        async with pool.transaction() as tx:
            await tx.execute(f"insert into {t} values (10)")
            with pytest.raises(QueryError):
                async with tx.transaction() as flat:
                    await flat.execute("select 1/0")
            with pytest.raises(TransactionFailed):
                await tx.execute(f"insert into {t} values (11)")
    assert _count(pg_dsn, f"select count(*) from {t} where id >= 10") == 0

    async with pool.transaction(isolation="serializable", read_only=True) as tx:
        assert await tx.fetch_val("show transaction_isolation") == "serializable"
        assert await tx.fetch_val("show transaction_read_only") == "on"
        with pytest.raises(QueryError) as ro:
            await tx.execute(f"insert into {t} values (30)")
        assert ro.value.sqlstate == "25006"
        assert tx.status() == "error"
        tx.rollback()
    assert pool.statistics().connects == 2


async def test_stream_server_side_cursor(pool: Pool, kind: str, make_table: Any) -> None:
    n = 20_000
    async with pool.run() as conn:
        total = count = 0
        async for (value,) in conn.stream(
            f"select generate_series(1, {ph(kind, 1)}::int)", [n], batch_size=500
        ):
            count += 1
            total += value
        assert (count, total) == (n, n * (n + 1) // 2)
        assert conn.status() == "idle"
        seen = []
        async for (value,) in conn.stream("select generate_series(1, 100000)", batch_size=100):
            seen.append(value)
            if value == 250:
                break
        assert seen[-1] == 250
    t = make_table("id int")
    async with pool.transaction() as tx:
        await tx.execute(f"insert into {t} select generate_series(1, 10)")
        async with tx.stream(f"select id from {t} order by id", batch_size=3) as rows:
            assert [r[0] async for r in rows] == list(range(1, 11))
        await tx.execute(f"insert into {t} values (11)")
    assert await pool.fetch_val(f"select count(*) from {t}") == 11
    s = pool.statistics()
    assert s.busy == 0 and s.waiting == 0 and s.connects == 2


async def test_statistics(pool: Pool) -> None:
    await pool.wait()  # both connections made (they connect concurrently with the test)
    before = pool.statistics()
    for _ in range(5):
        await pool.fetch_val("select 1")
    async with pool.run() as conn:
        await conn.fetch_val("select 1")
        assert pool.statistics().busy == 1
    after = pool.statistics()
    assert after.checkouts - before.checkouts == 6
    assert (after.size, after.connects, after.disconnects) == (2, 2, 0)


# --------------------------------------------------------------------------------------------
# cancellation and lost connections


async def test_cancelled_client_mid_query(kind: str, pg_dsn: str, pg_admin: Admin) -> None:
    app = _app()
    driver = make_driver(kind, pg_dsn, app)
    async with open_pool(driver, size=2, name="aio-cancel") as pool:
        scope = trio.CancelScope()
        started = trio.Event()
        done = trio.Event()
        box: dict[str, Any] = {}

        async def client() -> None:
            with scope:
                async with pool.run() as conn:
                    box["pid"] = await conn.fetch_val("select pg_backend_pid()")
                    started.set()
                    await conn.execute("select pg_sleep(10)")
            box["returned"] = trio.current_time()
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await started.wait()
            pid = box["pid"]
            await pg_admin.wait_state(pid, ["active"])
            cancelled_at = trio.current_time()
            scope.cancel()
            with trio.fail_after(2):
                await done.wait()
        latency = box["returned"] - cancelled_at
        assert latency < 0.5, latency

        def healed() -> bool:
            states = dict(pg_admin.backends(app))
            return (
                len(states) == 2
                and all(s == "idle" for s in states.values())
                and _all_idle(pool)
            )

        idle_after = await _until(healed, timeout=2.0, what="backends idle after a cancel")
        assert pg_admin.state(pid) in ("idle", None)  # recovered in place, or replaced
        assert await pool.fetch_val("select 1") == 1
        print(
            f"[measure] aio {kind}: cancelled client returned in {latency * 1000:.2f} ms; "
            f"pool idle {idle_after * 1000:.1f} ms after; connects {pool.statistics().connects}"
        )


async def test_cancelled_between_begin_and_commit(
    kind: str, pg_dsn: str, pg_admin: Admin, make_table: Any
) -> None:
    t = make_table("id int")
    app = _app()
    async with open_pool(make_driver(kind, pg_dsn, app), size=2, name="aio-tx") as pool:
        scope = trio.CancelScope()
        in_tx = trio.Event()
        box: dict[str, Any] = {}

        async def client() -> None:
            with scope:
                async with pool.transaction() as tx:
                    box["pid"] = await tx.fetch_val("select pg_backend_pid()")
                    await tx.execute(f"insert into {t} values (1)")
                    in_tx.set()
                    await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await in_tx.wait()
            await pg_admin.wait_state(box["pid"], ["idle in transaction"])
            scope.cancel()

        def no_open_transaction() -> bool:
            states = [state for _, state in pg_admin.backends(app)]
            return bool(states) and all(s == "idle" for s in states)

        await _until(
            lambda: no_open_transaction() and _all_idle(pool), timeout=2.0, what="rolled back"
        )
        assert _count(pg_dsn, f"select count(*) from {t}") == 0


async def test_terminated_backends(kind: str, pg_dsn: str, pg_admin: Admin) -> None:
    app = _app()
    driver = make_driver(kind, pg_dsn, app)
    async with open_pool(driver, size=2, idle_interval=60, name="aio-term") as pool:
        # busy: the client's query fails with ConnectionLost, promptly
        started = trio.Event()
        box: dict[str, Any] = {}

        async def client() -> None:
            try:
                async with pool.run() as conn:
                    box["pid"] = await conn.fetch_val("select pg_backend_pid()")
                    started.set()
                    await conn.execute("select pg_sleep(10)")
            except Exception as exc:
                box["error"] = exc
            box["at"] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await started.wait()
            await pg_admin.wait_state(box["pid"], ["active"])
            killed_at = trio.current_time()
            assert pg_admin.terminate(box["pid"])
        assert isinstance(box.get("error"), ConnectionLost), box
        assert box["at"] - killed_at < 2.0
        for _ in range(4):
            assert await pool.fetch_val("select 1") == 1

        def healed() -> bool:
            backends = pg_admin.backends(app)
            return (
                len(backends) == 2
                and box["pid"] not in {pid for pid, _ in backends}
                and all(state == "idle" for _, state in backends)
                and _all_idle(pool)
            )

        await _until(healed, timeout=3.0, what="pool healed after a busy backend was killed")

        # idle: the next use finds it dead, and the pool heals
        pids = {pid for pid, _ in pg_admin.backends(app)}
        for pid in pids:
            assert pg_admin.terminate(pid)
            await pg_admin.wait_state(pid, [None])
        for _ in range(4):
            try:
                assert await pool.fetch_val("select 7") == 7
            except ConnectionLost:
                pass  # a one-shot is retried once; two dead connections may show one error
        assert await pool.fetch_val("select 8") == 8
        assert not (pids & {pid for pid, _ in pg_admin.backends(app)})
        assert pool.statistics().connects >= 5


async def test_server_stop_and_restart(kind: str, pg_private_cluster: PostgresCluster) -> None:
    cluster = pg_private_cluster
    limits = SafetyLimits(
        checkout_timeout=1.0, connect_timeout=2.0, query_timeout=5.0, cleanup_timeout=2.0
    )
    async with open_pool(
        make_driver(kind, cluster.dsn),
        size=2,
        name="aio-restart",
        limits=limits,
        idle_interval=0.2,
        backoff=Backoff(kind="exp", min=0.05, max=0.4),
    ) as pool:
        assert await pool.fetch_val("select 1") == 1
        await trio.to_thread.run_sync(cluster.stop, "fast")
        with pytest.raises((ConnectionLost, CheckoutTimeout, QueueDropped)):
            with trio.fail_after(5):
                await pool.fetch_val("select 1")
        await trio.to_thread.run_sync(cluster.start)
        started = trio.current_time()
        with trio.fail_after(10):
            while True:
                try:
                    assert await pool.fetch_val("select 2") == 2
                    break
                except (ConnectionLost, CheckoutTimeout, QueueDropped):
                    await trio.sleep(0.05)
        print(f"[measure] aio {kind}: serving {trio.current_time() - started:.2f} s after restart")
        assert pool.statistics().connects > 2


# --------------------------------------------------------------------------------------------
# the loop, the driver protocol, URLs and secrets


async def test_running_trio_asyncio_loop_is_used_and_left_open(kind: str, pg_dsn: str) -> None:
    driver = make_driver(kind, pg_dsn)
    async with trio_asyncio.open_loop() as loop:
        async with open_pool(driver, size=2, name="aio-loop") as pool:
            assert await pool.fetch_val("select 1") == 1
            assert not driver.loop_running  # the caller's loop, not one of ours
        assert not loop.is_closed()
    await driver.close()


async def test_driver_protocol_interrupted_call_and_close_under_a_call(
    kind: str, pg_dsn: str
) -> None:
    driver = make_driver(kind, pg_dsn)
    conn: Any = await driver.connect(driver.options)
    try:
        assert conn.status() == "idle"
        with trio.move_on_after(0.2):
            await conn.execute("select pg_sleep(10)")
        assert conn.status() == "unknown"
        with trio.fail_after(5):
            await conn.cancel()
            await conn.reset()
        assert conn.status() == "idle"
        await conn.begin(TransactionOptions())
        assert conn.status() == "transaction"
        with pytest.raises(DatabaseError) as info:
            await conn.execute("select 1/0")
        assert info.value.sqlstate == "22012"
        assert conn.status() == "error"
        await conn.reset()
        assert conn.status() == "idle"
        assert await conn.fetch("select 1") == [(1,)]
        await conn.ping()

        box: dict[str, Any] = {}

        async def call() -> None:
            try:
                await conn.execute("select pg_sleep(10)")
            except DriverConnectionLost as exc:
                box["error"] = exc
            box["at"] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await trio.sleep(0.2)
            closed_at = trio.current_time()
            await conn.close()
        assert isinstance(box.get("error"), DriverConnectionLost)
        assert box["at"] - closed_at < 1.0
        await conn.close()  # idempotent
        with pytest.raises(DriverConnectionLost):
            await conn.fetch("select 1")
        assert conn.status() == "unknown"
    finally:
        await conn.close()
        await driver.close()
    assert not driver.loop_running


async def test_connect_refused_and_secrets(kind: str, pg_server: Any) -> None:
    dsn = pg_server.dsn
    password = pg_server.password
    if password is None:
        pytest.skip("the server of TCS_POSTGRES_DSN has no password to check")
    driver = make_driver(kind, dsn)
    assert password in driver.secrets(driver.options)
    assert password not in repr(driver)
    bad = dict(driver.options)
    wrong = "Wr0ng-" + password
    if kind == "asyncpg":
        bad["dsn"] = bad["dsn"].replace(password, wrong) if bad.get("dsn") else None
        bad["password"] = wrong
    else:
        bad["password"] = wrong
    with pytest.raises(DatabaseError) as info:
        await driver.connect(bad)
    assert info.value.sqlstate == "28P01"
    assert wrong not in str(info.value)
    unreachable = dict(driver.options)
    if kind == "asyncpg":
        unreachable = {"host": "127.0.0.1", "port": 1, "user": "x", "password": wrong}
    else:
        unreachable.update(host="127.0.0.1", port="1")
    with pytest.raises(DriverConnectionLost) as lost:
        await driver.connect(unreachable)
    assert wrong not in str(lost.value)
    await driver.close()
    assert not driver.loop_running


def test_from_url() -> None:
    driver = from_url("postgresql+asyncpg://u:s3cr3t-pw@127.0.0.1:5432/db?sslmode=disable")
    assert isinstance(driver, AsyncpgDriver)
    assert driver.options["dsn"] == "postgresql://u:s3cr3t-pw@127.0.0.1:5432/db?sslmode=disable"
    assert "s3cr3t-pw" not in repr(driver)
    assert "s3cr3t-pw" in driver.secrets(driver.options)
    with pytest.raises(ValueError, match="asyncpg"):
        from_url("postgresql://u:pw@h/db")


async def test_pool_over_from_url(pg_dsn: str) -> None:
    if not pg_dsn.startswith("postgresql://"):
        pytest.skip("needs a URL DSN")
    driver = from_url("postgresql+asyncpg://" + pg_dsn.split("://", 1)[1])
    async with open_pool(driver, size=1, name="aio-url") as pool:
        assert await pool.fetch_val("select $1::int", [3]) == 3
    await driver.close()


async def test_open_pool_takes_a_postgresql_asyncpg_url(pg_dsn: str) -> None:
    pytest.importorskip("asyncpg")
    if not pg_dsn.startswith("postgresql://"):
        pytest.skip("needs a URL DSN")
    url = "postgresql+asyncpg://" + pg_dsn.split("://", 1)[1]
    async with open_pool(url, size=1, name="aio-scheme") as pool:
        assert type(pool.driver).__name__ == "AsyncpgDriver"
        assert await pool.fetch_val("select $1::int + 1", [41]) == 42
        async with pool.transaction() as tx:
            async with tx.transaction(savepoint=True):
                assert await tx.fetch_val("select 1") == 1


def _ph(kind: str, n: int) -> str:
    return f"${n}" if kind == "asyncpg" else "%s"


async def test_hosted_drivers_reset_sessions_and_return_named_rows(
    kind: str, driver: AioDriverBase
) -> None:
    from supervisor.rows import dict_row

    async with open_pool(driver, size=1, name="aio-everyday", row_factory=dict_row) as pool:
        stmt = pool.statement(f"select {_ph(kind, 1)}::int + 1 as n")
        assert await stmt.fetch_one((1,)) == {"n": 2}
        async with pool.run() as conn:
            await conn.execute("set search_path = pg_catalog")
            await conn.execute("create temp table leak (x int)")
        async with pool.run() as conn:
            assert await conn.fetch_val("show search_path") == '"$user", public'
            assert await conn.fetch_val(
                "select count(*) from pg_tables where tablename = 'leak'"
            ) == 0
            assert await conn.fetch_one(stmt, (41,)) == {"n": 42}  # prepared again after DISCARD
            rows = [r async for r in conn.stream("select 1 as a union all select 2", batch_size=1)]
            assert rows == [{"a": 1}, {"a": 2}]


async def test_a_statement_survives_repeated_resets_on_hosted_drivers(
    kind: str, driver: AioDriverBase
) -> None:
    async with open_pool(driver, size=1, name="aio-resets") as pool:
        stmt = pool.statement(f"select {_ph(kind, 1)}::int")
        for i in range(3):
            for _ in range(6):  # past psycopg's prepare threshold
                assert await stmt.fetch_val((i,)) == i
            async with pool.run() as conn:
                await conn.execute("set search_path = public")  # dirty: a reset follows
