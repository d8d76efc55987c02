"""PostgreSQL through psycopg 3, with Trio-native I/O.

:class:`PsycopgDriver` implements the :mod:`actors.driver` protocol on top of psycopg 3.3.

I/O modes (``io=``):

``"trio"`` (default)
    A subclass of :class:`psycopg.AsyncConnection` whose :meth:`~psycopg.AsyncConnection.wait`
    drives psycopg's non-blocking protocol generators with
    :func:`trio.lowlevel.wait_readable` / :func:`trio.lowlevel.wait_writable` on the libpq
    socket, so every query runs in the calling Trio task with no thread and no asyncio loop.
    Connecting is Trio-native too: the driver splits the connection attempts itself, resolves
    host names with :func:`trio.socket.getaddrinfo` (unix sockets and IP literals need no
    resolution) and polls libpq's non-blocking connect with the same waits. The server-side
    cancel uses libpq's non-blocking cancel connection (``PQcancelStart``/``PQcancelPoll``,
    libpq >= 17) driven the same way.

``"thread"``
    A plain synchronous :class:`psycopg.Connection`; every call runs in a worker thread
    (:func:`trio.to_thread.run_sync`, abandoned at once when the caller is cancelled). Slower
    (one thread hop per call) but independent of psycopg's internals: the fallback if a psycopg
    release moves the seam the ``"trio"`` mode relies on.

Both modes behave the same, and both put the connection in autocommit mode: the pool sends
``BEGIN`` / ``COMMIT`` / ``ROLLBACK`` / ``SAVEPOINT`` itself through the protocol methods.

Internal seams of psycopg used by the ``"trio"`` mode (pinned by ``psycopg>=3.3,<3.4`` and
checked by ``tests/postgres/test_psycopg_seam.py``): the ``wait(gen, interval, timeout)`` method
every query of :class:`~psycopg.AsyncConnection` goes through; the generator protocol (yield a
``psycopg.waiting.Wait``, receive a ``psycopg.waiting.Ready``); the ``lock`` attribute (an
:class:`asyncio.Lock` that psycopg takes around every operation, replaced here by a lock that
never touches asyncio, see :class:`_ExclusiveLock`); ``psycopg._conninfo_utils.split_attempts``
/ ``get_param`` / ``is_ip_address`` (multi-host connection strings); and
``psycopg.errors._WaitTimeout`` (the exception ``wait`` raises on its ``timeout``).

Cancellation: a client cancelled mid-query is released at once; the connection is left
mid-protocol (libpq transaction status ``ACTIVE``, :meth:`PsycopgConnection.status` reports
``"unknown"``). The actor then calls :meth:`PsycopgConnection.cancel` (server-side cancel,
bounded) and :meth:`PsycopgConnection.reset` (drain the pending results, roll back, back to
``"idle"``) from its own task.
"""

from __future__ import annotations

import abc
import asyncio
import math
import os
import random
import re
import select
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar, cast
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
import trio
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg._conninfo_utils import get_param, is_ip_address, split_attempts
from psycopg.abc import PQGen
from psycopg.conninfo import conninfo_to_dict, make_conninfo, timeout_from_conninfo
from psycopg.rows import TupleRow
from psycopg.waiting import Ready, Wait

from actors.driver import (
    ConnectionLost,
    DatabaseError,
    ErrorKind,
    Params,
    Row,
    Status,
    TransactionOptions,
    redact,
)

__all__ = [
    "IoMode",
    "PsycopgConnection",
    "PsycopgCursor",
    "PsycopgDriver",
    "TrioAsyncConnection",
    "from_url",
]

_T = TypeVar("_T")
_RV = TypeVar("_RV")

IoMode = Literal["trio", "thread"]
"""How a connection does its I/O: Trio-native (``"trio"``) or in worker threads (``"thread"``)."""

_IDLE = pq.TransactionStatus.IDLE
_ACTIVE = pq.TransactionStatus.ACTIVE
_INTRANS = pq.TransactionStatus.INTRANS
_INERROR = pq.TransactionStatus.INERROR

_WAIT_R = Wait.R
_WAIT_W = Wait.W
_READY_NONE = Ready.NONE
_READY_R = Ready.R
_READY_W = Ready.W

_POLL_OK = pq.PollingStatus.OK
_POLL_READING = pq.PollingStatus.READING
_POLL_WRITING = pq.PollingStatus.WRITING
_POLL_FAILED = pq.PollingStatus.FAILED

_COPY_IN = pq.ExecStatus.COPY_IN
_COPY_OUT = pq.ExecStatus.COPY_OUT
_COPY_BOTH = pq.ExecStatus.COPY_BOTH
_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR
_TUPLES_OK = pq.ExecStatus.TUPLES_OK

_STATUS: dict[int, Status] = {
    _IDLE: "idle",
    _INTRANS: "transaction",
    _INERROR: "error",
}

_ISOLATION = {
    "read committed": "READ COMMITTED",
    "repeatable read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
    "read uncommitted": "READ UNCOMMITTED",
}
_MODES = {"deferrable": "DEFERRABLE", "not deferrable": "NOT DEFERRABLE"}

# SQLSTATEs that mean "this session is gone" (besides class 08, connection exception).
_LOST_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})
_SERIALIZATION_SQLSTATES = frozenset({"40001", "40P01"})

# Upper bound of one server-side cancel request (the actor bounds it more tightly).
_CANCEL_TIMEOUT = 10.0
# Upper bound of the best-effort cancel close() sends for a query still running.
_CLOSE_CANCEL_TIMEOUT = 1.0
# Marked-for-preparation query texts kept per connection (psycopg bounds the server side).
_MAX_PREPARED_TEXTS = 256
_FALLBACK_APPLICATION_NAME = "trio-connection-supervisor"
_SECRET_KEYS = ("password", "sslpassword")


# --------------------------------------------------------------------------------------------
# Errors


def _kind(sqlstate: str | None) -> ErrorKind:
    if sqlstate is None:
        return "other"
    if sqlstate.startswith("23"):
        return "integrity"
    if sqlstate in _SERIALIZATION_SQLSTATES:
        return "serialization"
    return "other"


def _is_lost_sqlstate(sqlstate: str | None) -> bool:
    return sqlstate is not None and (sqlstate.startswith("08") or sqlstate in _LOST_SQLSTATES)


# Connection failures come from libpq as text only (libpq exposes no SQLSTATE for them): these
# server messages are refusals that retrying cannot fix, reported as DatabaseError.
_CONNECT_REFUSALS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"password authentication failed|no password supplied", re.I), "28P01"),
    (re.compile(r'database ".*" does not exist', re.I), "3D000"),
    (re.compile(r'role ".*" does not exist', re.I), "28000"),
    (re.compile(r"no pg_hba\.conf entry|authentication failed", re.I), "28000"),
    (re.compile(r"permission denied for database", re.I), "42501"),
)


def _connect_failure(exc: BaseException, secrets: Sequence[str]) -> Exception:
    """Turn a failed connect into ConnectionLost (retry later) or DatabaseError (refused)."""
    message = redact(str(exc) or type(exc).__name__, secrets)
    for pattern, sqlstate in _CONNECT_REFUSALS:
        if pattern.search(message):
            return DatabaseError(message, sqlstate=sqlstate, kind="other")
    return ConnectionLost(f"postgresql: cannot connect: {message}")


# --------------------------------------------------------------------------------------------
# Generators on the libpq connection (psycopg's protocol: yield Wait, receive Ready)


def _drain_gen(pgconn: pq.abc.PGconn) -> PQGen[pq.abc.PGresult | None]:
    """Finish whatever the connection was doing: flush, then consume results until idle.

    Used after a client was interrupted mid-call. Returns the first error result seen (or
    None). COPY states are ended (COPY FROM STDIN is aborted, COPY TO STDOUT is read away).
    """
    while pgconn.flush() != 0:
        ready = yield Wait.RW
        if ready & _READY_R:
            pgconn.consume_input()
    first_error: pq.abc.PGresult | None = None
    while True:
        while pgconn.is_busy():
            yield _WAIT_R
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            return first_error
        status = result.status
        if status == _FATAL_ERROR and first_error is None:
            first_error = result
        elif status == _COPY_OUT:
            while True:
                nbytes, _ = pgconn.get_copy_data(1)
                if nbytes == 0:
                    yield _WAIT_R
                    pgconn.consume_input()
                elif nbytes < 0:
                    break
        elif status == _COPY_IN:
            while pgconn.put_copy_end(b"interrupted") == 0:
                yield _WAIT_W
            while pgconn.flush() != 0:
                yield _WAIT_W
        elif status == _COPY_BOTH:
            raise psycopg.OperationalError("cannot recover a connection in COPY BOTH mode")


def _ping_gen(pgconn: pq.abc.PGconn) -> PQGen[None]:
    """An empty query: one round trip, valid in every transaction state."""
    pgconn.send_query(b"")
    error = yield from _drain_gen(pgconn)
    if error is not None:
        raise psycopg.OperationalError(
            f"ping failed: {error.get_error_message()}"  # pragma: no cover - defensive
        )


# --------------------------------------------------------------------------------------------
# Trio waits


def _ready_now(fd: int, wait: int) -> int:
    """Readiness of ``fd`` right now (a zero-timeout poll)."""
    poller = select.poll()
    mask = (select.POLLIN if wait & _WAIT_R else 0) | (select.POLLOUT if wait & _WAIT_W else 0)
    poller.register(fd, mask)
    ready = 0
    for _, events in poller.poll(0):
        if events & select.POLLNVAL:
            raise OSError(9, "bad file descriptor")
        if events & (select.POLLIN | select.POLLERR | select.POLLHUP):
            ready |= _READY_R
        if events & select.POLLOUT:
            ready |= _READY_W
    return ready


async def _wait_either(fd: int) -> int:
    """Wait until ``fd`` is readable or writable (libpq's "RW" wait, rare: a full send buffer).

    Trio has no single call for it, so two child tasks race; errors are re-raised singly (no
    ExceptionGroup escapes).
    """
    ready = 0
    failure: BaseException | None = None

    async def waiter(wait: Callable[[int], Any], flag: int, scope: trio.CancelScope) -> None:
        nonlocal ready, failure
        try:
            await wait(fd)
        except (trio.ClosedResourceError, OSError) as exc:
            failure = exc
        else:
            ready |= flag
        scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, trio.lowlevel.wait_readable, _READY_R, nursery.cancel_scope)
            nursery.start_soon(waiter, trio.lowlevel.wait_writable, _READY_W, nursery.cancel_scope)
    except BaseExceptionGroup as group:
        # Only Cancelled can get here (the waiters catch everything else): re-raise one.
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from None
    if failure is not None:
        raise failure
    return ready


async def _drive(gen: PQGen[_RV], fd: int) -> _RV:
    """Run a psycopg protocol generator to completion, waiting on ``fd`` the Trio way.

    A close of the connection by another task (:func:`trio.lowlevel.notify_closing`) or a
    socket error becomes :class:`psycopg.OperationalError` (no SQLSTATE: connection lost).
    Cancellation propagates at once, leaving the generator (and the connection) mid-protocol.
    """
    try:
        wait = next(gen)
        while True:
            ready: int
            if wait == _WAIT_R:
                await trio.lowlevel.wait_readable(fd)
                ready = _READY_R
            elif wait == _WAIT_W:
                await trio.lowlevel.wait_writable(fd)
                ready = _READY_W
            elif wait & (_WAIT_R | _WAIT_W):
                ready = _ready_now(fd, wait) or await _wait_either(fd)
            else:
                raise psycopg.InternalError(f"bad poll status: {wait}")
            wait = gen.send(ready)
    except StopIteration as stop:
        result: _RV = stop.value
        return result
    except trio.ClosedResourceError as exc:
        raise psycopg.OperationalError("the connection was closed by another task") from exc
    except OSError as exc:
        raise psycopg.OperationalError(f"connection socket error: {exc}") from exc


class _ExclusiveLock(asyncio.Lock):
    """Stands in for psycopg's ``AsyncConnection.lock`` (an :class:`asyncio.Lock`).

    psycopg takes that lock around every operation. A pooled connection is used by one task at a
    time (the pool guarantees it), so the lock is never contended; an uncontended asyncio.Lock
    would work, but a contended one needs a running asyncio loop and fails obscurely under
    Trio. This lock never awaits and never touches asyncio: acquiring it while it is held raises
    :class:`RuntimeError` naming the misuse, instead of hanging or interleaving protocol
    messages.
    """

    def __init__(self) -> None:
        super().__init__()
        self._held = False

    async def acquire(self) -> Literal[True]:
        """Take the lock without waiting; raise RuntimeError if another operation holds it."""
        if self._held:
            raise RuntimeError(
                "psycopg connection used by two operations at once (one task at a time only)"
            )
        self._held = True
        return True

    def release(self) -> None:
        """Give the lock back."""
        if not self._held:
            raise RuntimeError("lock is not acquired")
        self._held = False

    def locked(self) -> bool:
        """Whether an operation holds the lock."""
        return self._held


class TrioAsyncConnection(psycopg.AsyncConnection[TupleRow]):
    """psycopg's AsyncConnection with its I/O driven by Trio instead of asyncio.

    Every query, transaction command, server cursor and notification of AsyncConnection goes
    through :meth:`wait`; this class drives those generators with Trio's fd waits. Build it with
    :func:`_trio_connect` (psycopg's own ``connect()`` uses asyncio); do not call psycopg's
    ``cancel_safe()`` on it (asyncio too): use :class:`PsycopgConnection.cancel`.
    """

    def __init__(self, pgconn: pq.abc.PGconn) -> None:
        super().__init__(pgconn)
        self.lock = _ExclusiveLock()

    async def wait(
        self,
        gen: PQGen[_RV],
        interval: float = 0.1,
        timeout: float | None = None,
    ) -> _RV:
        """Consume a protocol generator with Trio waits on the connection socket.

        ``interval`` is ignored (Trio cancellation needs no periodic wake-up); ``timeout``
        raises psycopg's ``_WaitTimeout`` like the original (used by ``notifies()``).
        """
        fd = self.pgconn.socket
        if timeout is None:
            return await _drive(gen, fd)
        with trio.move_on_after(timeout):
            return await _drive(gen, fd)
        raise pg_errors._WaitTimeout("wait timeout expired")


async def _connect_pgconn(conninfo: str) -> pq.abc.PGconn:
    """libpq's non-blocking connect (``PQconnectStart``/``PQconnectPoll``) with Trio waits."""
    pgconn = pq.PGconn.connect_start(conninfo.encode())
    try:
        while True:
            if pgconn.status == pq.ConnStatus.BAD:
                raise psycopg.OperationalError(f"connection is bad: {pgconn.get_error_message()}")
            status = pgconn.connect_poll()
            if status == _POLL_OK:
                break
            if status == _POLL_READING:
                await trio.lowlevel.wait_readable(pgconn.socket)
            elif status == _POLL_WRITING:
                await trio.lowlevel.wait_writable(pgconn.socket)
            elif status == _POLL_FAILED:
                raise psycopg.OperationalError(f"connection failed: {pgconn.get_error_message()}")
            else:  # pragma: no cover - libpq contract
                raise psycopg.InternalError(f"unexpected poll status: {status}")
        pgconn.nonblocking = 1
    except BaseException:
        _finish_pgconn(pgconn)
        raise
    return pgconn


def _finish_pgconn(pgconn: pq.abc.PGconn) -> None:
    """Close a libpq connection, waking any Trio task waiting on its socket first."""
    try:
        fd = pgconn.socket
    except psycopg.Error:
        fd = -1
    if fd >= 0:
        try:
            trio.lowlevel.notify_closing(fd)
        except RuntimeError:  # pragma: no cover - outside Trio (thread mode)
            pass
    pgconn.finish()


async def _resolve(params: dict[str, Any]) -> list[dict[str, Any]]:
    """One attempt per address of the host, resolved with Trio (psycopg uses asyncio)."""
    host = get_param(params, "host")
    if not host or host.startswith(("/", "@")) or host[1:2] == ":":
        return [params]  # unix socket (or libpq's default), nothing to resolve
    if get_param(params, "hostaddr"):
        return [params]
    if is_ip_address(host):
        return [{**params, "hostaddr": host}]
    port = get_param(params, "port") or "5432"
    infos = await trio.socket.getaddrinfo(
        host, port, proto=socket.IPPROTO_TCP, type=socket.SOCK_STREAM
    )
    return [{**params, "hostaddr": str(info[4][0])} for info in infos]


async def _connection_attempts(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Split multi-host connection strings and resolve names (psycopg's rules, Trio's DNS)."""
    attempts: list[dict[str, Any]] = []
    last: Exception | None = None
    prefer_standby = get_param(params, "target_session_attrs") == "prefer-standby"
    if prefer_standby:
        params = {k: v for k, v in params.items() if k != "target_session_attrs"}
    for attempt in split_attempts(params):
        try:
            attempts.extend(await _resolve(attempt))
        except OSError as exc:
            last = psycopg.OperationalError(
                f"failed to resolve host {attempt.get('host')!r}: {exc}"
            )
    if not attempts:
        assert last is not None
        raise last
    if get_param(params, "load_balance_hosts") == "random":
        random.shuffle(attempts)
    if prefer_standby:
        attempts = [{**a, "target_session_attrs": "standby"} for a in attempts] + attempts
    return attempts


async def _trio_connect(
    params: dict[str, Any], timeout: float | None, prepare_threshold: int | None
) -> TrioAsyncConnection:
    """Open a :class:`TrioAsyncConnection` (autocommit) without asyncio or blocking calls."""
    attempts = await _connection_attempts(params)
    if timeout is None:
        timeout = timeout_from_conninfo(params)
    failures: list[tuple[str, str]] = []
    pgconn: pq.abc.PGconn | None = None
    for attempt in attempts:
        where = f"host {attempt.get('host')!r}, port {attempt.get('port')!r}"
        with trio.move_on_after(timeout) as scope:
            try:
                pgconn = await _connect_pgconn(make_conninfo("", **attempt))
            except psycopg.Error as exc:
                failures.append((str(exc), where))
                continue
        if scope.cancelled_caught:
            failures.append(("connection timeout expired", where))
            continue
        break
    if pgconn is None:
        if len(failures) == 1:
            raise psycopg.OperationalError(failures[0][0])
        lines = [failures[-1][0], "Multiple connection attempts failed. All failures were:"]
        lines += [f"- {where}: {message}" for message, where in failures]
        raise psycopg.OperationalError("\n".join(lines))
    try:
        conn = TrioAsyncConnection(pgconn)
        await conn.set_autocommit(True)
        conn.prepare_threshold = prepare_threshold
    except BaseException:
        _finish_pgconn(pgconn)
        raise
    return conn


async def _trio_cancel(pgconn: pq.abc.PGconn, timeout: float) -> None:
    """Send a server-side cancel for ``pgconn``, bounded by ``timeout``.

    libpq >= 17: its non-blocking cancel connection, polled with Trio waits. Older libpq: the
    blocking ``PQcancel`` in a worker thread (abandoned on timeout).
    """
    with trio.move_on_after(timeout):
        if psycopg.capabilities.has_cancel_safe():
            await _cancel_with(pgconn.cancel_conn())
        else:  # pragma: no cover - libpq < 17
            await trio.to_thread.run_sync(pgconn.get_cancel().cancel, abandon_on_cancel=True)


async def _cancel_with(cancel_conn: pq.abc.PGcancelConn) -> None:
    """Drive one libpq cancel connection to completion (``PQcancelStart``/``PQcancelPoll``)."""
    try:
        cancel_conn.start()
        while True:
            status = cancel_conn.poll()
            if status == _POLL_OK:
                return
            if status == _POLL_READING:
                await trio.lowlevel.wait_readable(cancel_conn.socket)
            elif status == _POLL_WRITING:
                await trio.lowlevel.wait_writable(cancel_conn.socket)
            else:
                raise psycopg.OperationalError(
                    f"cancellation failed: {cancel_conn.get_error_message()}"
                )
    finally:
        try:
            fd = cancel_conn.socket
        except psycopg.Error:  # pragma: no cover - no socket yet
            fd = -1
        if fd >= 0:
            trio.lowlevel.notify_closing(fd)
        cancel_conn.finish()


# --------------------------------------------------------------------------------------------
# Backends: the same primitive operations, in the calling task (trio) or in a thread

_Result = tuple[int, list[Row] | None, str | None]


class _Backend(abc.ABC):
    """The handful of primitive operations :class:`PsycopgConnection` is built on."""

    pgconn: pq.abc.PGconn

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """The connection is closed (by us, or found dead)."""

    @abc.abstractmethod
    async def run(
        self, query: str, params: Params, prepare: bool | None, want_rows: bool
    ) -> _Result:
        """Run one statement; return (rowcount, rows or None, status message)."""

    @abc.abstractmethod
    async def rollback(self) -> None:
        """Roll back the open transaction (psycopg's own, protocol-aware rollback)."""

    @abc.abstractmethod
    async def drain(self) -> None:
        """Consume every pending result of an interrupted call, until libpq is idle."""

    @property
    def busy(self) -> bool:
        """An operation is in progress outside the caller's task (thread mode only)."""
        return False

    async def settle(self) -> None:  # noqa: B027 - a no-op by default, on purpose
        """Wait until no operation of a cancelled caller is still running (thread mode; the
        Trio backend never has one, so by default there is nothing to wait for)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """One cheap round trip; raise if the connection is dead."""

    @abc.abstractmethod
    async def cancel(self, timeout: float) -> None:
        """Send the server-side cancel for the statement in flight, bounded by timeout."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection; safe while a call is in flight in another task."""


def _has_rows(result: pq.abc.PGresult | None) -> bool:
    return result is not None and result.status == _TUPLES_OK


def _sync_run(
    conn: psycopg.Connection[TupleRow],
    query: str,
    params: Params,
    prepare: bool | None,
    want_rows: bool,
) -> _Result:
    cur = conn.cursor()
    cur.execute(query, params, prepare=prepare)
    rows = cur.fetchall() if want_rows and _has_rows(cur.pgresult) else None
    return cur.rowcount, rows, cur.statusmessage


_REUSE_CURSOR_MAX_ROWS = 100


class _TrioBackend(_Backend):
    def __init__(self, conn: TrioAsyncConnection) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn
        self._closed = False
        # One cursor reused for every call (making one per call cost 9-15% of a `select 1`);
        # forgotten after any failure or reset, so an interrupted cursor is never reused.
        self._cursor: psycopg.AsyncCursor[TupleRow] | None = None

    @property
    def closed(self) -> bool:
        return self._closed or self.conn.closed

    async def run(
        self, query: str, params: Params, prepare: bool | None, want_rows: bool
    ) -> _Result:
        cur, self._cursor = self._cursor or self.conn.cursor(), None
        await cur.execute(query, params, prepare=prepare)
        rows = await cur.fetchall() if want_rows and _has_rows(cur.pgresult) else None
        result = cur.rowcount, rows, cur.statusmessage
        if rows is None or len(rows) <= _REUSE_CURSOR_MAX_ROWS:
            # Only a completed call gives its cursor back, and only after a small result: the
            # cursor keeps its last PGresult alive, which must not pin a large one in memory.
            self._cursor = cur
        return result

    async def rollback(self) -> None:
        self._cursor = None
        await self.conn.rollback()

    async def drain(self) -> None:
        self._cursor = None
        async with self.conn.lock:
            await self.conn.wait(_drain_gen(self.pgconn))

    async def ping(self) -> None:
        async with self.conn.lock:
            await self.conn.wait(_ping_gen(self.pgconn))

    async def cancel(self, timeout: float) -> None:
        await _trio_cancel(self.pgconn, timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pgconn = self.pgconn
        running = pgconn.transaction_status == _ACTIVE
        cancel_conn: pq.abc.PGcancelConn | None = None
        if running and psycopg.capabilities.has_cancel_safe():
            try:
                cancel_conn = pgconn.cancel_conn()  # made before finish(): it needs the conn
            except psycopg.Error:  # pragma: no cover - defensive
                cancel_conn = None
        # Mark closed, wake waiters, close: with no checkpoint in between.
        try:
            fd = pgconn.socket
        except psycopg.Error:
            fd = -1
        if fd >= 0:
            trio.lowlevel.notify_closing(fd)
        await self.conn.close()  # sets psycopg's closed flag and finishes the PGconn...
        pgconn.finish()  # ...except when libpq already saw it die (close() skips it): free it now
        if cancel_conn is not None:
            # Best effort: stop the orphaned statement so its backend does not run on.
            with trio.move_on_after(_CLOSE_CANCEL_TIMEOUT):
                try:
                    await _cancel_with(cancel_conn)
                except psycopg.Error:
                    pass


class _ThreadBackend(_Backend):
    """A synchronous psycopg connection driven from worker threads.

    One operation at a time runs on the connection (``_op_lock``, taken in the worker thread).
    A caller cancelled while its thread runs is released at once (``abandon_on_cancel``); the
    thread finishes the psycopg call on its own (after :meth:`cancel`, quickly), and the next
    operation (the actor's reset, which starts with :meth:`settle`) waits for it on
    ``_op_lock``. A call whose caller was cancelled before its thread started it never runs.
    :meth:`close` while a thread is inside libpq shuts the socket down, which makes that call
    fail promptly, and leaves the actual ``PQfinish`` to that thread (libpq objects must not be
    freed under a running call).
    """

    def __init__(self, conn: psycopg.Connection[TupleRow]) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn
        self._pgcancel = conn.pgconn.get_cancel()  # PQcancel is the thread-safe cancel
        self._op_lock = threading.Lock()
        self._state = threading.Lock()
        self._busy = False
        self._closed = False
        # Own limiter: abandoned threads must not eat Trio's global thread budget.
        self._limiter = trio.CapacityLimiter(8)

    @property
    def closed(self) -> bool:
        return self._closed or self.pgconn.status == pq.ConnStatus.BAD

    async def _call(self, fn: Callable[[psycopg.Connection[TupleRow]], _T]) -> _T:
        # ``op[0]`` is the op's state: "pending" until a worker starts it under the op lock,
        # "started", or "abandoned" (its caller went away before it started: it never runs,
        # so nothing reaches the server behind the back of the next operation, e.g. reset()).
        op = ["pending"]

        def work() -> _T:
            with self._op_lock:
                with self._state:
                    if op[0] == "abandoned":
                        raise psycopg.OperationalError("operation abandoned before it started")
                    if self._closed:
                        raise psycopg.OperationalError("the connection is closed")
                    op[0] = "started"
                    self._busy = True
                try:
                    return fn(self.conn)
                finally:
                    with self._state:
                        self._busy = False
                        if self._closed:
                            self._finish()

        try:
            return await trio.to_thread.run_sync(
                work, abandon_on_cancel=True, limiter=self._limiter
            )
        except BaseException:
            with self._state:
                if op[0] == "pending":
                    op[0] = "abandoned"
            raise

    @property
    def busy(self) -> bool:
        """A worker thread is inside a psycopg call (maybe one whose caller was cancelled)."""
        return self._busy

    async def settle(self) -> None:
        # Wait for an operation a cancelled caller left running in its thread.
        await self._call(lambda conn: None)

    async def run(
        self, query: str, params: Params, prepare: bool | None, want_rows: bool
    ) -> _Result:
        def op(conn: psycopg.Connection[TupleRow]) -> _Result:
            return _sync_run(conn, query, params, prepare, want_rows)

        return await self._call(op)

    async def rollback(self) -> None:
        await self._call(lambda conn: conn.rollback())

    async def drain(self) -> None:
        await self._call(lambda conn: conn.wait(_drain_gen(conn.pgconn)))

    async def ping(self) -> None:
        await self._call(lambda conn: conn.wait(_ping_gen(conn.pgconn)))

    async def cancel(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await trio.to_thread.run_sync(
                self._pgcancel.cancel, abandon_on_cancel=True, limiter=self._limiter
            )

    async def close(self) -> None:
        with self._state:
            if self._closed:
                return
            self._closed = True
            busy = self._busy
            if busy:
                self._shutdown_socket()  # the thread inside libpq fails and finishes the conn
            else:
                self._finish()
        if busy:
            with trio.move_on_after(_CLOSE_CANCEL_TIMEOUT):
                try:
                    await trio.to_thread.run_sync(
                        self._pgcancel.cancel, abandon_on_cancel=True, limiter=self._limiter
                    )
                except psycopg.Error:
                    pass

    def _finish(self) -> None:
        self.conn.close()  # psycopg skips PQfinish when libpq already saw the connection die
        self.pgconn.finish()

    def _shutdown_socket(self) -> None:
        try:
            fd = self.pgconn.socket
            sock = socket.socket(fileno=os.dup(fd))
        except (psycopg.Error, OSError):  # pragma: no cover - already gone
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # pragma: no cover - already disconnected
            pass
        finally:
            sock.close()


async def _thread_connect(
    params: dict[str, Any], timeout: float | None, prepare_threshold: int | None
) -> _ThreadBackend:
    params = dict(params)
    if timeout is not None and "connect_timeout" not in params:
        params["connect_timeout"] = str(max(2, math.ceil(timeout)))
    conninfo = make_conninfo("", **params)
    state = threading.Lock()
    outcome: dict[str, Any] = {"abandoned": False, "conn": None}

    def work() -> psycopg.Connection[TupleRow] | None:
        conn = psycopg.Connection.connect(
            conninfo, autocommit=True, prepare_threshold=prepare_threshold
        )
        with state:
            if outcome["abandoned"]:
                conn.close()
                return None
            outcome["conn"] = conn
        return conn

    try:
        conn = await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    except BaseException:
        with state:
            outcome["abandoned"] = True
            late = cast("psycopg.Connection[TupleRow] | None", outcome["conn"])
        if late is not None:
            late.close()
        raise
    assert conn is not None
    return _ThreadBackend(conn)


# --------------------------------------------------------------------------------------------
# The Connection


class _Exclusive:
    """Context manager refusing a second task on a connection (cheaper than @contextmanager,
    which matters on the per-query path)."""

    __slots__ = ("_conn", "_outer")

    def __init__(self, conn: PsycopgConnection) -> None:
        self._conn = conn
        self._outer = False

    def __enter__(self) -> None:
        task = trio.lowlevel.current_task()
        owner = self._conn._owner
        if owner is None:
            self._conn._owner = task
            self._outer = True
        elif owner is not task:
            raise RuntimeError(
                "PsycopgConnection used by two tasks at once; a connection serves one task"
            )

    def __exit__(self, *exc_info: object) -> None:
        if self._outer:
            self._conn._owner = None


def _quote_ident(name: str) -> str:
    if not name or "\x00" in name:
        raise ValueError(f"invalid identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


class PsycopgConnection:
    """One PostgreSQL connection, implementing :class:`actors.driver.Connection`.

    Made by :meth:`PsycopgDriver.connect`. Autocommit at the libpq level: transactions are the
    explicit ``begin``/``commit``/``rollback`` calls. Placeholders are psycopg's (``%s``,
    ``%(name)s``); parameters are always sent separately from the SQL text.
    """

    def __init__(self, backend: _Backend, secrets: Sequence[str], io: IoMode) -> None:
        self._b = backend
        self._secrets = list(secrets)
        self.io: IoMode = io
        """The I/O mode this connection runs in (``"trio"`` or ``"thread"``)."""
        self._prepared: OrderedDict[str, None] = OrderedDict()
        self._cursors: dict[int, PsycopgCursor] = {}
        self._owner: trio.lowlevel.Task | None = None

    def __repr__(self) -> str:
        state = "closed" if self._b.closed else self.status()
        return f"<PsycopgConnection io={self.io} pid={self.backend_pid} {state}>"

    # -- introspection (no I/O)

    @property
    def backend_pid(self) -> int:
        """The server process id of this session (for pg_stat_activity); 0 once closed."""
        try:
            return int(self._b.pgconn.backend_pid)
        except psycopg.Error:  # pragma: no cover - finished connection
            return 0

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran or the session was found dead."""
        return self._b.closed

    def status(self) -> Status:
        """libpq's transaction status: idle / transaction / error, else "unknown".

        "unknown" covers ACTIVE (a statement in flight, e.g. after an interrupted call) and
        UNKNOWN (a closed or broken connection).
        """
        if self._b.closed:
            return "unknown"
        return _STATUS.get(self._b.pgconn.transaction_status, "unknown")

    # -- guard and error translation

    def _exclusive(self) -> _Exclusive:
        """Guard of every client call: one task at a time (re-entrant within that task)."""
        return _Exclusive(self)

    def _message(self, exc: BaseException) -> str:
        return redact(str(exc).strip() or type(exc).__name__, self._secrets)

    def _lost(self, exc: BaseException) -> ConnectionLost:
        return ConnectionLost(f"postgresql connection lost: {self._message(exc)}")

    async def _failure(self, exc: psycopg.Error) -> Exception:
        """Classify a psycopg error; bring the connection back to a usable state if needed."""
        sqlstate = exc.sqlstate
        if self._b.closed:
            return ConnectionLost(
                f"postgresql connection closed during the call ({self._message(exc)})"
            )
        if self._b.pgconn.status == pq.ConnStatus.BAD:
            return self._lost(exc)
        if _is_lost_sqlstate(sqlstate):
            return self._lost(exc)
        if sqlstate is None and isinstance(exc, psycopg.OperationalError):
            return self._lost(exc)
        if self._b.pgconn.transaction_status == _ACTIVE:
            # The statement left the protocol mid-way (e.g. a COPY run through execute()).
            try:
                await self._b.drain()
            except psycopg.Error as again:
                return self._lost(again)
        return DatabaseError(self._message(exc), sqlstate=sqlstate, kind=_kind(sqlstate))

    async def _run(
        self, query: str, params: Params, *, prepare: bool | None, want_rows: bool
    ) -> _Result:
        if self._b.closed:
            raise ConnectionLost("postgresql connection is closed")
        try:
            return await self._b.run(query, params, prepare, want_rows)
        except psycopg.Error as exc:
            raise await self._failure(exc) from exc

    def _prepare_flag(self, query: str) -> bool | None:
        if query in self._prepared:
            self._prepared.move_to_end(query)
            return True
        return None

    # -- queries

    async def ping(self) -> None:
        """An empty query (one round trip, valid in any transaction state)."""
        with self._exclusive():
            if self._b.closed:
                raise ConnectionLost("postgresql connection is closed")
            try:
                await self._b.ping()
            except psycopg.Error as exc:
                raise self._lost(exc) from exc

    async def execute(self, query: str, params: Params = None) -> int:
        """Run a statement; return the rows affected (-1 when the server does not say)."""
        with self._exclusive():
            rowcount, _, _ = await self._run(
                query, params, prepare=self._prepare_flag(query), want_rows=False
            )
            return rowcount

    async def fetch(self, query: str, params: Params = None) -> list[Row]:
        """Run a query and return all its rows as tuples ([] for a statement without rows)."""
        with self._exclusive():
            _, rows, _ = await self._run(
                query, params, prepare=self._prepare_flag(query), want_rows=True
            )
            return rows if rows is not None else []

    async def prepare(self, query: str) -> None:
        """Mark ``query`` so its executions use a named server-side prepared statement.

        No round trip: psycopg prepares it on the next execution (``prepare=True``) and reuses
        it after. psycopg keys statements by text and parameter types and bounds them per
        connection (``prepared_max``, 100). With ``prepare_threshold=None`` (PgBouncer in
        transaction mode) nothing is ever prepared and this is a no-op.
        """
        await trio.lowlevel.checkpoint()
        self._prepared[query] = None
        self._prepared.move_to_end(query)
        while len(self._prepared) > _MAX_PREPARED_TEXTS:
            self._prepared.popitem(last=False)

    async def open_cursor(self, query: str, params: Params, batch_size: int) -> PsycopgCursor:
        """Stream a query through a server-side cursor (``DECLARE`` / ``FETCH FORWARD n``).

        Memory stays bounded by ``batch_size`` rows. Outside a transaction a (non-holdable)
        cursor needs one, so the cursor opens its own ``BEGIN`` and its :meth:`close` (also
        run when the last batch is read) ends it: ``COMMIT`` (the query runs with autocommit
        semantics), or ``ROLLBACK`` if that transaction failed. ``WITH HOLD`` is not used: it
        would materialise the whole result at commit. Inside a transaction, the cursor lives in
        it and ``close`` sends ``CLOSE``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        with self._exclusive():
            own_tx = self.status() == "idle"
            if own_tx:
                await self._run("BEGIN", None, prepare=False, want_rows=False)
            slot = 0
            while slot in self._cursors:
                slot += 1
            name = _quote_ident(f"_tcs_cursor_{slot}")
            body = query.rstrip().rstrip(";")
            try:
                await self._run(
                    f"DECLARE {name} NO SCROLL CURSOR FOR {body}",
                    params,
                    prepare=False,
                    want_rows=False,
                )
            except DatabaseError:
                if own_tx:
                    await self._run("ROLLBACK", None, prepare=False, want_rows=False)
                raise
            cursor = PsycopgCursor(self, slot, name, batch_size, own_tx)
            self._cursors[slot] = cursor
            return cursor

    # -- transactions

    async def begin(self, options: TransactionOptions) -> None:
        """``BEGIN [ISOLATION LEVEL ...] [READ ONLY] [[NOT] DEFERRABLE]``.

        ``options.isolation`` is one of "read committed", "repeatable read", "serializable",
        "read uncommitted" (case-insensitive); ``options.mode`` may be "deferrable" or
        "not deferrable". Anything else raises ValueError before any I/O. A BEGIN while a
        transaction is open raises DatabaseError (SQLSTATE 25001) instead of PostgreSQL's
        warning.
        """
        parts = ["BEGIN"]
        if options.isolation is not None:
            key = " ".join(options.isolation.replace("_", " ").lower().split())
            level = _ISOLATION.get(key)
            if level is None:
                raise ValueError(
                    f"unknown isolation level {options.isolation!r}; use one of "
                    + ", ".join(repr(k) for k in _ISOLATION)
                )
            parts.append(f"ISOLATION LEVEL {level}")
        if options.read_only:
            parts.append("READ ONLY")
        if options.mode is not None:
            mode = _MODES.get(" ".join(options.mode.lower().split()))
            if mode is None:
                raise ValueError(
                    f"unknown transaction mode {options.mode!r} for PostgreSQL; use "
                    "'deferrable' or 'not deferrable'"
                )
            parts.append(mode)
        with self._exclusive():
            if self.status() in ("transaction", "error"):
                raise DatabaseError("a transaction is already in progress", sqlstate="25001")
            await self._run(" ".join(parts), None, prepare=False, want_rows=False)

    async def commit(self) -> None:
        """``COMMIT``. A failed transaction is rolled back and reported (SQLSTATE 25P02)."""
        with self._exclusive():
            if self.status() == "idle":
                return
            failed = self.status() == "error"
            _, _, tag = await self._run("COMMIT", None, prepare=False, want_rows=False)
            if failed or tag == "ROLLBACK":
                raise DatabaseError(
                    "COMMIT of a failed transaction: it was rolled back", sqlstate="25P02"
                )

    async def rollback(self) -> None:
        """``ROLLBACK`` (psycopg's, which also resets its prepared-statement cache)."""
        with self._exclusive():
            if self._b.closed:
                raise ConnectionLost("postgresql connection is closed")
            try:
                await self._b.rollback()
            except psycopg.Error as exc:
                raise await self._failure(exc) from exc

    async def savepoint(self, name: str) -> None:
        """``SAVEPOINT "name"``."""
        with self._exclusive():
            await self._run(f"SAVEPOINT {_quote_ident(name)}", None, prepare=False, want_rows=False)

    async def release(self, name: str) -> None:
        """``RELEASE SAVEPOINT "name"``."""
        with self._exclusive():
            await self._run(
                f"RELEASE SAVEPOINT {_quote_ident(name)}", None, prepare=False, want_rows=False
            )

    async def rollback_to(self, name: str) -> None:
        """``ROLLBACK TO SAVEPOINT "name"`` (the savepoint stays)."""
        with self._exclusive():
            await self._run(
                f"ROLLBACK TO SAVEPOINT {_quote_ident(name)}", None, prepare=False, want_rows=False
            )

    # -- recovery

    async def cancel(self) -> None:
        """Ask the server to cancel the statement in flight (out of band, bounded).

        Does nothing when no statement is in flight (libpq status not ACTIVE) or the connection
        is closed. Never raises for a failed cancel request: :meth:`reset` finds out.
        """
        if self._b.closed or not (self._b.busy or self._b.pgconn.transaction_status == _ACTIVE):
            return
        try:
            await self._b.cancel(_CANCEL_TIMEOUT)
        except psycopg.Error:
            pass

    async def reset(self) -> None:
        """Drain an interrupted call, forget cursors, roll back; leave the status "idle".

        Raises ConnectionLost when that cannot be done (the actor then replaces it).
        """
        with self._exclusive():
            if self._b.closed:
                raise ConnectionLost("postgresql connection is closed")
            try:
                await self._b.settle()
                if self._b.pgconn.transaction_status == _ACTIVE:
                    await self._b.drain()
                for cursor in list(self._cursors.values()):
                    cursor._forget()
                if self._b.pgconn.transaction_status in (_INTRANS, _INERROR):
                    await self._b.rollback()
            except (psycopg.Error, RuntimeError) as exc:
                raise self._lost(exc) from exc
            if self.status() != "idle":
                raise ConnectionLost(f"postgresql connection not idle after reset: {self.status()}")

    async def close(self) -> None:
        """Close the connection. Idempotent, never raises.

        Safe from another task while a call is in flight: that call fails promptly with
        ConnectionLost (Trio waiters are woken with ``notify_closing``; in thread mode the
        socket is shut down). A statement still running on the server gets a best-effort
        cancel (at most about a second) so its backend does not run on.
        """
        for cursor in list(self._cursors.values()):
            cursor._forget()
        try:
            await self._b.close()
        except Exception:  # pragma: no cover - never raise from close
            pass


class PsycopgCursor:
    """A server-side cursor from :meth:`PsycopgConnection.open_cursor` (``actors.driver.Cursor``).

    Each :meth:`fetch_batch` is one ``FETCH FORWARD batch_size``. Reading the last batch
    closes the cursor (and ends the transaction it opened, if any).
    """

    def __init__(
        self, conn: PsycopgConnection, slot: int, name: str, batch_size: int, own_tx: bool
    ) -> None:
        self._conn = conn
        self._slot = slot
        self._name = name
        self._batch_size = batch_size
        self._own_tx = own_tx
        self._closed = False
        self._exhausted = False

    def _forget(self) -> None:
        """The connection was reset or closed under this cursor: it no longer exists."""
        self._closed = True
        self._conn._cursors.pop(self._slot, None)

    async def fetch_batch(self) -> list[Row]:
        """The next ``batch_size`` rows at most; [] once the result is exhausted."""
        if self._exhausted:
            return []
        if self._closed:
            raise DatabaseError("the cursor is closed", sqlstate="34000")
        with self._conn._exclusive():
            _, rows, _ = await self._conn._run(
                f"FETCH FORWARD {self._batch_size} FROM {self._name}",
                None,
                prepare=False,
                want_rows=True,
            )
        batch = rows if rows is not None else []
        if len(batch) < self._batch_size:
            self._exhausted = True
            await self.close()
        return batch

    async def close(self) -> None:
        """Close the cursor; end the transaction it opened (COMMIT, or ROLLBACK if failed)."""
        if self._closed:
            return
        self._forget()
        conn = self._conn
        status = conn.status()
        with conn._exclusive():
            if self._own_tx:
                if status == "transaction":
                    await conn._run("COMMIT", None, prepare=False, want_rows=False)
                elif status == "error":
                    await conn._run("ROLLBACK", None, prepare=False, want_rows=False)
            elif status == "transaction":
                await conn._run(f"CLOSE {self._name}", None, prepare=False, want_rows=False)


# --------------------------------------------------------------------------------------------
# The Driver


def _guess_secrets(conninfo: str) -> list[str]:
    """Passwords in a connection string that failed to parse (to scrub the parse error)."""
    found: list[str] = []
    if "://" in conninfo:
        try:
            password = urlsplit(conninfo).password
        except ValueError:
            password = None
        if password:
            found.append(password)
    for match in re.finditer(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", conninfo):
        value = match.group(1)
        found.append(value)
        found.append(value.strip("'"))
    return found


class PsycopgDriver:
    """The PostgreSQL driver: a factory of :class:`PsycopgConnection` (``actors.driver.Driver``).

    ``conninfo`` is a libpq connection string or URL; ``kwargs`` are libpq parameters that
    override it (``host=``, ``password=``...). ``io`` picks Trio-native I/O or the thread
    fallback (see the module documentation); ``prepare_threshold`` is psycopg's automatic
    preparation threshold (``None`` disables prepared statements, for PgBouncer in transaction
    mode); ``connect_timeout`` bounds each connection attempt in seconds (default: libpq's
    ``connect_timeout`` parameter, else psycopg's 130 s; the pool bounds connects too).
    The repr never shows the password.
    """

    name = "postgresql"

    def __init__(
        self,
        conninfo: str = "",
        *,
        io: IoMode = "trio",
        prepare_threshold: int | None = 5,
        connect_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        if io not in ("trio", "thread"):
            raise ValueError(f"io must be 'trio' or 'thread', got {io!r}")
        if prepare_threshold is not None and (
            isinstance(prepare_threshold, bool)
            or not isinstance(prepare_threshold, int)
            or prepare_threshold < 0
        ):
            raise ValueError(
                f"prepare_threshold must be None or an int >= 0, got {prepare_threshold!r}"
            )
        if connect_timeout is not None and not (
            isinstance(connect_timeout, int | float)
            and not isinstance(connect_timeout, bool)
            and connect_timeout > 0
        ):
            raise ValueError(f"connect_timeout must be > 0 or None, got {connect_timeout!r}")
        try:
            options = conninfo_to_dict(conninfo, **kwargs)
        except psycopg.Error as exc:
            secrets = _guess_secrets(conninfo) + [
                str(kwargs[k]) for k in _SECRET_KEYS if kwargs.get(k)
            ]
            raise ValueError(
                f"invalid PostgreSQL connection string: {redact(str(exc), secrets)}"
            ) from None
        self._options: dict[str, Any] = dict(options)
        self.io: IoMode = io
        """``"trio"`` (native) or ``"thread"`` (fallback)."""
        self.prepare_threshold = prepare_threshold
        """psycopg's auto-prepare threshold for new connections (None: never prepare)."""
        self.connect_timeout = connect_timeout
        """Bound of each connection attempt in seconds (None: from the connection string)."""

    @property
    def options(self) -> dict[str, Any]:
        """The libpq connection parameters (a fresh copy; may contain the password)."""
        return dict(self._options)

    def secrets(self, options: Mapping[str, Any]) -> list[str]:
        """The password(s) in ``options`` (and ``PGPASSWORD``), to scrub from messages."""
        found = [str(options[key]) for key in _SECRET_KEYS if options.get(key)]
        env = os.environ.get("PGPASSWORD")
        if env and "password" not in options:
            found.append(env)
        return found

    def __repr__(self) -> str:
        shown = " ".join(
            f"{key}={'***' if key in _SECRET_KEYS else value}"
            for key, value in self._options.items()
        )
        return (
            f"PsycopgDriver({shown!r}, io={self.io!r}, "
            f"prepare_threshold={self.prepare_threshold!r})"
        )

    async def connect(self, options: Mapping[str, Any]) -> PsycopgConnection:
        """Open a connection with ``options`` (libpq parameters, e.g. ``self.options``).

        Raises ConnectionLost when the server cannot be reached (or is starting up, shutting
        down, out of connection slots) and DatabaseError with SQLSTATE 28P01 / 28000 / 3D000
        when it refuses (bad password, unknown role, unknown database). Messages never contain
        the password.
        """
        params = {k: v for k, v in options.items() if v is not None}
        if "application_name" not in params and "fallback_application_name" not in params:
            params["fallback_application_name"] = _FALLBACK_APPLICATION_NAME
        secrets = self.secrets(options)
        try:
            backend: _Backend
            if self.io == "trio":
                conn = await _trio_connect(params, self.connect_timeout, self.prepare_threshold)
                backend = _TrioBackend(conn)
            else:
                backend = await _thread_connect(
                    params, self.connect_timeout, self.prepare_threshold
                )
        except psycopg.Error as exc:
            raise _connect_failure(exc, secrets) from None
        except OSError as exc:
            raise _connect_failure(exc, secrets) from None
        return PsycopgConnection(backend, secrets, self.io)


_DRIVER_QUERY_KEYS = ("io", "prepare_threshold")


def from_url(url: str, **kwargs: Any) -> PsycopgDriver:
    """A :class:`PsycopgDriver` for a ``postgresql://`` or ``postgres://`` URL.

    The URL is libpq's (user, password, hosts, port, database, query parameters). Two extra
    query parameters set driver options: ``io=trio|thread`` and
    ``prepare_threshold=<n>|none``. ``kwargs`` go to :class:`PsycopgDriver`. Raises ValueError
    (without echoing the URL, which may hold a password) for another scheme or a bad URL.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(
            f"not a PostgreSQL URL (scheme {scheme or '(none)'!r}); "
            "use postgresql:// or postgres://"
        )
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"invalid PostgreSQL URL: {exc}") from None
    query = parse_qsl(parts.query, keep_blank_values=True)
    extra = {k: v for k, v in query if k in _DRIVER_QUERY_KEYS}
    rest = [(k, v) for k, v in query if k not in _DRIVER_QUERY_KEYS]
    if extra:
        url = urlunsplit(parts._replace(query=urlencode(rest, quote_via=quote)))
    options: dict[str, Any] = dict(kwargs)
    if "io" in extra:
        options.setdefault("io", extra["io"])
    if "prepare_threshold" in extra:
        raw = extra["prepare_threshold"].strip().lower()
        if raw in ("none", "null", ""):
            options.setdefault("prepare_threshold", None)
        else:
            try:
                options.setdefault("prepare_threshold", int(raw))
            except ValueError:
                raise ValueError(
                    f"prepare_threshold must be an integer or 'none', got {raw!r}"
                ) from None
    return PsycopgDriver(url, **options)
