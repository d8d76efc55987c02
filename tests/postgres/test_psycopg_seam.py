"""The psycopg internals ``actors.psycopg`` (io="trio") relies on. Fails loudly if they move.

psycopg is pinned to ``>=3.3,<3.4``. When a new psycopg minor is adopted, this file says what to
re-check; if it fails, switch users to ``io="thread"`` (public API only) until the driver is
adapted.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from collections.abc import AsyncIterator

import psycopg
import psycopg.errors
import psycopg.waiting
import pytest
import trio
from psycopg import pq

import actors.psycopg.seam as driver_module
from actors.psycopg import PsycopgDriver
from actors.psycopg.seam import TrioAsyncConnection, _ExclusiveLock
from actors.psycopg.seam import trio_connect as _trio_connect


def _params(func: object) -> list[str]:
    return list(inspect.signature(func).parameters)  # type: ignore[arg-type]


def test_psycopg_version_is_the_pinned_minor() -> None:
    major, minor = (int(x) for x in psycopg.__version__.split(".")[:2])
    assert (major, minor) == (3, 3), (
        f"psycopg {psycopg.__version__}: actors/psycopg.py was written against 3.3; "
        "re-check every seam in this file, then move the pin in pyproject.toml"
    )


def test_wait_method_signature() -> None:
    # Every query of AsyncConnection goes through self.wait(gen, interval, timeout).
    assert _params(psycopg.AsyncConnection.wait) == ["self", "gen", "interval", "timeout"]
    assert _params(TrioAsyncConnection.wait) == ["self", "gen", "interval", "timeout"]
    assert TrioAsyncConnection.wait is not psycopg.AsyncConnection.wait


@pytest.mark.parametrize(
    "method",
    [
        psycopg.AsyncCursor.execute,
        psycopg.AsyncConnection.rollback,
        psycopg.AsyncConnection.commit,
        psycopg.AsyncConnection.set_autocommit,
    ],
)
def test_operations_go_through_wait_and_lock(method: object) -> None:
    source = inspect.getsource(method)  # type: ignore[arg-type]
    assert ".wait(" in source, f"{method} no longer calls wait()"
    assert ".lock" in source, f"{method} no longer takes the connection lock"


def test_cursor_execute_signature() -> None:
    assert _params(psycopg.AsyncCursor.execute) == ["self", "query", "params", "prepare", "binary"]


def test_lock_attribute_is_an_asyncio_lock() -> None:
    # psycopg builds self.lock = asyncio.Lock() in __init__; we replace it by a subclass that
    # never needs an event loop.
    source = inspect.getsource(psycopg.AsyncConnection.__init__)
    assert "self.lock = ALock()" in source
    from psycopg import _acompat

    assert _acompat.ALock is asyncio.Lock
    assert issubclass(_ExclusiveLock, asyncio.Lock)
    # the context-manager protocol of asyncio.Lock calls acquire()/release()
    assert "acquire" in inspect.getsource(asyncio.locks._ContextManagerMixin.__aenter__)
    assert "release" in inspect.getsource(asyncio.locks._ContextManagerMixin.__aexit__)


async def test_exclusive_lock_never_waits_and_refuses_contention() -> None:
    lock = _ExclusiveLock()
    async with lock:
        assert lock.locked()
        with pytest.raises(RuntimeError, match="two operations"):
            async with lock:
                pass  # pragma: no cover
    assert not lock.locked()


def test_generator_protocol_enums() -> None:
    # Generators yield a Wait and are sent a Ready.
    W, R = psycopg.waiting.Wait, psycopg.waiting.Ready
    assert (int(W.R), int(W.W), int(W.RW)) == (1, 2, 3)
    assert (int(R.NONE), int(R.R), int(R.W), int(R.RW)) == (0, 1, 2, 3)


def test_private_helpers_exist() -> None:
    from psycopg import _conninfo_utils

    assert _params(_conninfo_utils.split_attempts) == ["params"]
    assert _params(_conninfo_utils.get_param) == ["params", "name"]
    assert _params(_conninfo_utils.is_ip_address) == ["s"]
    attempts = _conninfo_utils.split_attempts({"host": "a,b", "port": "1,2", "dbname": "x"})
    assert [(a["host"], a["port"]) for a in attempts] == [("a", "1"), ("b", "2")]
    assert _conninfo_utils.is_ip_address("127.0.0.1")
    assert not _conninfo_utils.is_ip_address("localhost")
    assert issubclass(psycopg.errors._WaitTimeout, psycopg.OperationalError)


def test_libpq_level_api() -> None:
    for name in (
        "connect_start",
        "connect_poll",
        "cancel_conn",
        "get_cancel",
        "finish",
        "socket",
        "transaction_status",
        "flush",
        "consume_input",
        "is_busy",
        "get_result",
        "send_query",
        "get_copy_data",
        "put_copy_end",
        "backend_pid",
        "nonblocking",
        "status",
    ):
        assert hasattr(pq.PGconn, name), name
    for name in ("start", "poll", "socket", "finish", "get_error_message"):
        assert hasattr(pq.PGcancelConn, name), name
    assert {s.name for s in pq.PollingStatus} >= {"OK", "READING", "WRITING", "FAILED"}
    assert {s.name for s in pq.TransactionStatus} == {
        "IDLE",
        "ACTIVE",
        "INTRANS",
        "INERROR",
        "UNKNOWN",
    }
    # the non-blocking cancel needs libpq >= 17 (psycopg-binary 3.3 bundles it); older libpq
    # falls back to PQcancel in a thread
    assert psycopg.capabilities.has_cancel_safe(), "libpq < 17: cancel uses a worker thread"


def _shrink_send_buffer(conn: TrioAsyncConnection) -> None:
    """A tiny kernel send buffer, so sending a big message surely hits "would block"."""
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    finally:
        sock.close()


@pytest.fixture
async def trio_conn(pg_dsn: str) -> AsyncIterator[TrioAsyncConnection]:
    conn = await _trio_connect(PsycopgDriver(pg_dsn).options, None, 5)
    try:
        yield conn
    finally:
        await conn.close()


async def test_queries_really_go_through_our_wait(trio_conn: TrioAsyncConnection) -> None:
    # Behavioural check: count wait() calls on a live connection. (If any path bypassed wait
    # it would reach for asyncio, which has no loop under Trio, and fail.)
    calls = 0
    original = trio_conn.wait

    async def counting(gen, interval=0.1, timeout=None):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return await original(gen, interval, timeout)

    trio_conn.wait = counting  # type: ignore[method-assign]
    assert trio_conn.autocommit
    cur = trio_conn.cursor()
    await cur.execute("select %s::int", [1])
    assert await cur.fetchall() == [(1,)]
    await cur.execute("begin")
    await trio_conn.rollback()
    assert calls == 3
    # asyncio was never needed
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()


async def test_rw_wait_path_with_a_huge_parameter(
    trio_conn: TrioAsyncConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 2 MB parameter overflows a 4 kB socket send buffer: libpq asks to wait for "read or write".
    used = 0
    original = driver_module._wait_either

    async def counting(fd: int) -> int:
        nonlocal used
        used += 1
        return await original(fd)

    monkeypatch.setattr(driver_module, "_wait_either", counting)
    # never take the zero-timeout-poll shortcut, so the two-task wait really runs
    monkeypatch.setattr(driver_module, "_ready_now", lambda fd, wait: 0)
    _shrink_send_buffer(trio_conn)
    big = "x" * (2 * 1024 * 1024)
    cur = trio_conn.cursor()
    await cur.execute("select length(%s::text)", [big])
    assert await cur.fetchall() == [(len(big),)]
    assert used > 0


async def test_rw_wait_is_cancellable_without_exception_groups(
    trio_conn: TrioAsyncConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cancelled inside the two-task RW wait: a plain Cancelled comes out (caught by the scope),
    # not an ExceptionGroup.
    original = driver_module._wait_either
    entered = 0

    async def cancel_then_wait(fd: int) -> int:
        nonlocal entered
        entered += 1
        scope.cancel()
        return await original(fd)

    monkeypatch.setattr(driver_module, "_wait_either", cancel_then_wait)
    monkeypatch.setattr(driver_module, "_ready_now", lambda fd, wait: 0)
    _shrink_send_buffer(trio_conn)
    big = "y" * (2 * 1024 * 1024)
    with trio.CancelScope() as scope:
        cur = trio_conn.cursor()
        await cur.execute("select length(%s::text)", [big])
    assert scope.cancelled_caught
    assert entered == 1
