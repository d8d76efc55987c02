"""PostgreSQL connections and cursors: the :mod:`actors.driver` protocol over a backend.

Why: the driver logic is written once here and runs over either I/O mode of
:mod:`actors.psycopg.backends`: transactions, savepoints, server-side cursors, prepared
statements, one task at a time, and the translation of psycopg errors into
:class:`~actors.driver.ConnectionLost` / :class:`~actors.driver.DatabaseError`.

Rules: all I/O goes through the backend (``self._b``). Nothing here touches libpq, and
session state is read through the backend. Every client
call runs under :meth:`PsycopgConnection._exclusive`. Error messages are scrubbed of the
connection's secrets.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import psycopg
import trio
from psycopg import pq

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
from actors.pgsql import RESET_SQL
from actors.pgsql import leaves_session_state as _leaves_state
from actors.psycopg.backends import FORGETS_PREPARED, Backend, IoMode, Result

__all__ = ["PsycopgConnection", "PsycopgCursor"]

_IDLE = pq.TransactionStatus.IDLE
_ACTIVE = pq.TransactionStatus.ACTIVE
_INTRANS = pq.TransactionStatus.INTRANS
_INERROR = pq.TransactionStatus.INERROR

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
# Marked-for-preparation query texts kept per connection (psycopg bounds the server side).
_MAX_PREPARED_TEXTS = 256


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

    def __init__(self, backend: Backend, secrets: Sequence[str], io: IoMode) -> None:
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
            return int(self._b.info.backend_pid)
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
        return _STATUS.get(self._b.transaction_status, "unknown")

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
        if self._b.info.status == pq.ConnStatus.BAD:
            return self._lost(exc)
        if _is_lost_sqlstate(sqlstate):
            return self._lost(exc)
        if sqlstate is None and isinstance(exc, psycopg.OperationalError):
            return self._lost(exc)
        if self._b.transaction_status == _ACTIVE:
            # The statement left the protocol mid-way (e.g. a COPY run through execute()).
            try:
                await self._b.drain()
            except psycopg.Error as again:
                return self._lost(again)
        return DatabaseError(self._message(exc), sqlstate=sqlstate, kind=_kind(sqlstate))

    async def _run(
        self, query: str, params: Params, *, prepare: bool | None, want_rows: bool
    ) -> Result:
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
            rowcount, _, tag = await self._run(
                query, params, prepare=self._prepare_flag(query), want_rows=False
            )
            if tag in FORGETS_PREPARED:  # the client ran DISCARD ALL / DEALLOCATE ALL itself
                self._prepared.clear()
            return rowcount

    async def fetch(self, query: str, params: Params = None) -> list[Row]:
        """Run a query and return all its rows as tuples ([] for a statement without rows)."""
        with self._exclusive():
            _, rows, tag = await self._run(
                query, params, prepare=self._prepare_flag(query), want_rows=True
            )
            if tag in FORGETS_PREPARED:
                self._prepared.clear()
            return rows if rows is not None else []

    # -- optional protocol methods (actors.driver.Connection) -------------------------------

    paramstyle = "format"
    """The placeholders (DB-API names): ``%s``, or ``%(name)s`` with a mapping."""

    def columns(self) -> list[str]:
        """The column names of the last result with rows, as the server reported them."""
        return self._b.columns()

    def leaves_session_state(self, query: str) -> bool:
        """Whether ``query`` may leave session state (see :mod:`actors.pgsql`)."""
        return _leaves_state(query)

    async def execute_many(self, query: str, params_seq: list[Params]) -> int:
        """Run ``query`` once per parameter set, pipelined (psycopg's ``executemany``: the
        batch goes out without waiting for each result); total rows affected."""
        if self._b.closed:
            raise ConnectionLost("postgresql connection is closed")
        with self._exclusive():
            try:
                return await self._b.run_many(query, params_seq)
            except psycopg.Error as exc:
                raise await self._failure(exc) from exc

    async def reset_session(self) -> None:
        """``DISCARD ALL``: settings, roles, temporary tables, LISTEN, session advisory locks,
        prepared statements and WITH HOLD cursors. psycopg is made to forget the statements it
        prepared (:func:`actors.psycopg.seam.forget_prepared`), and this connection forgets
        the texts marked by :meth:`prepare`: they are prepared again on their next use.

        Called by the actor on an idle connection. Any failure is ConnectionLost: a session
        that could not be reset must not be lent again.
        """
        with self._exclusive():
            if self._b.closed:
                raise ConnectionLost("postgresql connection is closed")
            if self.status() != "idle":
                raise ConnectionLost(
                    f"postgresql session reset needs an idle connection, not {self.status()}"
                )
            self._prepared.clear()
            try:
                await self._b.discard(RESET_SQL)
            except psycopg.Error as exc:
                raise ConnectionLost(
                    f"postgresql session reset ({RESET_SQL}) failed: {self._message(exc)}"
                ) from exc

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
        if self._b.closed or not (self._b.busy or self._b.transaction_status == _ACTIVE):
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
                if self._b.transaction_status == _ACTIVE:
                    await self._b.drain()
                for cursor in list(self._cursors.values()):
                    cursor._forget()
                if self._b.transaction_status in (_INTRANS, _INERROR):
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
        self._names: list[str] = []

    def _forget(self) -> None:
        """The connection was reset or closed under this cursor: it no longer exists."""
        self._closed = True
        self._conn._cursors.pop(self._slot, None)

    def columns(self) -> list[str]:
        """The column names of this result (known once the first batch came)."""
        return list(self._names)

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
            if not self._names:
                self._names = self._conn.columns()
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
