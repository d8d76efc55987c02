"""The seam: every line that relies on psycopg internals, and nothing else.

Why: the ``"trio"`` I/O mode drives psycopg's own protocol code with Trio's fd waits instead of
asyncio, and connects, cancels and closes through libpq without blocking. That reaches below
psycopg's public API. Keeping all of it here means that a psycopg release that moves something
breaks exactly one module, and that this docstring is the complete list to re-check.

Internals relied on (pinned by ``psycopg>=3.3,<3.4`` in pyproject.toml; each one is guarded
by ``tests/postgres/test_psycopg_seam.py``, which fails loudly if it moves):

* ``AsyncConnection.wait(gen, interval, timeout)``: every query, transaction command, server
  cursor and notification of :class:`psycopg.AsyncConnection` goes through it (overridden by
  :class:`TrioAsyncConnection`). The synchronous ``Connection.wait`` runs :func:`sync_drain`
  and :func:`sync_ping` in thread mode.
* The generator protocol (``psycopg.abc.PQGen``): a generator yields a
  ``psycopg.waiting.Wait`` and is sent a ``psycopg.waiting.Ready``.
* ``AsyncConnection.lock``: an :class:`asyncio.Lock` that psycopg takes around every
  operation. :class:`_ExclusiveLock` replaces it.
* ``psycopg._conninfo_utils.split_attempts`` / ``get_param`` / ``is_ip_address``: the
  attempts of a multi-host connection string.
* ``psycopg.errors._WaitTimeout``: the exception ``wait`` raises on its ``timeout``.
* libpq through ``psycopg.pq`` objects, beyond the public enums:
  ``PGconn.connect_start`` / ``connect_poll`` / ``nonblocking`` / ``socket`` / ``finish`` /
  ``flush`` / ``consume_input`` / ``is_busy`` / ``get_result`` / ``send_query`` /
  ``get_copy_data`` / ``put_copy_end`` / ``transaction_status`` / ``cancel_conn`` /
  ``get_cancel``, ``PGcancelConn.start`` / ``poll`` / ``socket`` / ``finish``,
  ``PGresult.status`` / ``nfields`` / ``fname``, and ``Cursor.pgresult``.
* ``BaseConnection._prepared``, psycopg's ``PrepareManager`` (its ``clear()`` and its
  ``_to_flush`` deque of pending deallocations): :func:`forget_prepared` empties it after a
  ``DISCARD ALL`` or ``DEALLOCATE ALL`` (psycopg's own detection of those commands misses them
  when their text is already in its counts).

Rules: no other module of :mod:`actors.psycopg` imports a private psycopg name or uses a pq
object; they call the functions here. This module imports only the standard library, trio,
psycopg and :mod:`actors.threads`. It does not know the driver protocol (no
:mod:`actors.driver` errors): it raises psycopg's own exceptions.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import socket
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import psycopg
import trio
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg._conninfo_utils import get_param, is_ip_address, split_attempts
from psycopg.abc import PQGen
from psycopg.conninfo import make_conninfo, timeout_from_conninfo
from psycopg.rows import TupleRow
from psycopg.waiting import Ready, Wait

from actors.threads import call_in_thread

__all__ = [
    "TrioAsyncConnection",
    "forget_prepared",
    "has_rows",
    "result_names",
    "shutdown_socket",
    "sync_cancel_request",
    "sync_drain",
    "sync_finish",
    "sync_ping",
    "transaction_status",
    "trio_cancel",
    "trio_close",
    "trio_connect",
    "trio_drain",
    "trio_ping",
]

_RV = TypeVar("_RV")

_ACTIVE = pq.TransactionStatus.ACTIVE

_WAIT_R = Wait.R
_WAIT_W = Wait.W
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
    Cancellation propagates at once, leaving the generator (and the connection) mid-protocol;
    a caller already cancelled gets ``Cancelled`` before anything is sent (the generator's
    first step writes the query to the socket, before any Trio wait could check).
    """
    await trio.lowlevel.checkpoint_if_cancelled()
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
    :func:`trio_connect` (psycopg's own ``connect()`` uses asyncio); do not call psycopg's
    ``cancel_safe()`` on it (asyncio too): use :func:`trio_cancel`.
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


# --------------------------------------------------------------------------------------------
# Connect, cancel and close without blocking


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


def _notify_closing(owner: pq.abc.PGconn | pq.abc.PGcancelConn) -> None:
    """Wake any Trio task waiting on the socket of a libpq connection about to be closed."""
    try:
        fd = owner.socket
    except psycopg.Error:  # no socket (yet, or any more)
        fd = -1
    if fd >= 0:
        try:
            trio.lowlevel.notify_closing(fd)
        except RuntimeError:  # pragma: no cover - outside Trio (thread mode)
            pass


def _finish_pgconn(pgconn: pq.abc.PGconn) -> None:
    """Close a libpq connection, waking any Trio task waiting on its socket first."""
    _notify_closing(pgconn)
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


async def trio_connect(
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


async def trio_cancel(conn: TrioAsyncConnection, timeout: float) -> None:
    """Send a server-side cancel for the statement running on ``conn``, bounded by ``timeout``.

    libpq >= 17: its non-blocking cancel connection, polled with Trio waits. Older libpq: the
    blocking ``PQcancel`` in a worker thread (abandoned on timeout).
    """
    pgconn = conn.pgconn
    with trio.move_on_after(timeout):
        if psycopg.capabilities.has_cancel_safe():
            await _cancel_with(pgconn.cancel_conn())
        else:  # pragma: no cover - libpq < 17
            await call_in_thread(pgconn.get_cancel().cancel)


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
        _notify_closing(cancel_conn)
        cancel_conn.finish()


async def trio_close(conn: TrioAsyncConnection, cancel_timeout: float) -> None:
    """Close ``conn`` now, safe while a call is in flight in another task.

    The waiters on its socket are woken first (their call fails with OperationalError), with
    no checkpoint before the close. A statement still running on the server gets a
    best-effort cancel, bounded by ``cancel_timeout``, so that its backend does not run on.
    """
    pgconn = conn.pgconn
    cancel_conn: pq.abc.PGcancelConn | None = None
    if pgconn.transaction_status == _ACTIVE and psycopg.capabilities.has_cancel_safe():
        try:
            cancel_conn = pgconn.cancel_conn()  # made before finish(): it needs the conn
        except psycopg.Error:  # pragma: no cover - defensive
            cancel_conn = None
    _notify_closing(pgconn)
    await conn.close()  # sets psycopg's closed flag and finishes the PGconn...
    pgconn.finish()  # ...except when libpq already saw it die (close() skips it): free it now
    if cancel_conn is not None:
        with trio.move_on_after(cancel_timeout):
            try:
                await _cancel_with(cancel_conn)
            except psycopg.Error:
                pass


async def trio_drain(conn: TrioAsyncConnection) -> None:
    """Finish what an interrupted call left on ``conn`` (see :func:`_drain_gen`)."""
    async with conn.lock:
        await conn.wait(_drain_gen(conn.pgconn))


async def trio_ping(conn: TrioAsyncConnection) -> None:
    """One empty query on ``conn`` (see :func:`_ping_gen`)."""
    async with conn.lock:
        await conn.wait(_ping_gen(conn.pgconn))


# --------------------------------------------------------------------------------------------
# Thread mode: a plain psycopg.Connection, called from worker threads


def sync_drain(conn: psycopg.Connection[TupleRow]) -> None:
    """:func:`trio_drain` for a synchronous connection (blocking: call it in a worker thread)."""
    conn.wait(_drain_gen(conn.pgconn))


def sync_ping(conn: psycopg.Connection[TupleRow]) -> None:
    """:func:`trio_ping` for a synchronous connection (blocking: call it in a worker thread)."""
    conn.wait(_ping_gen(conn.pgconn))


def sync_cancel_request(conn: psycopg.Connection[TupleRow]) -> Callable[[], None]:
    """libpq's ``PQcancel`` for ``conn``'s session: thread-safe and blocking.

    Call the result in a worker thread. It may run while another thread is inside a call.
    """
    return conn.pgconn.get_cancel().cancel


def sync_finish(conn: psycopg.Connection[TupleRow]) -> None:
    """Close ``conn`` for good. No thread may be inside a call on it."""
    conn.close()  # psycopg skips PQfinish when libpq already saw the connection die
    conn.pgconn.finish()


def shutdown_socket(conn: psycopg.Connection[TupleRow]) -> None:
    """Shut ``conn``'s socket down, so that a thread blocked inside libpq fails promptly.

    Nothing is freed: that thread still owns the connection and finishes it.
    """
    try:
        fd = conn.pgconn.socket
        sock = socket.socket(fileno=os.dup(fd))
    except (psycopg.Error, OSError):  # pragma: no cover - already gone
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # pragma: no cover - already disconnected
        pass
    finally:
        sock.close()


def transaction_status(
    conn: psycopg.Connection[TupleRow] | psycopg.AsyncConnection[TupleRow],
) -> int:
    """libpq's transaction status of ``conn`` (a :class:`psycopg.pq.TransactionStatus` value).

    This is the raw number: ``conn.info.transaction_status`` builds an enum on every read, and
    the pool reads the status several times per checkout.
    """
    return conn.pgconn.transaction_status


def has_rows(cursor: psycopg.Cursor[TupleRow] | psycopg.AsyncCursor[TupleRow]) -> bool:
    """Whether the cursor's last statement returned rows (``PGRES_TUPLES_OK``)."""
    result = cursor.pgresult
    return result is not None and result.status == _TUPLES_OK


def result_names(result: pq.abc.PGresult, encoding: str) -> list[str]:
    """The column names of ``result`` as the server reported them (``cursor.description``'s
    names, without building its ``Column`` objects: ~1.5 us a column)."""
    return [(result.fname(i) or b"").decode(encoding) for i in range(result.nfields)]


def forget_prepared(
    conn: psycopg.Connection[TupleRow] | psycopg.AsyncConnection[TupleRow],
) -> None:
    """Make psycopg forget every statement it prepared on ``conn`` (after ``DISCARD ALL`` or
    ``DEALLOCATE ALL``).

    ``DISCARD ALL`` deallocates them on the server. psycopg notices that command only the
    first time its text is counted with statements prepared: later, it would go on executing
    ``_pg3_<n>`` names that no longer exist ("prepared statement ... does not exist"). No
    pending deallocation is kept either: there is nothing left to deallocate. No I/O.
    """
    manager = conn._prepared
    manager.clear()
    manager._to_flush.clear()
