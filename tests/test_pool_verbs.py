"""The pool's own verbs: wait, check, resize, an async configure, and the refusals that come
before any I/O (NUL in SQL text, secrets in generated names)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing
from helpers import settle

from actors.driver import ConnectionLost as DriverLost
from actors.scripted import ScriptedDriver
from supervisor import (
    Backoff,
    CheckoutTimeout,
    ConfigError,
    PoolClosed,
    QueryError,
    SafetyLimits,
    open_pool,
)


async def test_wait_returns_once_min_size_connections_are_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    gate = trio.Event()

    async def slow_connect(call: Any) -> None:
        await gate.wait()

    driver.script("connect", slow_connect, slow_connect)
    async with open_pool(driver, size=2) as pool:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.wait)
            await settle()
            assert pool.statistics().idle == 0
            gate.set()
        assert pool.statistics().idle == 2


async def test_wait_times_out_carrying_the_last_connect_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    driver.script("connect", *[DriverLost("connection refused")] * 20)
    async with open_pool(driver, size=1, backoff=Backoff("exp", 0.5, 0.5), name="w") as pool:
        start = trio.current_time()
        with pytest.raises(CheckoutTimeout, match=r"pool 'w': wait\(\): 0 of min_size=1.*refused"):
            await pool.wait(timeout=3)
        assert trio.current_time() - start == pytest.approx(3)


async def test_check_pings_idle_connections_now_and_counts_the_dead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=3, idle_interval=3600) as pool:
        await settle()
        driver.script("ping", None, DriverLost("gone"), None)
        before = trio.current_time()
        assert await pool.check() == 1
        assert trio.current_time() == before  # no timer was waited for
        assert driver.ops().count("ping") == 3
        await settle()
        stats = pool.statistics()
        assert stats.connects == 4 and stats.idle == 3


async def test_check_skips_busy_connections() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=2, idle_interval=3600) as pool:
        await settle()
        async with pool.run():
            assert await pool.check() == 0
            assert driver.ops().count("ping") == 1


async def test_resize_grows_and_shrinks_without_failing_a_holder(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, min_size=1, max_size=4) as pool:
        await settle()
        pool.resize(min_size=3)
        await settle()
        assert pool.statistics().idle == 3
        pool.resize(min_size=1, max_size=2)  # the idle one above max_size goes at once
        await settle()
        assert pool.statistics().size == 2
        async with pool.run() as a, trio.open_nursery() as nursery:
            release = trio.Event()

            async def second() -> None:
                async with pool.run() as b:
                    await release.wait()
                    assert await b.execute("still mine too") == 0

            nursery.start_soon(second)
            await settle()
            assert pool.statistics().busy == 2
            pool.resize(max_size=1)  # both busy: one goes when it is given back
            await settle()
            stats = pool.statistics()
            assert (stats.size, stats.busy, stats.max_size) == (2, 2, 1)
            assert await a.execute("still mine") == 0
            release.set()
        await settle()
        stats = pool.statistics()
        assert (stats.size, stats.idle) == (1, 1)


async def test_bad_resize_raises_config_error_and_changes_nothing() -> None:
    async with open_pool(ScriptedDriver(), min_size=1, max_size=2, name="r") as pool:
        with pytest.raises(ConfigError, match=r"pool 'r': min_size \(3\) must not exceed max_size"):
            pool.resize(min_size=3)
        with pytest.raises(ConfigError, match="max_size"):
            pool.resize(max_size=0)
        stats = pool.statistics()
        assert (stats.min_size, stats.max_size) == (1, 2)


async def test_an_async_configure_is_awaited_before_every_connect() -> None:
    driver = ScriptedDriver(options={"password": "old"})
    seen: list[int] = []

    async def rotate(options: Mapping[str, Any], index: int) -> Mapping[str, Any]:
        await trio.lowlevel.checkpoint()
        seen.append(index)
        return {**options, "password": f"fresh-{len(seen)}"}

    async with open_pool(driver, size=2, configure=rotate) as pool:
        await pool.wait()
    assert sorted(seen) == [0, 1]
    assert sorted(o["password"] for o in driver.connect_options) == ["fresh-1", "fresh-2"]


async def test_nul_in_sql_text_is_refused_before_any_io() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1, name="nul") as pool:
        await pool.wait()
        with pytest.raises(QueryError, match=r"pool 'nul': the SQL text contains a NUL"):
            await pool.execute("delete from t\x00 where id = 5")
        async with pool.run() as conn:
            with pytest.raises(QueryError, match="NUL"):
                await conn.fetch_all("select 1\x00")
            assert conn.status() == "idle"
    assert "execute" not in driver.ops() and "fetch" not in driver.ops()


@pytest.mark.parametrize(
    "target",
    [
        "host=127.0.0.1 port=1 password=hunter2:x dbname=app",
        "password=hunter2 host=127.0.0.1 port=1",
    ],
)
async def test_a_keyword_target_is_accepted_and_its_password_never_shown(target: str) -> None:
    pytest.importorskip("psycopg")
    limits = SafetyLimits(checkout_timeout=0.5, connect_timeout=0.2)
    async with open_pool(target, size=1, limits=limits, backoff=Backoff("exp", 5, 5)) as pool:
        assert pool.name.startswith("pool-") or pool.name.startswith("postgresql-")
        assert "hunter2" not in pool.name and "hunter2" not in repr(pool)
        assert "hunter2" not in repr(pool.driver)


def test_a_bad_keyword_target_is_a_config_error_without_the_password() -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(ConfigError) as info:
        open_pool("host=127.0.0.1 password=hunter2 nosuchoption=1")
    assert "hunter2" not in str(info.value)


async def test_wait_on_a_closed_pool_raises_pool_closed() -> None:
    async with open_pool(ScriptedDriver(), size=1) as pool:
        pass
    with pytest.raises(PoolClosed):
        await pool.wait()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"reset": "sometimes"}, "option reset"),
        ({"reset": 3}, "option reset"),
        ({"reset": lambda conn: None}, "option reset"),
        ({"row_factory": "dict"}, "option row_factory"),
        ({"statement_cache_size": 0}, "option statement_cache_size"),
        ({"statement_cache_size": 1.5}, "option statement_cache_size"),
    ],
)
def test_each_new_option_is_validated_at_open_pool_naming_it(
    options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        open_pool(ScriptedDriver(), **options)


async def test_statements_are_prepared_once_per_connection_and_evicted_lru() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1, statement_cache_size=2) as pool:
        a, b, c = (pool.statement(f"select {n}") for n in "abc")
        for stmt in (a, b, a, b):
            await stmt.fetch_all()
        assert driver.ops().count("prepare") == 2  # once each on this connection
        await c.fetch_all()  # evicts a (b was used last)
        await a.fetch_all()  # prepared again, evicting b
        await b.fetch_all()  # prepared again, evicting c
        await a.fetch_all()  # still prepared
        prepared = [call.args[0] for call in driver.calls if call.op == "prepare"]
        assert prepared == ["select a", "select b", "select c", "select a", "select b"]
        async with pool.run() as conn:
            conn.kill()
        await a.fetch_all()  # a new connection: prepared again there
        assert [call.args[0] for call in driver.calls if call.op == "prepare"][-1] == "select a"
