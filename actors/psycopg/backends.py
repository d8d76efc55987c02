"""Backends: the same few primitive operations, in the calling task or in a worker thread.

Why: :class:`~actors.psycopg.PsycopgConnection` holds the driver logic once (transactions,
cursors, error classification). A backend is only "how to run one statement, drain, ping,
cancel, close" for one I/O mode (see :data:`IoMode`):

* :class:`TrioBackend` wraps a :class:`~actors.psycopg.seam.TrioAsyncConnection` and runs
  everything in the calling task with Trio's fd waits.
* :class:`ThreadBackend` wraps a plain :class:`psycopg.Connection` and runs everything through
  one :class:`~actors.threads.ThreadEngine`: one call at a time, abandoned when its caller is
  cancelled, and never started if its caller went away first.

Rules: a backend raises psycopg's exceptions and knows nothing of the driver's errors (the
connection classifies them). psycopg internals are reached only through
:mod:`actors.psycopg.seam`. Public psycopg API is used directly.
"""

from __future__ import annotations

import abc
import math
import threading
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import psycopg
import trio
from psycopg import pq
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

import actors.psycopg.seam as seam
from actors.driver import Params, Row
from actors.threads import EngineClosed, ThreadEngine, call_in_thread

__all__ = [
    "FORGETS_PREPARED",
    "Backend",
    "IoMode",
    "Result",
    "ThreadBackend",
    "TrioBackend",
    "open_backend",
]

_T = TypeVar("_T")

IoMode = Literal["trio", "thread"]
"""How a connection does its I/O (re-exported, documented, as :data:`actors.psycopg.IoMode`)."""

Result = tuple[int, list[Row] | None, str | None]
"""What one statement gives back: (rowcount, rows or None, status message)."""

# Upper bound of the best-effort cancel close() sends for a query still running.
_CLOSE_CANCEL_TIMEOUT = 1.0
# Command tags after which the server has no prepared statement left: psycopg must forget its
# own (it notices them only sometimes; see seam.forget_prepared).
FORGETS_PREPARED = frozenset({"DISCARD ALL", "DEALLOCATE ALL"})
# A completed call keeps its cursor for the next one only after a result this small.
_REUSE_CURSOR_MAX_ROWS = 100
# Threads of one connection: its call, plus cancel requests beside it, plus calls whose
# callers left before they started (they end at once). Private, so that abandoned threads
# never eat Trio's global thread budget.
_THREADS_PER_CONNECTION = 8


class Backend(abc.ABC):
    """The handful of primitive operations :class:`~actors.psycopg.PsycopgConnection` uses."""

    _last: Any = None
    """The last result with rows: its PGresult (names decoded only when asked, by
    :meth:`columns`), its names already decoded (a list), or None."""

    conn: psycopg.Connection[TupleRow] | psycopg.AsyncConnection[TupleRow]
    info: psycopg.ConnectionInfo
    """psycopg's live view of the session (connection status, backend pid...)."""

    @property
    def transaction_status(self) -> int:
        """libpq's transaction status (a :class:`psycopg.pq.TransactionStatus` value)."""
        return seam.transaction_status(self.conn)

    def _keep(
        self, cur: psycopg.Cursor[TupleRow] | psycopg.AsyncCursor[TupleRow], rows: int
    ) -> None:
        """Remember the result ``cur`` just gave (``rows`` rows) for :meth:`columns`, cheaply:
        a small result is kept as is (its cursor keeps it alive anyway); the names of a large
        one are decoded now, so that it is not pinned in memory."""
        result = cur.pgresult
        if rows > _REUSE_CURSOR_MAX_ROWS and result is not None:
            self._last = seam.result_names(result, self.info.encoding)
        else:
            self._last = result

    def columns(self) -> list[str]:
        """The column names of the last result with rows ([] after a statement without)."""
        last = self._last
        if last is None:
            return []
        if not isinstance(last, list):
            last = self._last = seam.result_names(last, self.info.encoding)
        return list(last)

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """The connection is closed (by us, or found dead)."""

    @abc.abstractmethod
    async def run(
        self, query: str, params: Params, prepare: bool | None, want_rows: bool
    ) -> Result:
        """Run one statement; return (rowcount, rows or None, status message)."""

    @abc.abstractmethod
    async def run_many(self, query: str, params_seq: list[Params]) -> int:
        """``executemany``: psycopg sends the statements in pipeline mode (one network round
        trip for the batch, where libpq supports it); return the total rows affected."""

    @abc.abstractmethod
    async def discard(self, query: str) -> None:
        """Run ``query`` (``DISCARD ALL``, outside a transaction) and make psycopg forget the
        statements it prepared, which that command deallocated, in one operation."""

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
        """Wait until no operation of a cancelled caller is still running.

        This only happens in thread mode. The Trio backend never has such an operation, so by
        default there is nothing to wait for.
        """

    @abc.abstractmethod
    async def ping(self) -> None:
        """One cheap round trip; raise if the connection is dead."""

    @abc.abstractmethod
    async def cancel(self, timeout: float) -> None:
        """Send the server-side cancel for the statement in flight, bounded by timeout."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection; safe while a call is in flight in another task."""


async def open_backend(
    io: IoMode, params: dict[str, Any], timeout: float | None, prepare_threshold: int | None
) -> Backend:
    """Open an autocommit connection for ``io``.

    Raises psycopg.Error or OSError when that fails.
    """
    if io == "trio":
        return TrioBackend(await seam.trio_connect(params, timeout, prepare_threshold))
    return await _thread_connect(params, timeout, prepare_threshold)


class TrioBackend(Backend):
    """Everything in the calling task, on a :class:`~actors.psycopg.seam.TrioAsyncConnection`."""

    conn: seam.TrioAsyncConnection

    def __init__(self, conn: seam.TrioAsyncConnection) -> None:
        self.conn = conn
        self.info = conn.info
        self._closed = False
        # One cursor reused for every call (making one per call cost 9-15% of a `select 1`);
        # forgotten after any failure or reset, so an interrupted cursor is never reused.
        self._cursor: psycopg.AsyncCursor[TupleRow] | None = None

    @property
    def closed(self) -> bool:
        return self._closed or self.conn.closed

    async def run(
        self, query: str, params: Params, prepare: bool | None, want_rows: bool
    ) -> Result:
        cur, self._cursor = self._cursor or self.conn.cursor(), None
        await cur.execute(query, params, prepare=prepare)
        rows = await cur.fetchall() if want_rows and seam.has_rows(cur) else None
        if rows is None:
            self._last = None
        else:
            self._keep(cur, len(rows))
        result = cur.rowcount, rows, cur.statusmessage
        if result[2] in FORGETS_PREPARED:
            seam.forget_prepared(self.conn)
        if rows is None or len(rows) <= _REUSE_CURSOR_MAX_ROWS:
            # Only a completed call gives its cursor back, and only after a small result: the
            # cursor keeps its last PGresult alive, which must not pin a large one in memory.
            self._cursor = cur
        return result

    async def run_many(self, query: str, params_seq: list[Params]) -> int:
        cur = self.conn.cursor()
        await cur.executemany(query, [() if p is None else p for p in params_seq])
        return max(cur.rowcount, 0)

    async def discard(self, query: str) -> None:
        self._cursor, self._last = None, None
        await self.conn.cursor().execute(query, prepare=False)
        seam.forget_prepared(self.conn)  # no checkpoint between the command and this

    async def rollback(self) -> None:
        self._cursor = None
        await self.conn.rollback()

    async def drain(self) -> None:
        self._cursor = None
        await seam.trio_drain(self.conn)

    async def ping(self) -> None:
        await seam.trio_ping(self.conn)

    async def cancel(self, timeout: float) -> None:
        await seam.trio_cancel(self.conn, timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # no checkpoint before trio_close wakes the waiters and closes
        await seam.trio_close(self.conn, _CLOSE_CANCEL_TIMEOUT)


class ThreadBackend(Backend):
    """A synchronous psycopg connection driven from worker threads.

    Every operation is one :meth:`~actors.threads.ThreadEngine.call`. Operations run one at a
    time, and a caller cancelled while its thread runs is released at once. That thread then
    finishes the psycopg call on its own, quickly after :meth:`cancel`. The next operation
    waits for it: this is the actor's reset, which starts with :meth:`settle`. An operation
    whose caller was cancelled before its thread started it never runs.

    A :meth:`close` while a thread is inside libpq shuts the socket down, which makes that call
    fail promptly. The actual ``PQfinish`` is left to that thread, because libpq objects must
    not be freed under a running call.
    """

    conn: psycopg.Connection[TupleRow]

    def __init__(self, conn: psycopg.Connection[TupleRow]) -> None:
        self.conn = conn
        self.info = conn.info
        self._cancel_request = seam.sync_cancel_request(conn)
        self._engine = ThreadEngine(_THREADS_PER_CONNECTION, finish=lambda: seam.sync_finish(conn))

    @property
    def _op_lock(self) -> threading.Lock:
        """Held by the worker thread that runs an operation (one at a time)."""
        return self._engine.serial

    @property
    def closed(self) -> bool:
        return self._engine.closing or self.info.status == pq.ConnStatus.BAD

    async def _call(self, fn: Callable[[psycopg.Connection[TupleRow]], _T]) -> _T:
        conn = self.conn
        try:
            return await self._engine.call(lambda: fn(conn))
        except EngineClosed:
            raise psycopg.OperationalError("the connection is closed") from None

    @property
    def busy(self) -> bool:
        """A worker thread is inside a psycopg call (maybe one whose caller was cancelled)."""
        return self._engine.running

    async def settle(self) -> None:
        # Wait for an operation a cancelled caller left running in its thread.
        await self._call(lambda conn: None)

    async def run(
        self, query: str, params: Params, prepare: bool | None, want_rows: bool
    ) -> Result:
        def op(conn: psycopg.Connection[TupleRow]) -> Result:
            cur = conn.cursor()
            cur.execute(query, params, prepare=prepare)
            rows = cur.fetchall() if want_rows and seam.has_rows(cur) else None
            if rows is None:
                self._last = None
            else:
                self._keep(cur, len(rows))
            tag = cur.statusmessage
            if tag in FORGETS_PREPARED:
                seam.forget_prepared(conn)  # in the same thread call as the command
            return cur.rowcount, rows, tag

        return await self._call(op)

    async def run_many(self, query: str, params_seq: list[Params]) -> int:
        def op(conn: psycopg.Connection[TupleRow]) -> int:
            cur = conn.cursor()
            cur.executemany(query, [() if p is None else p for p in params_seq])
            return max(cur.rowcount, 0)

        return await self._call(op)

    async def discard(self, query: str) -> None:
        def op(conn: psycopg.Connection[TupleRow]) -> None:
            self._last = None
            conn.cursor().execute(query, prepare=False)
            seam.forget_prepared(conn)  # in the same thread call as the command

        await self._call(op)

    async def rollback(self) -> None:
        await self._call(lambda conn: conn.rollback())

    async def drain(self) -> None:
        await self._call(seam.sync_drain)

    async def ping(self) -> None:
        await self._call(seam.sync_ping)

    async def cancel(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._engine.aside(self._cancel_request)

    async def close(self) -> None:
        if self._engine.closing:
            return
        conn = self.conn
        # A thread inside libpq: shut the socket down (that call fails, and its thread finishes
        # the connection), then cancel the statement so its backend does not run on.
        if await self._engine.close(interrupt=lambda: seam.shutdown_socket(conn)):
            with trio.move_on_after(_CLOSE_CANCEL_TIMEOUT):
                try:
                    await self._engine.aside(self._cancel_request)
                except psycopg.Error:
                    pass


async def _thread_connect(
    params: dict[str, Any], timeout: float | None, prepare_threshold: int | None
) -> ThreadBackend:
    params = dict(params)
    if timeout is not None and "connect_timeout" not in params:
        params["connect_timeout"] = str(max(2, math.ceil(timeout)))
    conninfo = make_conninfo("", **params)

    def open_connection() -> psycopg.Connection[TupleRow]:
        return psycopg.Connection.connect(
            conninfo, autocommit=True, prepare_threshold=prepare_threshold
        )

    # A connection that lands after its caller left is closed: nobody will use it.
    conn = await call_in_thread(open_connection, late=lambda late: late.close())
    return ThreadBackend(conn)
