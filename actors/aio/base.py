"""What both hosted asyncio drivers share: the call discipline, recovery, close, and SQL helpers.

Why: asyncpg and psycopg's ``AsyncConnection`` differ in their API and errors, but the way a
Trio task drives one of them through the loop is the same: one call at a time, a cancelled
caller released at once (the asyncio task left behind is "pending" until :meth:`reset`), a
close that frees a caller in flight with :class:`~actors.driver.ConnectionLost`. A subclass
supplies the library part (``_translate``, ``_status``, ``_interrupt``, ``_close_raw``...).

Rules: every library call goes through :meth:`AioConnection._run`, which is a Trio checkpoint
and translates the library's exceptions (``raise ... from`` the library exception). Messages
are scrubbed of the connection's secrets.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import trio

from actors.aio.loop import Call, LoopHost, LoopLease, leaf, wait_done
from actors.driver import (
    ConnectionLost,
    DatabaseError,
    ErrorKind,
    Status,
    TransactionOptions,
    redact,
)

__all__ = [
    "AioConnection",
    "AioDriverBase",
    "begin_sql",
    "error_kind",
    "is_lost_sqlstate",
    "quote_ident",
]

T = TypeVar("T")

_ISOLATION = {
    "read committed": "READ COMMITTED",
    "repeatable read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
    "read uncommitted": "READ UNCOMMITTED",
}
_MODES = {"deferrable": "DEFERRABLE", "not deferrable": "NOT DEFERRABLE"}
_LOST_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})
_SERIALIZATION_SQLSTATES = frozenset({"40001", "40P01"})

# Bounds of close(): a graceful close, then the wait for asyncio tasks to end.
CLOSE_TIMEOUT = 1.0


def error_kind(sqlstate: str | None) -> ErrorKind:
    """How the pool classifies a database error of this SQLSTATE."""
    if sqlstate is None:
        return "other"
    if sqlstate.startswith("23"):
        return "integrity"
    if sqlstate in _SERIALIZATION_SQLSTATES:
        return "serialization"
    return "other"


def is_lost_sqlstate(sqlstate: str | None) -> bool:
    """Class 08 (connection exception) and 57P01-3 (the backend is going away)."""
    return sqlstate is not None and (sqlstate.startswith("08") or sqlstate in _LOST_SQLSTATES)


def quote_ident(name: str) -> str:
    """A PostgreSQL quoted identifier."""
    if not name or "\x00" in name:
        raise ValueError(f"invalid identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def begin_sql(options: TransactionOptions) -> str:
    """``BEGIN [ISOLATION LEVEL ...] [READ ONLY] [[NOT] DEFERRABLE]``; ValueError for a bad name."""
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
    return " ".join(parts)


class AioConnection(abc.ABC):
    """The Trio side of one asyncio connection (``actors.driver.Connection``, in part)."""

    label = "aio"

    def __init__(self, lease: LoopLease, secrets: Sequence[str]) -> None:
        self._lease = lease
        self._loop = lease.loop
        self._secrets = list(secrets)
        self._call: Call[Any] | None = None  # in flight, its Trio caller waiting
        self._pending: Call[Any] | None = None  # interrupted: its asyncio task may still run
        self._closed = False
        self._on_close: Callable[[AioConnection], object] | None = None

    # -- for subclasses

    @abc.abstractmethod
    def _translate(self, exc: BaseException) -> Exception:
        """A library exception as ConnectionLost or DatabaseError."""

    @abc.abstractmethod
    def _status(self) -> Status:
        """The library's view of the transaction status (no call in flight)."""

    @abc.abstractmethod
    def _raw_closed(self) -> bool:
        """The library connection is closed or broken."""

    def _observe(self, error: BaseException | None) -> None:  # noqa: B027 - optional hook
        """Called after each finished library call with its exception (None on success)."""

    @abc.abstractmethod
    def _interrupt(self) -> None:
        """Make the library call in flight fail promptly (close under a call). Synchronous."""

    @abc.abstractmethod
    async def _close_raw(self, busy: bool) -> None:
        """Close the library connection (Trio side; may use :meth:`_run_raw`)."""

    @abc.abstractmethod
    def _forget_cursors(self) -> None:
        """The connection was reset or closed: its cursors no longer exist."""

    @abc.abstractmethod
    async def _rollback_raw(self) -> None:
        """Roll back the open transaction (through :meth:`_run`)."""

    # -- messages

    def _message(self, exc: BaseException) -> str:
        return redact(str(exc).strip() or type(exc).__name__, self._secrets)

    def _lost(self, exc: BaseException | str) -> ConnectionLost:
        text = exc if isinstance(exc, str) else self._message(exc)
        return ConnectionLost(f"{self.label} connection lost: {text}")

    # -- the call discipline

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran or the session was found dead."""
        return self._closed or self._raw_closed()

    def status(self) -> Status:
        """idle / transaction / error as last reported; "unknown" while a call is in flight,
        after an interrupted call (until :meth:`reset`), or once closed. No I/O."""
        if self._closed or self._call is not None or self._pending is not None:
            return "unknown"
        return self._status()

    async def _settle(self) -> None:
        """Wait for the asyncio task of an interrupted call (bounded by the caller's scope)."""
        pending = self._pending
        if pending is None:
            return
        await wait_done(pending.future)
        if self._pending is pending:
            self._pending = None
            fut = pending.future
            self._observe(None if fut.cancelled() else fut.exception())

    async def _run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``make()`` on the loop for the calling task; translate its exceptions."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._call is not None:
            raise RuntimeError(
                f"{self.label} connection used by two tasks at once; a connection serves one task"
            )
        if self._pending is not None:
            await self._settle()
        if self._closed:
            raise ConnectionLost(f"{self.label} connection is closed")
        try:
            call: Call[T] = Call(self._loop, make())
        except RuntimeError as exc:  # the loop is closed
            raise self._lost(exc) from exc
        self._call = call
        try:
            result = await call.wait()
        except (ConnectionLost, DatabaseError):
            raise
        except asyncio.CancelledError as exc:
            # Not our Trio cancellation (that is trio.Cancelled): the loop is shutting down.
            raise self._lost("the asyncio loop cancelled the call") from exc
        except Exception as exc:
            self._observe(exc)
            if self._closed:
                raise ConnectionLost(
                    f"{self.label} connection closed during the call ({self._message(exc)})"
                ) from exc
            error = leaf(exc)
            raise self._translate(error) from error
        except BaseException:
            if not call.future.done():
                self._pending = call  # trio.Cancelled, KeyboardInterrupt: left mid-call
            raise
        finally:
            self._call = None
        self._observe(None)
        return result

    # -- recovery and close (the Connection protocol)

    async def cancel(self) -> None:
        """Stop the interrupted call's statement on the server, out of band.

        The Trio cancellation already cancelled the asyncio task, and both libraries answer
        that with their own server-side cancel request (asyncpg from a separate connection,
        psycopg with libpq's cancel connection) before draining. Cancelling that task a second
        time would interrupt their cleanup, so this only makes sure it was cancelled once; it
        never waits and never raises.
        """
        await trio.lowlevel.checkpoint()
        pending = self._pending
        if pending is not None:
            fut = pending.future
            if isinstance(fut, asyncio.Task) and not fut.done() and fut.cancelling() == 0:
                fut.cancel()

    async def reset(self) -> None:
        """Wait for an interrupted call to finish, forget cursors, roll back; end "idle".

        Raises ConnectionLost when that cannot be done (the actor then replaces it).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise ConnectionLost(f"{self.label} connection is closed")
        await self._settle()
        if self.closed:
            raise ConnectionLost(f"{self.label} connection is closed")
        self._forget_cursors()
        if self._status() in ("transaction", "error"):
            try:
                await self._rollback_raw()
            except DatabaseError as exc:
                raise self._lost(exc) from exc
        if self.status() != "idle":
            raise ConnectionLost(
                f"{self.label} connection not idle after reset: {self.status()}"
            )

    async def close(self) -> None:
        """Close the connection. Idempotent, never raises.

        A call in flight (from another task) fails at once with ConnectionLost; the library
        call under it is interrupted (socket aborted) and given a moment to end, so no asyncio
        task is left running. Then the connection is closed and its hold on the loop released.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._forget_cursors()
        call, pending = self._call, self._pending
        busy = call is not None or (pending is not None and not pending.future.done())
        try:
            with trio.CancelScope(shield=True):
                if call is not None:
                    call.abandon(ConnectionLost(f"{self.label} connection closed during the call"))
                if busy:
                    try:
                        self._interrupt()
                    except Exception:  # pragma: no cover - best effort
                        pass
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        for waiting in (call, pending):
                            if waiting is not None:
                                await wait_done(waiting.future)
                with trio.move_on_after(CLOSE_TIMEOUT * 2):
                    await self._close_raw(busy)
        except Exception:  # pragma: no cover - never raise from close
            pass
        finally:
            self._pending = None
            self._lease.release()
            if self._on_close is not None:
                self._on_close(self)

    async def _run_raw(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``make()`` on the loop ignoring the call discipline (close's own calls)."""
        call: Call[T] = Call(self._loop, make())
        return await call.wait()


class AioDriverBase:
    """What both drivers share: the loop host, the live connections, and ``close()``."""

    name = "postgresql"

    def __init__(self) -> None:
        self._host = LoopHost(type(self).__name__)
        self._connections: set[AioConnection] = set()

    def _track(self, conn: AioConnection) -> None:
        self._connections.add(conn)
        conn._on_close = self._connections.discard

    @property
    def loop_running(self) -> bool:
        """The driver's own asyncio loop is running (there are connections on it)."""
        return self._host.running

    async def close(self) -> None:
        """Close every connection still open, then wait for the driver's loop to end.

        ``open_pool`` calls it for a driver it built from a URL; a driver you made yourself is
        yours to close (its loop also stops by itself when its last connection closes).
        Idempotent; the driver can connect again afterwards (a new loop is started).
        """
        for conn in list(self._connections):
            await conn.close()
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT * 5):
            await self._host.wait_stopped()
