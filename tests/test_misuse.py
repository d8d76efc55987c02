"""Misuse of the API gets an error that says what to do, before anything happens."""

from __future__ import annotations

from typing import Any

import pytest

from actors.scripted import ScriptedDriver
from supervisor import ConfigError, open_pool


async def test_using_pool_run_without_async_with_says_to_use_async_with() -> None:
    async with open_pool(ScriptedDriver(), size=1, name="m") as pool:
        block: Any = pool.run()
        with pytest.raises(AttributeError, match=r"pool 'm'.*async with pool.run\(\) as conn"):
            await block.execute("select 1")
        with pytest.raises(TypeError, match=r"pool 'm'.*cannot be awaited.*async with"):
            await block
        assert pool.statistics().checkouts == 0


async def test_using_pool_transaction_without_async_with_says_to_use_async_with() -> None:
    async with open_pool(ScriptedDriver(), size=1, name="m") as pool:
        block: Any = pool.transaction()
        with pytest.raises(
            AttributeError, match=r"async with pool.transaction\(\) as tx.*tx.fetch_all"
        ):
            block.fetch_all("select 1")
        with pytest.raises(TypeError, match=r"cannot be awaited"):
            await block
        assert pool.statistics().checkouts == 0


async def test_run_transaction_with_a_plain_function_says_to_use_async_def() -> None:
    driver = ScriptedDriver()
    async with open_pool(driver, size=1, name="m") as pool:

        def plain(tx: Any) -> int:
            return 1  # pragma: no cover

        with pytest.raises(ConfigError, match=r"pool 'm': run_transaction needs an async function"):
            await pool.run_transaction(plain)
        assert pool.statistics().checkouts == 0
    assert "begin" not in driver.ops()


@pytest.mark.parametrize(
    ("query", "style", "hint"),
    [
        ("select * from t where id = ?", "format", "placeholders are %s (or %(name)s), not ?"),
        ("select * from t where id = %s", "qmark", "placeholders are ? (or :name), not %s"),
        ("select * from t where id = %s", "numeric", "placeholders are $1, $2, ..., not %s"),
        ("select * from t where id = $1", "format", "not $1"),
        ("select * from t where id = %s", "format", ""),
        ("select '?' from t where id = %s", "format", ""),  # a ? in a string literal is data
        ("select * from t where id = ?", None, ""),  # a driver that does not say
    ],
)
def test_a_query_in_another_drivers_placeholder_style_gets_a_hint(
    query: str, style: str | None, hint: str
) -> None:
    from supervisor.session import placeholder_hint

    got = placeholder_hint(query, style)
    assert (hint in got) if hint else got == ""
