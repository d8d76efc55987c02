"""SQLite connections and cursors: the :mod:`actors.driver` protocol over :mod:`sqlite3`.

Why: ``sqlite3`` blocks, so every statement runs in a worker thread through the connection's
:class:`~actors.threads.ThreadEngine`. A cancelled client is released at once. The call it
left running is remembered (in flight): the next call and :meth:`SqliteConnection.reset` wait
for it, :meth:`SqliteConnection.cancel` interrupts it, and :meth:`SqliteConnection.close`
never waits for it (the thread closes the handle once the call returns). See
:mod:`actors.sqlite` for the choices: autocommit, the busy timeout in slices, the write gate,
``query_only``.

Rules: :meth:`SqliteConnection._run` is the only way a statement reaches ``sqlite3``. The
functions given to it run in the worker thread. They touch only the handle they are given and
the connection's thread-side state (``_cursors``, ``_query_only``). Errors leave through
:func:`~actors.sqlite.errors.classify`.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import trio

from actors.driver import ConnectionLost, DatabaseError, Params, Row, Status, TransactionOptions
from actors.sqlite.errors import (
    BUSY_CODES,
    BUSY_SLICE,
    BUSY_SNAPSHOT,
    STATEMENT_ERRORS,
    classify,
    primary_code,
)
from actors.sqlite.session import leaves_session_state as _leaves_state
from actors.sqlite.session import reset_session_sync, snapshot_pragmas
from actors.threads import EngineClosed, ThreadEngine

__all__ = ["SqliteConnection", "SqliteCursor"]

T = TypeVar("T")

_BEGIN_MODES: Final[Mapping[str | None, str]] = {
    None: "BEGIN",
    "deferred": "BEGIN DEFERRED",
    "immediate": "BEGIN IMMEDIATE",
    "exclusive": "BEGIN EXCLUSIVE",
}
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _check_params(params: Params) -> tuple[Any, ...] | list[Any] | dict[str, Any]:
    """Normalise ``params`` for ``sqlite3``: a sequence for ``?``, a dict for ``:name``.

    ``sqlite3`` only accepts a real ``dict`` for named parameters, and would happily treat a
    string as a sequence of one-character parameters: reject that mistake clearly.
    """
    if params is None:
        return ()
    if isinstance(params, (str, bytes, bytearray)):
        raise DatabaseError(f"params must be a sequence or a mapping, not {type(params).__name__}")
    if isinstance(params, (tuple, list, dict)):
        return params
    if isinstance(params, Mapping):
        return dict(params)
    return tuple(params)


class SqliteCursor:
    """A streaming result: each :meth:`fetch_batch` runs ``fetchmany(batch_size)`` in the
    worker thread, so only one batch of rows is ever held in Python memory.

    The cursor closes itself (releasing its read snapshot or lock) as soon as a batch comes back
    short; :meth:`SqliteConnection.reset` closes any cursor a client left open.
    """

    def __init__(self, conn: SqliteConnection, cursor: sqlite3.Cursor, batch_size: int) -> None:
        self._conn = conn
        self._cursor = cursor
        self._batch_size = batch_size
        self._exhausted = False
        self._closed = False

    def columns(self) -> list[str]:
        """The column names of this result (no I/O)."""
        return [d[0] for d in self._cursor.description or ()]

    @property
    def batch_size(self) -> int:
        """How many rows one :meth:`fetch_batch` returns at most."""
        return self._batch_size

    def _fetch_sync(self, raw: sqlite3.Connection) -> list[Row]:
        if self._cursor not in self._conn._cursors:
            # reset() closed it under us.
            self._closed = True
            raise DatabaseError("sqlite: cursor was closed by a connection reset")
        rows: list[Row] = self._cursor.fetchmany(self._batch_size)
        if len(rows) < self._batch_size:
            self._close_sync(raw)
            self._exhausted = True
        return rows

    def _close_sync(self, raw: sqlite3.Connection) -> None:
        self._conn._cursors.discard(self._cursor)
        self._cursor.close()

    async def fetch_batch(self) -> list[Row]:
        """Return the next at most ``batch_size`` rows; ``[]`` once the result is exhausted."""
        if self._exhausted:
            return []
        if self._closed:
            raise DatabaseError("sqlite: fetch_batch on a closed cursor")
        # Not re-run on busy: the cursor's statement was reset by the error.
        return await self._conn._run(self._fetch_sync, "fetch_batch", retry_busy=False)

    async def close(self) -> None:
        """Close the cursor (its statement is reset and its lock released). Safe to call twice;
        a no-op once the connection is closed."""
        if self._closed or self._exhausted:
            self._closed = True
            return
        self._closed = True
        if self._conn.closed:
            return
        with contextlib.suppress(ConnectionLost):
            await self._conn._run(self._close_sync, "close cursor")


class SqliteConnection:
    """One ``sqlite3`` connection driven from Trio; implements :class:`actors.driver.Connection`.

    Owned by one actor and used by one client task at a time. See the module docstring for the
    threading and cancellation model.
    """

    def __init__(
        self,
        raw: sqlite3.Connection,
        label: str,
        busy_timeout: float = 0.0,
        gate: trio.Semaphore | None = None,
    ) -> None:
        self._raw = raw
        self._label = label
        self._busy_timeout = busy_timeout
        self._gate = gate
        self._gate_held = False
        # One thread call at a time, on a private one-thread limiter: a stuck call on one
        # connection never starves the others. finish closes the handle exactly once.
        self._threads = ThreadEngine(1, finish=raw.close)
        self._query_only = False
        self._cursors: set[sqlite3.Cursor] = set()
        self._description: Any = None  # of the last fetch: columns() reads the names from it
        self._baseline = snapshot_pragmas(raw)  # what reset_session() returns to

    def __repr__(self) -> str:
        state = "closed" if self._threads.closing else self.status()
        return f"<SqliteConnection {self._label} {state}>"

    @property
    def raw(self) -> sqlite3.Connection:
        """The underlying ``sqlite3.Connection``, for setup such as ``create_function``.

        Never run statements on it while a call of this object may be in flight.
        """
        return self._raw

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (the handle may still be closing in its thread)."""
        return self._threads.closing

    @property
    def in_flight(self) -> bool:
        """True while a thread call (possibly abandoned by a cancelled client) is running."""
        return self._threads.in_flight

    # -- the thread calls ---------------------------------------------------------------------

    def _lost(self, what: str) -> ConnectionLost:
        return ConnectionLost(f"sqlite connection to {self._label} is closed ({what})")

    async def _run(
        self, fn: Callable[[sqlite3.Connection], T], what: str, *, retry_busy: bool = True
    ) -> T:
        """Run ``fn(raw)`` in a worker thread; the only way any statement reaches ``sqlite3``.

        Callers queue in FIFO order, then wait for an abandoned call
        (:meth:`actors.threads.ThreadEngine.call`). With ``retry_busy``, ``fn`` is re-run on a
        busy lock until the busy timeout (see :meth:`_retry_busy`); pass False when re-running
        it is not safe (a half-read cursor).
        """
        raw = self._raw
        work: Callable[[], T]
        if retry_busy and self._busy_timeout > BUSY_SLICE:
            work = functools.partial(self._retry_busy, fn, raw)
        else:
            work = functools.partial(fn, raw)
        try:
            return await self._threads.call(work)
        except EngineClosed:
            # Closed before the call started, or close() woke us while it ran.
            raise self._lost(what) from None
        except STATEMENT_ERRORS as exc:
            if self._threads.closing:
                raise self._lost(what) from exc
            raise classify(exc) from exc

    def _retry_busy(self, fn: Callable[[sqlite3.Connection], T], raw: sqlite3.Connection) -> T:
        """The busy timeout, implemented here so that a waiting call can be stopped.

        SQLite's own busy handler cannot be interrupted (``interrupt()`` does not end its wait),
        so a cancelled client would pin the connection for the whole busy timeout. Instead
        SQLite waits at most ``BUSY_SLICE`` per attempt and this loop re-runs ``fn`` until the
        configured timeout, stopping early when the call was abandoned, cancelled or closed.

        Re-running is safe because SQLite undoes just the statement that got SQLITE_BUSY (the
        busy handler retries the very same lock). It is not done when the whole transaction was
        rolled back instead (``in_transaction`` changed), for SQLITE_BUSY_SNAPSHOT (a stale WAL
        snapshot never becomes fresh: the transaction must restart), or when SQLite failed at
        once without waiting (it refuses to wait when waiting could deadlock).
        """
        deadline = time.monotonic() + self._busy_timeout
        while True:
            before = raw.in_transaction
            started = time.monotonic()
            try:
                return fn(raw)
            except sqlite3.OperationalError as exc:
                now = time.monotonic()
                if (
                    primary_code(exc) not in BUSY_CODES
                    or getattr(exc, "sqlite_errorcode", None) == BUSY_SNAPSHOT
                    or raw.in_transaction != before
                    or now >= deadline
                    or now - started < BUSY_SLICE / 2
                ):
                    raise
                if self._threads.stop_requested():
                    raise

    # -- Connection protocol ------------------------------------------------------------------

    def status(self) -> Status:
        """``"transaction"`` or ``"idle"`` from ``sqlite3.Connection.in_transaction``.

        ``"unknown"`` while a thread call is in flight (for example one abandoned by a cancelled
        client) and once closed. SQLite has no failed-transaction state: a failed statement
        rolls back only itself, or the whole transaction (which then reads ``"idle"``).
        """
        if self._threads.closing or self._threads.in_flight:
            return "unknown"
        try:
            return "transaction" if self._raw.in_transaction else "idle"
        except sqlite3.Error:
            return "unknown"

    async def ping(self) -> None:
        """Run ``SELECT 1``; any failure means the handle is unusable: ConnectionLost."""
        try:
            await self._run(
                lambda raw: raw.execute("SELECT 1").fetchall(), "ping", retry_busy=False
            )
        except DatabaseError as exc:
            raise ConnectionLost(f"sqlite ping failed on {self._label}: {exc}") from exc

    async def execute(self, query: str, params: Params = None) -> int:
        """Run one statement; return ``cursor.rowcount`` (-1 for statements without one)."""
        args = _check_params(params)

        def run(raw: sqlite3.Connection) -> int:
            cur = raw.execute(query, args)
            try:
                return cur.rowcount
            finally:
                cur.close()

        return await self._run(run, "execute")

    async def fetch(self, query: str, params: Params = None) -> list[Row]:
        """Run a query and return every row as a tuple."""
        args = _check_params(params)

        def run(raw: sqlite3.Connection) -> list[Row]:
            cur = raw.execute(query, args)
            try:
                rows: list[Row] = cur.fetchall()
                self._description = cur.description
                return rows
            finally:
                cur.close()

        return await self._run(run, "fetch")

    # -- optional protocol methods (actors.driver.Connection) -------------------------------

    paramstyle = "qmark"
    """The placeholders (DB-API names): ``?``, or ``:name`` with a mapping."""

    def columns(self) -> list[str]:
        """The column names of the last ``fetch``, as SQLite reports them (no I/O)."""
        return [d[0] for d in self._description or ()]

    def leaves_session_state(self, query: str) -> bool:
        """Whether ``query`` may leave session state (see :mod:`actors.sqlite.session`)."""
        return _leaves_state(query)

    async def execute_many(self, query: str, params_seq: list[Params]) -> int:
        """Run ``query`` once per parameter set (``executemany``); total rows affected."""
        batch = [_check_params(p) for p in params_seq]

        def run(raw: sqlite3.Connection) -> int:
            cur = raw.executemany(query, batch)
            try:
                return max(cur.rowcount, 0)
            finally:
                cur.close()

        return await self._run(run, "execute_many")

    async def reset_session(self) -> None:
        """Drop temporary objects and attached databases, restore the pragmas."""
        baseline = self._baseline
        await self._run(lambda raw: reset_session_sync(raw, baseline), "reset_session")

    async def open_cursor(self, query: str, params: Params, batch_size: int) -> SqliteCursor:
        """Start ``query``; rows are then fetched ``batch_size`` at a time in the worker thread."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        args = _check_params(params)

        def run(raw: sqlite3.Connection) -> sqlite3.Cursor:
            cur = raw.execute(query, args)
            cur.arraysize = batch_size
            self._cursors.add(cur)
            return cur

        cursor = await self._run(run, "open_cursor")
        return SqliteCursor(self, cursor, batch_size)

    async def prepare(self, query: str) -> None:
        """No-op: ``sqlite3`` keeps its own statement cache (``cached_statements``)."""
        if self._threads.closing:
            raise self._lost("prepare")
        await trio.lowlevel.checkpoint()

    @staticmethod
    def _begin_sql(options: TransactionOptions) -> str:
        if options.mode not in _BEGIN_MODES:
            raise ValueError(
                f"sqlite: unknown transaction mode {options.mode!r}; "
                "use None, 'deferred', 'immediate' or 'exclusive'"
            )
        isolation = options.isolation
        if isolation is not None and isolation.strip().lower() != "serializable":
            raise ValueError(
                f"sqlite: isolation level {isolation!r} is not supported; SQLite transactions are "
                "always serializable (pass None or 'serializable')"
            )
        return _BEGIN_MODES[options.mode]

    def _end_sync(self, raw: sqlite3.Connection) -> None:
        """After COMMIT / ROLLBACK: undo ``query_only`` once the transaction is really over."""
        if self._query_only and not raw.in_transaction:
            raw.execute("PRAGMA query_only = OFF")
            self._query_only = False

    async def begin(self, options: TransactionOptions) -> None:
        """``BEGIN`` / ``BEGIN IMMEDIATE`` / ``BEGIN EXCLUSIVE`` per ``options.mode``.

        Raises ValueError (before any I/O) for an unknown mode or an isolation level other than
        serializable. ``read_only`` turns ``PRAGMA query_only`` on for this transaction.
        """
        sql = self._begin_sql(options)
        if options.mode in ("immediate", "exclusive"):
            await self._acquire_gate()

        def run(raw: sqlite3.Connection) -> None:
            if options.read_only:
                raw.execute("PRAGMA query_only = ON")
                self._query_only = True
            try:
                raw.execute(sql)
            except BaseException:
                self._end_sync(raw)
                raise

        try:
            await self._run(run, "begin")
        finally:
            self._settle_gate()

    async def commit(self) -> None:
        """``COMMIT``. On a busy error the transaction stays open (it can be retried or rolled
        back)."""

        def run(raw: sqlite3.Connection) -> None:
            try:
                raw.execute("COMMIT")
            finally:
                self._end_sync(raw)

        try:
            await self._run(run, "commit")
        finally:
            self._settle_gate()

    async def rollback(self) -> None:
        """``ROLLBACK``; a no-op when SQLite already rolled the transaction back by itself
        (it does so after some errors, and after an interrupted write)."""

        def run(raw: sqlite3.Connection) -> None:
            try:
                if raw.in_transaction:
                    raw.execute("ROLLBACK")
            finally:
                self._end_sync(raw)

        try:
            await self._run(run, "rollback")
        finally:
            self._settle_gate()

    async def _acquire_gate(self) -> None:
        """Queue (FIFO) behind the other write transactions of this process on this database.

        SQLite makes a waiting writer poll the lock (sleeping 1 ms, 2 ms, 5 ms ... 20 ms between
        tries), which wastes lock time and is unfair: under contention some writers lose again
        and again. Connections of one process that open ``BEGIN IMMEDIATE`` / ``EXCLUSIVE``
        transactions on the same database therefore take a Trio semaphore first, held until the
        transaction ends, so the lock is handed over at once and in arrival order. Other
        processes and deferred transactions still meet SQLite's busy handling. Waiting longer
        than the busy timeout is a ``kind="serialization"`` error, like SQLITE_BUSY.
        """
        if self._gate is None or self._gate_held:
            await trio.lowlevel.checkpoint()
            return
        if self._threads.closing:
            raise self._lost("begin")
        with trio.move_on_after(self._busy_timeout):
            await self._gate.acquire()
            self._gate_held = True
        if not self._gate_held:
            raise DatabaseError(
                f"database is locked: another connection of this process kept a write "
                f"transaction on {self._label} open longer than the busy timeout "
                f"({self._busy_timeout} s)",
                kind="serialization",
            )

    def _settle_gate(self) -> None:
        """Release the write gate once this connection's transaction is over (or it closed).
        Kept while an abandoned call runs: :meth:`reset` or :meth:`close` releases it later."""
        if not self._threads.closing:
            if self._threads.in_flight:
                return
            try:
                if self._raw.in_transaction:
                    return
            except sqlite3.Error:
                pass
        self._release_gate()

    def _release_gate(self) -> None:
        if self._gate_held and self._gate is not None:
            self._gate_held = False
            self._gate.release()

    @staticmethod
    def _identifier(name: str) -> str:
        if not _IDENTIFIER.match(name):
            raise ValueError(f"sqlite: savepoint name must be a plain identifier, got {name!r}")
        return f'"{name}"'

    async def savepoint(self, name: str) -> None:
        """``SAVEPOINT name`` (outside a transaction, SQLite opens one)."""
        sql = f"SAVEPOINT {self._identifier(name)}"
        await self._run(lambda raw: raw.execute(sql).close(), "savepoint")

    async def release(self, name: str) -> None:
        """``RELEASE SAVEPOINT name``: keep the savepoint's work."""
        sql = f"RELEASE SAVEPOINT {self._identifier(name)}"
        await self._run(lambda raw: raw.execute(sql).close(), "release")

    async def rollback_to(self, name: str) -> None:
        """``ROLLBACK TO SAVEPOINT name``: undo its work, keep it and the outer transaction."""
        sql = f"ROLLBACK TO SAVEPOINT {self._identifier(name)}"
        await self._run(lambda raw: raw.execute(sql).close(), "rollback_to")

    async def cancel(self) -> None:
        """Interrupt the statement in flight (``sqlite3.Connection.interrupt``); no waiting.

        Does nothing when no thread call runs: an interrupt with an open cursor would otherwise
        poison the next statement. A Python function called by SQL is not interrupted until it
        returns to SQLite.
        """
        self._threads.interrupt(self._raw.interrupt)
        await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        """Wait for an abandoned call to return, close open cursors, roll back, restore
        ``query_only``: the connection is then idle. ConnectionLost if that fails."""

        def run(raw: sqlite3.Connection) -> None:
            for cur in list(self._cursors):
                with contextlib.suppress(sqlite3.Error):
                    cur.close()
            self._cursors.clear()
            if raw.in_transaction:
                raw.execute("ROLLBACK")
            if self._query_only:
                raw.execute("PRAGMA query_only = OFF")
                self._query_only = False

        try:
            await self._run(run, "reset", retry_busy=False)
        except DatabaseError as exc:
            raise ConnectionLost(f"sqlite reset failed on {self._label}: {exc}") from exc
        finally:
            self._settle_gate()

    async def close(self) -> None:
        """Close now. Idempotent, never raises, never waits for a call in flight.

        A call in flight is interrupted, its client is woken with ConnectionLost at once, and the
        worker thread closes the handle when the call returns. Otherwise the handle is closed in
        a thread (waited for unless this task is cancelled).
        """
        self._release_gate()  # the transaction, if any, ends with the handle
        await self._threads.close(interrupt=self._raw.interrupt)

    async def wait_closed(self) -> None:
        """Wait until the database handle is really closed: after :meth:`close`, once the call
        that was in flight has returned and its thread closed the handle. For tests and for
        callers that must know the file is released (e.g. before deleting it)."""
        await self._threads.wait_finished()
