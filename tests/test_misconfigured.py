"""Permanent connect errors fail fast: options that can never work (the driver raises
``Misconfigured``) fail the pool at once with the reason, with no backoff and no restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from actors.driver import ConnectionLost as DriverLost
from actors.driver import Misconfigured
from actors.scripted import ScriptedDriver
from actors.sqlite import SqliteDriver
from supervisor import Backoff, LogEntry, PoolClosed, open_pool

SLOW = Backoff("exp", 100.0, 100.0)  # a retry or a restart would show up as 100 s of clock


async def test_a_misconfigured_connect_fails_the_waiting_client_at_once_without_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    driver.script("connect", Misconfigured("bad option 'frobnicate'"), *[DriverLost("x")] * 5)
    entries: list[LogEntry] = []
    start = trio.current_time()
    with pytest.raises(PoolClosed) as info:
        async with open_pool(driver, size=1, backoff=SLOW, log=entries.append, name="bad") as pool:
            await pool.fetch_val("select 1")
    assert str(info.value) == (
        "pool 'bad': failed: the connect options are invalid (retrying cannot help): "
        "bad option 'frobnicate'"
    )
    assert trio.current_time() == start
    assert driver.ops().count("connect") == 1
    calls = [e.call for e in entries if e.call in ("connect_failed", "crash", "restart")]
    assert calls == ["connect_failed", "crash"]


async def test_a_misconfigured_pool_ends_its_block_and_refuses_later_calls_with_the_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    driver.script("connect", Misconfigured('invalid port number: "99999"'))
    seen: list[str] = []
    reached_the_end_of_the_block = False
    with pytest.raises(PoolClosed) as info:
        async with open_pool(driver, size=1, backoff=SLOW, name="bad") as pool:
            with pytest.raises(PoolClosed) as first:
                await pool.execute("select 1")
            seen.append(str(first.value))
            await trio.sleep(1)  # the failed pool cancels its block, as a too-crashy one does
            reached_the_end_of_the_block = True
    with pytest.raises(PoolClosed) as later:
        await pool.execute("select 2")
    reason = (
        "pool 'bad': failed: the connect options are invalid (retrying cannot help): "
        'invalid port number: "99999"'
    )
    assert seen == [reason]
    assert str(info.value) == reason
    assert str(later.value) == reason
    assert not reached_the_end_of_the_block
    assert driver.ops().count("connect") == 1


async def test_every_slot_misconfigured_still_gives_one_error_and_no_exception_group(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    driver.script("connect", *[Misconfigured("never works")] * 4)
    with pytest.raises(PoolClosed) as info:
        async with open_pool(driver, size=4, backoff=SLOW, name="bad") as pool:
            await pool.fetch_val("select 1")
    assert type(info.value) is PoolClosed
    assert str(info.value).endswith("(retrying cannot help): never works")
    assert getattr(info.value, "__notes__", []) == []
    assert driver.ops().count("connect") <= 4


async def test_the_misconfigured_message_is_scrubbed_of_secrets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver(options={"password": "hunter2"})
    driver.script("connect", Misconfigured("bad sslmode in 'password=hunter2 sslmode=x'"))
    with pytest.raises(PoolClosed) as info:
        async with open_pool(driver, size=1, backoff=SLOW, name="bad") as pool:
            await pool.fetch_val("select 1")
    assert "hunter2" not in str(info.value)
    assert str(info.value).endswith("bad sslmode in 'password=*** sslmode=x'")


async def test_a_lost_connection_at_connect_is_still_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    driver.script("connect", DriverLost("refused"), DriverLost("refused"))
    async with open_pool(
        driver, size=1, backoff=Backoff("exp", 1.0, 1.0), queue_target=10.0
    ) as pool:
        assert await pool.execute("select 1") == 0
    assert driver.ops().count("connect") == 3


async def test_an_sqlite_file_in_a_missing_directory_fails_at_once_naming_the_resolved_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    entries: list[LogEntry] = []
    with trio.fail_after(5):  # a retry would wait 100 s
        with pytest.raises(PoolClosed) as info:
            async with open_pool(
                "sqlite:///missing/dir/app.db",
                size=1,
                backoff=SLOW,
                log=entries.append,
                name="files",
            ) as pool:
                await pool.fetch_val("select 1")
    resolved = os.path.join(str(tmp_path), "missing", "dir", "app.db")
    parent = os.path.join(str(tmp_path), "missing", "dir")
    assert str(info.value) == (
        "pool 'files': failed: the connect options are invalid (retrying cannot help): "
        f"sqlite: cannot open database file {resolved!r}: directory {parent!r} does not exist"
    )
    assert [e.call for e in entries].count("connect_failed") == 1
    assert not (tmp_path / "missing").exists()


async def test_an_sqlite_path_that_is_a_directory_fails_at_once(tmp_path: Path) -> None:
    with trio.fail_after(5):
        with pytest.raises(PoolClosed) as info:
            async with open_pool(SqliteDriver(tmp_path), size=1, backoff=SLOW, name="dir") as pool:
                await pool.fetch_val("select 1")
    assert str(info.value).endswith(
        f"sqlite: cannot open database file {str(tmp_path)!r}: that path is a directory"
    )


async def test_the_sqlite_driver_raises_misconfigured_for_a_missing_directory(
    tmp_path: Path,
) -> None:
    driver = SqliteDriver(tmp_path / "nope" / "x.db")
    with pytest.raises(Misconfigured) as info:
        await driver.connect(driver.options)
    assert str(tmp_path / "nope") in str(info.value)
    assert "does not exist" in str(info.value)


async def test_opening_the_pool_does_not_connect_synchronously(tmp_path: Path) -> None:
    entries: list[LogEntry] = []
    with trio.fail_after(5):
        with pytest.raises(PoolClosed):
            async with open_pool(
                f"sqlite:///{tmp_path}/nope/x.db", size=1, backoff=SLOW, log=entries.append
            ):
                assert entries == []  # the body runs before any connect was tried
                await trio.sleep_forever()  # the pool's failure ends the block
