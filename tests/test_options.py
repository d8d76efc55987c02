"""open_pool options: validation (ConfigError naming the option and the pool, raised at the call,
nothing started), the configure / after_connect hooks, and secrets kept out of reprs, errors and
log entries. Scripted driver and autojump clock."""

from __future__ import annotations

import itertools
import math
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from helpers import held

import supervisor
from actors.driver import ConnectionLost as DriverConnectionLost
from actors.driver import DatabaseError
from actors.scripted import ScriptedDriver
from supervisor import (
    Backoff,
    CheckoutTimeout,
    ConfigError,
    LogEntry,
    PoolClosed,
    PoolError,
    QueryError,
    SafetyLimits,
    open_pool,
)

NAME = "optpool"


# -- validation -----------------------------------------------------------------------------------


BAD_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"size": 0}, "size"),
    ({"size": -2}, "size"),
    ({"size": "3"}, "size"),
    ({"size": 2.0}, "size"),
    ({"size": True}, "size"),
    ({"size": None, "min_size": -1}, "min_size"),
    ({"size": 3, "min_size": 1}, "min_size"),
    ({"size": 3, "max_size": 5}, "max_size"),
    ({"min_size": 5, "max_size": 2}, "min_size"),
    ({"min_size": 5, "max_size": 2}, "max_size"),
    ({"min_size": "1", "max_size": 3}, "min_size"),
    ({"max_size": 0}, "max_size"),
    ({"max_size": 2.5}, "max_size"),
    ({"queue_target": -0.05}, "queue_target"),
    ({"queue_target": 0}, "queue_target"),
    ({"queue_target": "50ms"}, "queue_target"),
    ({"queue_target": math.nan}, "queue_target"),
    ({"queue_interval": 0}, "queue_interval"),
    ({"queue_interval": -1.0}, "queue_interval"),
    ({"queue_interval": None}, "queue_interval"),
    ({"backoff": "exp"}, "backoff"),
    ({"backoff": {"kind": "exp", "min": 1, "max": 2}}, "backoff"),
    ({"backoff": Backoff}, "backoff"),
    ({"idle_interval": 0}, "idle_interval"),
    ({"idle_interval": -1}, "idle_interval"),
    ({"idle_interval": math.nan}, "idle_interval"),
    ({"max_idle": -1}, "max_idle"),
    ({"max_idle": "10"}, "max_idle"),
    ({"max_lifetime": -5}, "max_lifetime"),
    ({"max_lifetime": 0}, "max_lifetime"),
    ({"after_connect": "SET search_path = app"}, "after_connect"),
    ({"configure": {"password": "x"}}, "configure"),
    ({"log": []}, "log"),
    ({"log": "supervisor"}, "log"),
    ({"limits": {"checkout_timeout": 1.0}}, "limits"),
    ({"limits": SafetyLimits}, "limits"),
    ({"limits": 30}, "limits"),
    ({"max_restarts": -1}, "max_restarts"),
    ({"restart_window": 0}, "restart_window"),
    ({"seed": "abc"}, "seed"),
]


@pytest.mark.parametrize(
    ("options", "option"), BAD_OPTIONS, ids=[f"{o}-{i}" for i, (_, o) in enumerate(BAD_OPTIONS)]
)
async def test_bad_option_raises_config_error_naming_option_and_pool(
    options: dict[str, Any], option: str
) -> None:
    driver = ScriptedDriver()
    with pytest.raises(ConfigError) as info:
        open_pool(driver, name=NAME, **options)  # raised by the call itself, not on entry
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, PoolError)
    assert option in str(err)
    assert repr(NAME) in str(err)
    assert err.pool == NAME
    # Nothing was started.
    await trio.testing.wait_all_tasks_blocked()
    assert driver.calls == []
    assert driver.connect_options == []


async def test_config_error_names_the_default_pool_name() -> None:
    with pytest.raises(ConfigError) as info:
        open_pool(ScriptedDriver(), size=0)
    assert info.value.pool is not None
    assert info.value.pool.startswith("scripted")
    assert repr(info.value.pool) in str(info.value)


@pytest.mark.parametrize("name", ["", 5, b"pool"])
def test_bad_name_is_a_config_error(name: Any) -> None:
    with pytest.raises(ConfigError, match="name"):
        open_pool(ScriptedDriver(), name=name)


@pytest.mark.parametrize("target", [42, None, object(), ["sqlite://:memory:"]])
def test_target_neither_url_nor_driver(target: Any) -> None:
    with pytest.raises(ConfigError, match="target") as info:
        open_pool(target, name=NAME)
    assert repr(NAME) in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "mysql://user@localhost/db",
        "http://example.com/",
        "localhost:5432",
        "app.db",
        "",
        "oracle+cx://scott@db",
    ],
)
def test_unsupported_url_scheme(url: str) -> None:
    with pytest.raises(ConfigError, match="scheme") as info:
        open_pool(url, name=NAME)
    assert repr(NAME) in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://host/app.db",  # a host part
        "sqlite:///",  # no file
        "sqlite:///some/dir/",  # a directory
        "sqlite:",
        "sqlite:///app.db?timeout=soon",
        "sqlite:///app.db?wal=maybe",
        "sqlite:///app.db?cache=shared",
        "sqlite:///app.db?timeout",
    ],
)
def test_bad_sqlite_urls(url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="URL") as info:
        open_pool(url, name=NAME)
    assert repr(NAME) in str(info.value)


def test_good_sqlite_urls_start_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "absolute.db"
    for url in (
        "sqlite://:memory:",
        "sqlite:///relative.db",
        f"sqlite:///{db}",  # sqlite:////abs/path.db
        "sqlite:///relative.db?timeout=2.5&wal=off",
    ):
        open_pool(url, name=NAME)
    # open_pool(...) without `async with` opens no database file.
    assert list(tmp_path.iterdir()) == []


async def test_option_defaults(autojump_clock: trio.testing.MockClock) -> None:
    async with open_pool(ScriptedDriver(), name=NAME) as pool:
        await trio.testing.wait_all_tasks_blocked()
        stats = pool.statistics()
        assert (stats.size, stats.min_size, stats.max_size, stats.idle) == (10, 10, 10, 10)
        assert stats.name == NAME
        assert pool.limits == SafetyLimits()
    assert SafetyLimits().checkout_timeout == 30.0
    assert SafetyLimits().connect_timeout == 10.0
    assert SafetyLimits().shutdown_grace == 5.0
    assert SafetyLimits().hold_timeout is None


@pytest.mark.parametrize(
    ("options", "sizes"),
    [
        ({"min_size": 2, "max_size": 7}, (2, 2, 7)),
        ({"max_size": 3}, (0, 0, 3)),
        ({"size": 4}, (4, 4, 4)),
        ({"min_size": 0, "max_size": 1}, (0, 0, 1)),
    ],
)
async def test_sizes(
    options: dict[str, Any], sizes: tuple[int, int, int], autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(ScriptedDriver(), **options) as pool:
        await trio.testing.wait_all_tasks_blocked()
        stats = pool.statistics()
        assert (stats.size, stats.min_size, stats.max_size) == sizes


BAD_LIMITS: list[tuple[dict[str, Any], str]] = [
    ({"checkout_timeout": -1}, "checkout_timeout"),
    ({"checkout_timeout": 0}, "checkout_timeout"),
    ({"checkout_timeout": "5"}, "checkout_timeout"),
    ({"checkout_timeout": math.nan}, "checkout_timeout"),
    ({"checkout_timeout": True}, "checkout_timeout"),
    ({"hold_timeout": 0}, "hold_timeout"),
    ({"hold_timeout": -3}, "hold_timeout"),
    ({"query_timeout": -1}, "query_timeout"),
    ({"query_timeout": "1s"}, "query_timeout"),
    ({"connect_timeout": 0}, "connect_timeout"),
    ({"max_waiting": -1}, "max_waiting"),
    ({"max_waiting": 1.5}, "max_waiting"),
    ({"max_waiting": True}, "max_waiting"),
    ({"max_waiting": "10"}, "max_waiting"),
    ({"shutdown_grace": -1}, "shutdown_grace"),
    ({"shutdown_grace": None}, "shutdown_grace"),
    ({"cleanup_timeout": 0}, "cleanup_timeout"),
    ({"cleanup_timeout": None}, "cleanup_timeout"),
]


@pytest.mark.parametrize(
    ("fields", "field"), BAD_LIMITS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_LIMITS)]
)
def test_bad_safety_limits_raise_value_error_naming_the_field(
    fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        SafetyLimits(**fields)


def test_bad_limits_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="hold_timeout"):
        open_pool(ScriptedDriver(), size=1, limits=SafetyLimits(hold_timeout=-1))


def test_safety_limits_unlimited_and_edge_values() -> None:
    unlimited = SafetyLimits.unlimited()
    assert unlimited.checkout_timeout is None
    assert unlimited.hold_timeout is None
    assert unlimited.query_timeout is None
    assert unlimited.max_waiting is None
    assert unlimited.connect_timeout is None
    assert unlimited.shutdown_grace > 0 and unlimited.cleanup_timeout > 0  # closing stays bounded
    SafetyLimits(shutdown_grace=0, max_waiting=0)  # zero is allowed for these two


# -- configure ------------------------------------------------------------------------------------


async def test_configure_runs_before_every_connect_and_its_result_is_used(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver(options={"host": "db1", "user": "app"})
    counter = itertools.count(1)
    seen: list[tuple[dict[str, Any], int]] = []

    def configure(options: Mapping[str, Any], index: int) -> Mapping[str, Any]:
        seen.append((dict(options), index))
        return {**options, "host": "db2", "token": f"t{next(counter)}", "slot": index}

    entries: list[LogEntry] = []
    async with open_pool(
        driver, size=2, configure=configure, idle_interval=100, log=entries.append
    ) as pool:
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(i for _, i in seen) == [0, 1]
        assert all(opts == {"host": "db1", "user": "app"} for opts, _ in seen)
        assert sorted(o["token"] for o in driver.connect_options) == ["t1", "t2"]
        assert all(o["host"] == "db2" for o in driver.connect_options)
        assert all(o["slot"] in (0, 1) for o in driver.connect_options)
        # A reconnect calls it again (credential rotation), with the same slot index.
        async with pool.run() as conn:
            conn.kill()
        await trio.testing.wait_all_tasks_blocked()
        (slot,) = [e.connection for e in entries if e.call == "disconnect"]
        assert len(seen) == 3
        assert seen[-1][1] == slot
        assert driver.connect_options[-1]["token"] == "t3"
        assert driver.connect_options[-1]["slot"] == slot
    assert driver.options == {"host": "db1", "user": "app"}  # defaults untouched


async def test_configure_is_called_for_every_attempt_including_failed_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    driver.script("connect", DriverConnectionLost("down"), DriverConnectionLost("down"))
    calls = 0

    def configure(options: Mapping[str, Any], index: int) -> Mapping[str, Any]:
        nonlocal calls
        calls += 1
        return {"attempt": calls}

    async with open_pool(
        driver,
        size=1,
        configure=configure,
        backoff=Backoff(kind="exp", min=1, max=1),
        queue_interval=100,
    ) as pool:
        assert await pool.execute("x") == 0
    assert [o["attempt"] for o in driver.connect_options] == [1, 2, 3]


async def test_configure_returning_a_non_mapping_fails_the_pool_with_a_clear_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(PoolClosed) as info:
        async with open_pool(
            ScriptedDriver(),
            size=1,
            name=NAME,
            configure=lambda options, index: ["nope"],  # type: ignore[arg-type,return-value]
            backoff=Backoff(kind="exp", min=0.1, max=0.1),
            max_restarts=2,
            limits=SafetyLimits(checkout_timeout=None),
            queue_interval=100,
        ):
            await trio.sleep_forever()
    assert "configure" in str(info.value)
    assert repr(NAME) in str(info.value)


# -- after_connect --------------------------------------------------------------------------------


async def test_after_connect_runs_before_first_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    hooked: list[int] = []

    async def after_connect(conn: supervisor.Connection) -> None:
        await conn.execute("SET search_path = app")
        hooked.append(len(driver.connections))

    async with open_pool(driver, size=2, after_connect=after_connect, idle_interval=100) as pool:
        async with pool.run() as conn:
            await conn.execute("select * from t")
        first = driver.calls[-1].conn
        assert driver.ops(first) == ["execute", "execute"]
        queries = [c.args[0] for c in driver.calls if c.conn == first and c.op == "execute"]
        assert queries == ["SET search_path = app", "select * from t"]
        assert len(hooked) == 2
        # Every new connection gets it, reconnects included.
        async with pool.run() as conn:
            conn.kill()
        await trio.testing.wait_all_tasks_blocked()
        assert len(hooked) == 3
        assert driver.ops(3) == ["execute"]


async def test_after_connect_failure_is_a_failed_connect_and_is_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    attempts = 0
    entries: list[LogEntry] = []

    async def after_connect(conn: supervisor.Connection) -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise RuntimeError("migration check failed")
        await conn.execute("SET role app")

    async with open_pool(
        driver,
        size=1,
        after_connect=after_connect,
        log=entries.append,
        backoff=Backoff(kind="exp", min=1, max=1),
        queue_interval=100,
    ) as pool:
        async with pool.run() as conn:
            await conn.execute("work")
            assert driver.calls[-1].conn == 3
    assert attempts == 3
    assert [c.closed for c in driver.connections[:2]] == [True, True]
    assert [e.call for e in entries].count("connect_failed") == 2
    assert driver.ops(1) == ["close"]


async def test_after_connect_leaving_a_transaction_open_is_rejected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    entries: list[LogEntry] = []
    calls = 0

    async def after_connect(conn: supervisor.Connection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # leave the new connection inside a transaction
            driver.connections[-1].forced_status = "transaction"
        await conn.execute("SET x = 1")

    async with open_pool(
        driver,
        size=1,
        after_connect=after_connect,
        log=entries.append,
        backoff=Backoff(kind="exp", min=1, max=1),
        queue_interval=100,
    ) as pool:
        async with pool.run() as conn:
            assert conn.status() == "idle"
            await conn.execute("work")
            assert driver.calls[-1].conn == 2
    failed = [e for e in entries if e.call == "connect_failed"]
    assert len(failed) == 1
    assert driver.connections[0].closed


# -- secrets --------------------------------------------------------------------------------------

SECRET = "s3cret"


def texts_of(entry: LogEntry) -> list[str]:
    return [str(entry.message or ""), str(entry.query or ""), str(entry.params or "")]


async def test_password_never_in_repr_errors_or_log_messages(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver(options={"user": "app", "password": SECRET})
    driver.script(
        "connect",
        DriverConnectionLost(f"could not connect to db as app:{SECRET}@db1"),
        DatabaseError(f'FATAL: password "{SECRET}" authentication failed', sqlstate="28P01"),
    )
    entries: list[LogEntry] = []
    errors: list[BaseException] = []
    async with open_pool(
        driver,
        size=1,
        name="secretive",
        log=entries.append,
        backoff=Backoff(kind="exp", min=1, max=1),
        limits=SafetyLimits(checkout_timeout=5),
    ) as pool:
        assert SECRET not in repr(pool)
        await trio.sleep(3)
        driver.script("execute", DatabaseError(f"syntax error near '{SECRET}'", sqlstate="42601"))
        driver.script("fetch", DriverConnectionLost(f"socket to app:{SECRET}@db1 closed"))
        with pytest.raises(QueryError) as query_error:
            await pool.execute("select 1")
        errors.append(query_error.value)
        with pytest.raises(supervisor.ConnectionLost) as lost:
            async with pool.run() as conn:
                await conn.fetch_all("select 2")
        errors.append(lost.value)
        async with held(pool):
            with pytest.raises(CheckoutTimeout) as timeout:
                async with pool.run(timeout=0.5):
                    pass  # pragma: no cover
            errors.append(timeout.value)
        assert SECRET not in repr(pool)
        assert SECRET not in repr(pool.statistics())
    assert SECRET not in repr(driver)
    assert len(errors) == 3
    for err in errors:
        assert SECRET not in str(err), err
        assert SECRET not in repr(err), err
        assert "secretive" in str(err)
    assert [e.call for e in entries].count("connect_failed") == 2
    for entry in entries:
        for text in texts_of(entry):
            assert SECRET not in text, entry
    failed = [e for e in entries if e.call == "connect_failed"]
    assert all(e.message and "***" in e.message for e in failed)


async def test_rotated_password_from_configure_is_scrubbed_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rotated = "r0tated-pw"
    driver = ScriptedDriver(options={"password": SECRET})
    driver.script("connect", DriverConnectionLost(f"auth failed for {rotated}"))
    entries: list[LogEntry] = []
    async with open_pool(
        driver,
        size=1,
        log=entries.append,
        backoff=Backoff(kind="exp", min=1, max=1),
        configure=lambda options, index: {**options, "password": rotated},
        queue_interval=100,
    ) as pool:
        await pool.execute("x")
    assert driver.connect_options[0]["password"] == rotated
    failed = [e for e in entries if e.call == "connect_failed"]
    assert len(failed) == 1
    assert rotated not in (failed[0].message or "")


async def test_password_not_in_pool_closed_after_give_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver(options={"password": SECRET})
    driver.script("connect", *[DriverConnectionLost(f"bad password {SECRET}")] * 10)
    entries: list[LogEntry] = []
    with pytest.raises(PoolClosed) as info:
        async with open_pool(
            driver,
            size=1,
            backoff=Backoff(kind="stop"),
            max_restarts=1,
            log=entries.append,
            limits=SafetyLimits(checkout_timeout=None),
            queue_interval=100,
        ):
            await trio.sleep_forever()
    assert SECRET not in str(info.value)
    for entry in entries:
        for text in texts_of(entry):
            assert SECRET not in text, entry


async def test_pool_failure_chain_built_by_the_pool_has_no_password() -> None:
    secret = "hunter2-s3cret"
    driver = ScriptedDriver(options={"password": secret})
    driver_error = DriverConnectionLost(f"could not connect: password={secret} rejected")
    driver.script("connect", driver_error)
    with pytest.raises(PoolClosed) as info:
        async with open_pool(
            driver, size=1, name="sec", backoff=Backoff(kind="stop"), max_restarts=0
        ):
            await trio.sleep_forever()
    assert secret not in str(info.value)
    chain: list[BaseException] = []
    exc: BaseException | None = info.value
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    own = [e for e in chain if e is not driver_error]  # the driver's own text is its business
    leaked = [e for e in own if secret in str(e)]
    assert not leaked, f"pool-built exceptions carrying the secret: {leaked!r}\n" + "".join(
        traceback.format_exception(info.value)
    )


async def test_password_not_in_log_entry_errors(autojump_clock: trio.testing.MockClock) -> None:
    driver = ScriptedDriver(options={"password": SECRET})
    driver.script("connect", DriverConnectionLost(f"could not connect as app:{SECRET}"))
    entries: list[LogEntry] = []
    async with open_pool(
        driver,
        size=1,
        log=entries.append,
        backoff=Backoff(kind="exp", min=1, max=1),
        queue_interval=100,
    ) as pool:
        await pool.execute("x")
    assert any(e.error is not None for e in entries)
    for entry in entries:
        assert SECRET not in str(entry.error), entry
        assert SECRET not in repr(entry)


def test_infinite_backoff_bound_is_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        Backoff(kind="rand", min=1, max=math.inf)


def test_plain_function_as_after_connect_is_a_config_error() -> None:
    def not_async(conn: object) -> None:
        pass

    with pytest.raises(ConfigError, match="after_connect must be an async function"):
        open_pool(ScriptedDriver(), after_connect=not_async)  # type: ignore[arg-type]
