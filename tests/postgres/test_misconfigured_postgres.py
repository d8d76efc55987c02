"""Permanent PostgreSQL connect errors fail fast (invalid port number, invalid sslmode, an
unknown option), without leaking the password; a refused connection is still retried."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

import pytest
import trio
from psycopg.conninfo import conninfo_to_dict

from actors.psycopg import PsycopgDriver
from supervisor import Backoff, CheckoutTimeout, LogEntry, PoolClosed, SafetyLimits, open_pool

SLOW = Backoff("exp", 100.0, 100.0)  # a retry would take 100 s: fail_after(10) catches it
PREFIX = "failed: the connect options are invalid (retrying cannot help): postgresql: "


def _password(dsn: str) -> str:
    password = conninfo_to_dict(dsn).get("password")
    assert password, "the test role connects with a password"
    return str(password)


async def _fails_fast(driver: PsycopgDriver, **kwargs: Any) -> tuple[str, list[LogEntry]]:
    entries: list[LogEntry] = []
    with trio.fail_after(10):
        with pytest.raises(PoolClosed) as info:
            async with open_pool(
                driver, size=1, backoff=SLOW, log=entries.append, name="pg", **kwargs
            ) as pool:
                await pool.fetch_val("select 1")
    return str(info.value), entries


@pytest.mark.parametrize("io", ["trio", "thread"])
async def test_an_invalid_port_number_fails_at_once(pg_dsn: str, io: str) -> None:
    message, entries = await _fails_fast(PsycopgDriver(pg_dsn, port="99999", io=io))
    assert message == (
        "pool 'pg': "
        + PREFIX
        + 'invalid connect options: connection is bad: invalid port number: "99999"'
    )
    assert [e.call for e in entries].count("connect_failed") == 1
    assert _password(pg_dsn) not in message


@pytest.mark.parametrize("io", ["trio", "thread"])
async def test_an_invalid_sslmode_fails_at_once(pg_dsn: str, io: str) -> None:
    message, entries = await _fails_fast(PsycopgDriver(pg_dsn, sslmode="bogus", io=io))
    assert message == (
        "pool 'pg': "
        + PREFIX
        + 'invalid connect options: connection is bad: invalid sslmode value: "bogus"'
    )
    assert [e.call for e in entries].count("connect_failed") == 1
    assert _password(pg_dsn) not in message


def _with_unknown_option(dsn: str) -> str:
    if "://" in dsn:
        return dsn + ("&" if "?" in dsn else "?") + "nosuchoption=1"
    return dsn + " nosuchoption=1"


def test_an_unknown_option_in_the_connection_string_is_refused_before_the_pool_opens(
    pg_dsn: str,
) -> None:
    with pytest.raises(ValueError) as info:
        PsycopgDriver(_with_unknown_option(pg_dsn))
    # libpq words it after the form of the string: a URL's query or a key=value list
    assert str(info.value) in (
        'invalid PostgreSQL connection string: invalid URI query parameter: "nosuchoption"\n',
        'invalid PostgreSQL connection string: invalid connection option "nosuchoption"\n',
    )
    assert _password(pg_dsn) not in str(info.value)


async def test_an_unknown_option_passed_as_a_keyword_fails_at_once(pg_dsn: str) -> None:
    message, entries = await _fails_fast(PsycopgDriver(pg_dsn, nosuchoption="1"))
    assert message == (
        "pool 'pg': " + PREFIX + 'invalid connect options: invalid connection option "nosuchoption"'
    )
    assert [e.call for e in entries].count("connect_failed") == 1
    assert _password(pg_dsn) not in message


@pytest.mark.parametrize("io", ["trio", "thread"])
async def test_an_unknown_option_added_at_connect_fails_at_once(pg_dsn: str, io: str) -> None:
    def configure(options: Mapping[str, Any], index: int) -> Mapping[str, Any]:
        return {**options, "nosuchoption": "1"}

    message, entries = await _fails_fast(PsycopgDriver(pg_dsn, io=io), configure=configure)
    assert message == (
        "pool 'pg': " + PREFIX + 'invalid connect options: invalid connection option "nosuchoption"'
    )
    assert [e.call for e in entries].count("connect_failed") == 1
    assert _password(pg_dsn) not in message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_refused_connection_is_still_retried(pg_dsn: str) -> None:
    driver = PsycopgDriver(pg_dsn, host="127.0.0.1", port=str(_free_port()))
    entries: list[LogEntry] = []
    with trio.fail_after(10):
        with pytest.raises(CheckoutTimeout):
            async with open_pool(
                driver,
                size=1,
                backoff=Backoff("exp", 0.05, 0.05),
                limits=SafetyLimits(checkout_timeout=1.0),
                queue_target=10.0,
                log=entries.append,
                name="pg",
            ) as pool:
                await pool.fetch_val("select 1")
    failed = [e for e in entries if e.call == "connect_failed"]
    assert len(failed) > 1
    assert all("Connection refused" in str(e.error) for e in failed)
    assert not any(e.call == "crash" for e in entries)
