"""psycopg's own asyncio connection hosted through trio-asyncio: :class:`AsyncPsycopgDriver`.

Why: the reference point for the Trio-native :mod:`actors.psycopg` (same library, asyncio I/O
on a trio-asyncio loop), and a fallback that uses public psycopg API only. The call discipline,
loop and recovery are in :mod:`actors.aio.base`; this is the psycopg part.

Rules: autocommit connections; transactions are the explicit protocol calls. Placeholders are
psycopg's (``%s``, ``%(name)s``). The transaction status is libpq's, read without I/O.
A cancelled call's asyncio task runs psycopg's own cleanup (server-side cancel, then drain),
which :meth:`~actors.aio.base.AioConnection.reset` waits for.
"""

from __future__ import annotations

import os
import re
import socket
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
import trio
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from actors.aio.base import (
    AioConnection,
    AioDriverBase,
    begin_sql,
    error_kind,
    is_lost_sqlstate,
    quote_ident,
)
from actors.aio.loop import Call, LoopLease, leaf
from actors.driver import (
    ConnectionLost,
    DatabaseError,
    Params,
    Row,
    Status,
    TransactionOptions,
    redact,
)
from actors.pgsql import RESET_SQL
from actors.pgsql import leaves_session_state as _leaves_state
from actors.psycopg.seam import forget_prepared

__all__ = ["AsyncPsycopgConnection", "AsyncPsycopgCursor", "AsyncPsycopgDriver"]

_FALLBACK_APPLICATION_NAME = "trio-connection-supervisor"
_SECRET_KEYS = ("password", "sslpassword")
_MAX_PREPARED_TEXTS = 256
_STATUS: dict[int, Status] = {
    pq.TransactionStatus.IDLE: "idle",
    pq.TransactionStatus.INTRANS: "transaction",
    pq.TransactionStatus.INERROR: "error",
}
_CONNECT_REFUSALS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"password authentication failed|no password supplied", re.I), "28P01"),
    (re.compile(r'database ".*" does not exist', re.I), "3D000"),
    (re.compile(r'role ".*" does not exist', re.I), "28000"),
    (re.compile(r"no pg_hba\.conf entry|authentication failed", re.I), "28000"),
    (re.compile(r"permission denied for database", re.I), "42501"),
)

AsyncConn = psycopg.AsyncConnection[TupleRow]
Result = tuple[int, list[Row] | None, str | None]


def _connect_failure(exc: BaseException, secrets: Sequence[str]) -> Exception:
    exc = leaf(exc)
    message = redact(str(exc).strip() or type(exc).__name__, secrets)
    for pattern, sqlstate in _CONNECT_REFUSALS:
        if pattern.search(message):
            return DatabaseError(message, sqlstate=sqlstate, kind="other")
    return ConnectionLost(f"psycopg-async: cannot connect: {message}")


_FORGETS_PREPARED = frozenset({"DISCARD ALL", "DEALLOCATE ALL"})


class AsyncPsycopgDriver(AioDriverBase):
    """psycopg ``AsyncConnection`` on a trio-asyncio loop (``actors.driver.Driver``).

    ``target`` is a libpq connection string or URL; ``options`` are libpq parameters that
    override it, plus ``prepare_threshold`` (psycopg's, default 5; None never prepares).
    The repr never shows the password.
    """

    def __init__(
        self, target: str = "", *, prepare_threshold: int | None = 5, **options: Any
    ) -> None:
        super().__init__()
        try:
            params = conninfo_to_dict(target, **options)
        except psycopg.Error as exc:
            secrets = [str(options[k]) for k in _SECRET_KEYS if options.get(k)]
            raise ValueError(
                f"invalid PostgreSQL connection string: {redact(str(exc), secrets)}"
            ) from None
        self._options: dict[str, Any] = dict(params)
        self.prepare_threshold = prepare_threshold
        """psycopg's auto-prepare threshold for new connections (None: never prepare)."""

    @property
    def options(self) -> dict[str, Any]:
        """The libpq connection parameters (a fresh copy; may contain the password)."""
        return dict(self._options)

    def secrets(self, options: Mapping[str, Any]) -> list[str]:
        """The password(s) in ``options`` (and ``PGPASSWORD``)."""
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
        return f"AsyncPsycopgDriver({shown!r}, prepare_threshold={self.prepare_threshold!r})"

    async def connect(self, options: Mapping[str, Any]) -> AsyncPsycopgConnection:
        """Open an autocommit connection; ConnectionLost when the server cannot be reached,
        DatabaseError (28P01 / 28000 / 3D000 / 42501) when it refuses."""
        params = {k: v for k, v in options.items() if v is not None}
        if "application_name" not in params and "fallback_application_name" not in params:
            params["fallback_application_name"] = _FALLBACK_APPLICATION_NAME
        conninfo = make_conninfo("", **params)
        secrets = self.secrets(options)
        threshold = self.prepare_threshold
        lease = await self._host.acquire()

        async def open_connection() -> AsyncConn:
            return await psycopg.AsyncConnection.connect(
                conninfo, autocommit=True, prepare_threshold=threshold
            )

        def late(raw: AsyncConn) -> None:
            raw.pgconn.finish()  # landed after its caller left: nobody will use it (no I/O)

        try:
            raw = await Call(lease.loop, open_connection(), late=late).wait()
        except BaseException as exc:
            lease.release()
            if isinstance(exc, Exception):
                raise _connect_failure(exc, secrets) from None
            raise
        conn = AsyncPsycopgConnection(lease, raw, secrets)
        self._track(conn)
        return conn


class AsyncPsycopgConnection(AioConnection):
    """One psycopg ``AsyncConnection`` hosted on a trio-asyncio loop."""

    label = "psycopg-async"

    def __init__(self, lease: LoopLease, raw: AsyncConn, secrets: Sequence[str]) -> None:
        super().__init__(lease, secrets)
        self._raw = raw
        self._prepared: OrderedDict[str, None] = OrderedDict()
        self._cursors: dict[int, AsyncPsycopgCursor] = {}
        self.backend_pid: int = int(raw.info.backend_pid)
        """The server process id of this session (for pg_stat_activity)."""
        self._description: Any = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.status()
        return f"<AsyncPsycopgConnection pid={self.backend_pid} {state}>"

    # -- the library part

    def _raw_closed(self) -> bool:
        return bool(self._raw.closed) or self._raw.info.status == pq.ConnStatus.BAD

    def _status(self) -> Status:
        if self._raw_closed():
            return "unknown"
        return _STATUS.get(self._raw.info.transaction_status, "unknown")

    def _translate(self, exc: BaseException) -> Exception:
        if not isinstance(exc, psycopg.Error):
            if isinstance(exc, OSError):
                return self._lost(exc)
            return self._lost(exc) if self._raw_closed() else DatabaseError(self._message(exc))
        sqlstate = exc.sqlstate
        if self._raw_closed() or is_lost_sqlstate(sqlstate):
            return self._lost(exc)
        if sqlstate is None and isinstance(exc, psycopg.OperationalError):
            return self._lost(exc)
        if self._raw.info.transaction_status == pq.TransactionStatus.ACTIVE:
            return self._lost(exc)  # left mid-protocol (a COPY through execute): replace it
        return DatabaseError(self._message(exc), sqlstate=sqlstate, kind=error_kind(sqlstate))

    def _interrupt(self) -> None:
        # Shut the socket down: the call's pending read sees EOF and fails at once. The fd
        # stays open (libpq owns it) until close_raw finishes the connection.
        try:
            fd = self._raw.pgconn.socket
            dup = socket.socket(fileno=os.dup(fd))
        except (OSError, psycopg.Error):
            return
        try:
            dup.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            dup.close()

    async def _close_raw(self, busy: bool) -> None:
        raw = self._raw
        if raw.closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._run_raw(raw.close)
        except Exception:
            pass

    def _forget_cursors(self) -> None:
        for cursor in list(self._cursors.values()):
            cursor._forget()

    async def _rollback_raw(self) -> None:
        await self._run(self._raw.rollback)

    async def _exec(self, query: str, params: Params, prepare: bool | None, rows: bool) -> Result:
        raw = self._raw

        async def op() -> Result:
            cur = raw.cursor()
            await cur.execute(query, params, prepare=prepare)
            got = await cur.fetchall() if rows and cur.description is not None else None
            if got is not None:
                self._description = cur.description
            if cur.statusmessage in _FORGETS_PREPARED:
                forget_prepared(raw)  # the server dropped them: psycopg may not have noticed
                self._prepared.clear()
            return cur.rowcount, got, cur.statusmessage

        return await self._run(op)

    def _prepare_flag(self, query: str) -> bool | None:
        if query in self._prepared:
            self._prepared.move_to_end(query)
            return True
        return None

    # -- queries

    async def ping(self) -> None:
        """An empty query (one round trip, valid in any transaction state)."""
        try:
            await self._exec("", None, False, False)
        except DatabaseError as exc:
            raise self._lost(exc) from exc

    async def execute(self, query: str, params: Params = None) -> int:
        """Run a statement; rows affected (-1 when the server does not say)."""
        rowcount, _, _ = await self._exec(query, params, self._prepare_flag(query), False)
        return rowcount

    async def fetch(self, query: str, params: Params = None) -> list[Row]:
        """Run a query and return its rows as tuples."""
        _, rows, _ = await self._exec(query, params, self._prepare_flag(query), True)
        return rows if rows is not None else []

    # -- optional protocol methods (actors.driver.Connection)

    paramstyle = "format"
    """psycopg's placeholders: ``%s``, or ``%(name)s`` with a mapping."""

    def columns(self) -> list[str]:
        """The column names of the last result with rows."""
        return [column.name for column in self._description or ()]

    def leaves_session_state(self, query: str) -> bool:
        """Whether ``query`` may leave session state (see :mod:`actors.pgsql`)."""
        return _leaves_state(query)

    async def reset_session(self) -> None:
        """``DISCARD ALL``; psycopg and this connection then forget every prepared statement
        (:func:`actors.psycopg.seam.forget_prepared`: psycopg alone notices only sometimes)."""
        await self._exec(RESET_SQL, None, False, False)
        forget_prepared(self._raw)
        self._prepared.clear()

    async def prepare(self, query: str) -> None:
        """Mark ``query`` for psycopg's server-side preparation on its next execution."""
        await trio.lowlevel.checkpoint()
        self._prepared[query] = None
        self._prepared.move_to_end(query)
        while len(self._prepared) > _MAX_PREPARED_TEXTS:
            self._prepared.popitem(last=False)

    async def open_cursor(
        self, query: str, params: Params, batch_size: int
    ) -> AsyncPsycopgCursor:
        """``DECLARE`` / ``FETCH FORWARD n``, as :class:`actors.psycopg.PsycopgConnection`: the
        cursor opens (and its close ends) a transaction when none is open."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        own_tx = self.status() == "idle"
        if own_tx:
            await self._exec("BEGIN", None, False, False)
        slot = 0
        while slot in self._cursors:
            slot += 1
        name = quote_ident(f"_tcs_cursor_{slot}")
        body = query.rstrip().rstrip(";")
        try:
            await self._exec(f"DECLARE {name} NO SCROLL CURSOR FOR {body}", params, False, False)
        except DatabaseError:
            if own_tx:
                await self._exec("ROLLBACK", None, False, False)
            raise
        cursor = AsyncPsycopgCursor(self, slot, name, batch_size, own_tx)
        self._cursors[slot] = cursor
        return cursor

    # -- transactions

    async def begin(self, options: TransactionOptions) -> None:
        """``BEGIN [ISOLATION LEVEL ...] [READ ONLY] [[NOT] DEFERRABLE]``; DatabaseError 25001
        when a transaction is already open."""
        sql = begin_sql(options)
        if self.status() in ("transaction", "error"):
            await trio.lowlevel.checkpoint()
            raise DatabaseError("a transaction is already in progress", sqlstate="25001")
        await self._exec(sql, None, False, False)

    async def commit(self) -> None:
        """``COMMIT``. A failed transaction is rolled back and reported (SQLSTATE 25P02)."""
        if self.status() == "idle":
            await trio.lowlevel.checkpoint()
            return
        failed = self.status() == "error"
        _, _, tag = await self._exec("COMMIT", None, False, False)
        if failed or tag == "ROLLBACK":
            raise DatabaseError(
                "COMMIT of a failed transaction: it was rolled back", sqlstate="25P02"
            )

    async def rollback(self) -> None:
        """psycopg's ``rollback()`` (protocol-aware)."""
        await self._rollback_raw()

    async def savepoint(self, name: str) -> None:
        """``SAVEPOINT "name"``."""
        await self._exec(f"SAVEPOINT {quote_ident(name)}", None, False, False)

    async def release(self, name: str) -> None:
        """``RELEASE SAVEPOINT "name"``."""
        await self._exec(f"RELEASE SAVEPOINT {quote_ident(name)}", None, False, False)

    async def rollback_to(self, name: str) -> None:
        """``ROLLBACK TO SAVEPOINT "name"`` (the savepoint stays)."""
        await self._exec(f"ROLLBACK TO SAVEPOINT {quote_ident(name)}", None, False, False)


class AsyncPsycopgCursor:
    """A server-side cursor from :meth:`AsyncPsycopgConnection.open_cursor`."""

    def __init__(
        self, conn: AsyncPsycopgConnection, slot: int, name: str, batch_size: int, own_tx: bool
    ) -> None:
        self._conn = conn
        self._slot = slot
        self._name = name
        self._batch_size = batch_size
        self._own_tx = own_tx
        self._closed = False
        self._exhausted = False
        self._names: list[str] = []

    def columns(self) -> list[str]:
        """The column names of this result (known once the first batch came)."""
        return list(self._names)

    def _forget(self) -> None:
        self._closed = True
        self._conn._cursors.pop(self._slot, None)

    async def fetch_batch(self) -> list[Row]:
        """The next ``batch_size`` rows at most; [] once the result is exhausted."""
        if self._exhausted:
            await trio.lowlevel.checkpoint()
            return []
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise DatabaseError("the cursor is closed", sqlstate="34000")
        _, rows, _ = await self._conn._exec(
            f"FETCH FORWARD {self._batch_size} FROM {self._name}", None, False, True
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
            await trio.lowlevel.checkpoint()
            return
        self._forget()
        conn = self._conn
        status = conn.status()
        if self._own_tx and status == "transaction":
            await conn._exec("COMMIT", None, False, False)
        elif self._own_tx and status == "error":
            await conn._exec("ROLLBACK", None, False, False)
        elif not self._own_tx and status == "transaction":
            await conn._exec(f"CLOSE {self._name}", None, False, False)
        else:
            await trio.lowlevel.checkpoint()
