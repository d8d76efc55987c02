"""asyncpg hosted through trio-asyncio: :class:`AsyncpgDriver`, :class:`AsyncpgConnection`.

Why: asyncpg is an asyncio library; this makes it an :mod:`actors.driver` driver for Trio. The
call discipline, loop and recovery are in :mod:`actors.aio.base` and :mod:`actors.aio.loop`;
this module is the asyncpg part: statuses, errors, cursors, prepared statements.

Rules: placeholders are asyncpg's (``$1``, ``$2``...), so parameters are a sequence (a mapping
is refused with a DatabaseError before any I/O). Transactions are plain SQL (``BEGIN`` ...):
asyncpg's own ``transaction()`` object is not used, so its bookkeeping never disagrees with
the pool's. The transaction status comes from asyncpg's protocol (``is_in_transaction()``) and
"failed transaction" is tracked here: a server error inside a transaction block aborts it; any
successful statement proves it is not aborted (only ROLLBACK [TO SAVEPOINT] succeeds then).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import trio

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

__all__ = ["AsyncpgConnection", "AsyncpgCursor", "AsyncpgDriver", "from_url"]

_FALLBACK_APPLICATION_NAME = "trio-connection-supervisor"
_MAX_PREPARED = 256
# Refusals a retry cannot fix (the rest of connect's failures are ConnectionLost).
_REFUSED_SQLSTATES = frozenset({"28P01", "28000", "3D000", "42501"})


def _args(params: Params) -> tuple[Any, ...]:
    if params is None:
        return ()
    if isinstance(params, Mapping):
        raise DatabaseError(
            "asyncpg takes positional parameters ($1, $2, ...): pass a sequence, not a mapping"
        )
    if isinstance(params, str | bytes):
        raise DatabaseError("parameters must be a sequence of values, not a string")
    return tuple(params)


def _rowcount(status: str | None) -> int:
    """Rows affected from a command tag: 'INSERT 0 3' -> 3, 'UPDATE 2' -> 2, 'BEGIN' -> -1."""
    if not status:
        return -1
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else -1


def _password_of(dsn: str) -> str | None:
    if "://" not in dsn:
        return None
    try:
        parts = urlsplit(dsn)
        password = parts.password
    except ValueError:
        return None
    if not password:
        for key, value in parse_qsl(parts.query):
            if key == "password":
                return value
    return password


def _redacted_dsn(dsn: str) -> str:
    password = _password_of(dsn)
    return redact(dsn, [password] if password else [])


class AsyncpgDriver(AioDriverBase):
    """asyncpg connections on a trio-asyncio loop (``actors.driver.Driver``).

    ``target`` is an asyncpg DSN (``postgresql://user:password@host:port/db?...``);
    ``options`` are :func:`asyncpg.connect` keyword arguments (``password=``,
    ``statement_cache_size=``, ``server_settings=``, ``timeout=`` ...) that override it. The
    repr never shows the password.
    """

    def __init__(self, target: str = "", **options: Any) -> None:
        super().__init__()
        if not isinstance(target, str):
            raise ValueError(f"target must be a DSN string, got {type(target).__name__}")
        self._options: dict[str, Any] = {"dsn": target or None, **options}

    @property
    def options(self) -> dict[str, Any]:
        """The :func:`asyncpg.connect` arguments (a fresh copy; may contain the password)."""
        return dict(self._options)

    def secrets(self, options: Mapping[str, Any]) -> list[str]:
        """The password(s) in ``options`` (the keyword and the DSN's) and ``PGPASSWORD``."""
        found = [str(options["password"])] if options.get("password") else []
        dsn = options.get("dsn")
        if isinstance(dsn, str):
            password = _password_of(dsn)
            if password:
                found.append(password)
        env = os.environ.get("PGPASSWORD")
        if env:
            found.append(env)
        return found

    def __repr__(self) -> str:
        shown: list[str] = []
        for key, value in self._options.items():
            if key == "dsn":
                shown.insert(0, repr(_redacted_dsn(value)) if value else "''")
            elif key == "password":
                shown.append("password='***'")
            else:
                shown.append(f"{key}={value!r}")
        return f"AsyncpgDriver({', '.join(shown)})"

    async def connect(self, options: Mapping[str, Any]) -> AsyncpgConnection:
        """Open a connection. ConnectionLost when the server cannot be reached (or is starting,
        stopping, full); DatabaseError for a refusal (bad password, unknown role or database).
        """
        params = {k: v for k, v in options.items() if v is not None}
        dsn = params.get("dsn") or ""
        settings = dict(params.get("server_settings") or {})
        if "application_name" not in settings and "application_name=" not in dsn:
            settings["application_name"] = _FALLBACK_APPLICATION_NAME
            params["server_settings"] = settings
        secrets = self.secrets(options)
        lease = await self._host.acquire()
        try:
            call = Call(lease.loop, asyncpg.connect(**params), late=lambda raw: raw.terminate())
            raw = await call.wait()
        except BaseException as exc:
            lease.release()
            if isinstance(exc, Exception):
                raise _connect_failure(exc, secrets) from None
            raise
        conn = AsyncpgConnection(lease, raw, secrets)
        self._track(conn)
        return conn


def _connect_failure(exc: BaseException, secrets: Sequence[str]) -> Exception:
    exc = leaf(exc)
    message = redact(str(exc).strip() or type(exc).__name__, secrets)
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(exc, asyncpg.PostgresError) and sqlstate in _REFUSED_SQLSTATES:
        return DatabaseError(message, sqlstate=sqlstate, kind="other")
    return ConnectionLost(f"asyncpg: cannot connect: {message}")


class AsyncpgConnection(AioConnection):
    """One asyncpg connection hosted on a trio-asyncio loop (``actors.driver.Connection``)."""

    label = "asyncpg"

    def __init__(self, lease: LoopLease, raw: Any, secrets: Sequence[str]) -> None:
        super().__init__(lease, secrets)
        self._raw = raw
        self._failed = False
        self._prepared: OrderedDict[str, Any] = OrderedDict()
        self._cursors: dict[int, AsyncpgCursor] = {}
        self.backend_pid: int = int(raw.get_server_pid())
        """The server process id of this session (for pg_stat_activity)."""
        self._columns: list[str] = []

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.status()
        return f"<AsyncpgConnection pid={self.backend_pid} {state}>"

    # -- the library part

    def _raw_closed(self) -> bool:
        return bool(self._raw.is_closed())

    def _status(self) -> Status:
        raw = self._raw
        if raw.is_closed():
            return "unknown"
        if not raw.is_in_transaction():
            self._failed = False
            return "idle"
        return "error" if self._failed else "transaction"

    def _observe(self, error: BaseException | None) -> None:
        if error is None:
            self._failed = False
        elif isinstance(error, asyncpg.PostgresError) and getattr(error, "severity", None):
            # A server error (client-side checks have no severity) aborts the transaction.
            self._failed = bool(not self._raw.is_closed() and self._raw.is_in_transaction())

    def _translate(self, exc: BaseException) -> Exception:
        if self._raw.is_closed():
            return self._lost(exc)
        if isinstance(exc, asyncpg.PostgresError):
            sqlstate = getattr(exc, "sqlstate", None)
            if is_lost_sqlstate(sqlstate):
                return self._lost(exc)
            return DatabaseError(self._message(exc), sqlstate=sqlstate, kind=error_kind(sqlstate))
        if isinstance(exc, asyncpg.InterfaceError):
            text = str(exc)
            if "another operation is in progress" in text or "connection is closed" in text:
                return self._lost(exc)
            return DatabaseError(self._message(exc))  # e.g. a wrong number of arguments
        if isinstance(exc, OSError | TimeoutError | EOFError):
            return self._lost(exc)
        if isinstance(exc, ValueError | TypeError | OverflowError):
            return DatabaseError(self._message(exc))  # an argument asyncpg cannot encode
        return self._lost(exc)

    def _interrupt(self) -> None:
        self._loop.call_soon(self._raw.terminate)

    async def _close_raw(self, busy: bool) -> None:
        raw = self._raw
        if not busy and not raw.is_closed():
            try:
                with trio.move_on_after(1.0):
                    await self._run_raw(lambda: raw.close(timeout=1.0))
            except Exception:
                pass
        if not raw.is_closed():
            done = trio.Event()

            def terminate() -> None:
                try:
                    raw.terminate()
                finally:
                    done.set()

            try:
                self._loop.call_soon(terminate)
            except RuntimeError:  # the loop is closed: the transport went with it
                return
            await done.wait()

    def _forget_cursors(self) -> None:
        for cursor in list(self._cursors.values()):
            cursor._forget()

    async def _rollback_raw(self) -> None:
        raw = self._raw
        await self._run(lambda: raw.execute("ROLLBACK"))

    async def _sql(self, query: str) -> str:
        raw = self._raw
        status: str = await self._run(lambda: raw.execute(query))
        return status

    # -- queries

    async def ping(self) -> None:
        """``select 1`` (in a failed transaction the server's refusal proves it alive too)."""
        try:
            await self._sql("select 1")
        except DatabaseError:
            pass

    async def execute(self, query: str, params: Params = None) -> int:
        """Run a statement; rows affected from its command tag (-1 when it has none)."""
        args = _args(params)
        raw = self._raw
        stmt = self._statement(query)
        if stmt is not None:

            async def run_prepared() -> str:
                await stmt.fetch(*args)
                result: str = stmt.get_statusmsg()
                return result

            return _rowcount(await self._prepared_call(query, run_prepared))
        return _rowcount(await self._run(lambda: raw.execute(query, *args)))

    async def fetch(self, query: str, params: Params = None) -> list[Row]:
        """Run a query and return its rows as tuples."""
        args = _args(params)
        raw = self._raw
        stmt = self._statement(query)
        if stmt is not None:
            records = await self._prepared_call(query, lambda: stmt.fetch(*args))
        else:
            records = await self._run(lambda: raw.fetch(query, *args))
        self._columns = list(records[0].keys()) if records else []
        return [tuple(record) for record in records]

    # -- optional protocol methods (actors.driver.Connection)

    paramstyle = "numeric"
    """asyncpg's placeholders: ``$1``, ``$2``, ..."""

    def columns(self) -> list[str]:
        """The column names of the last ``fetch`` that returned rows."""
        return list(self._columns)

    def leaves_session_state(self, query: str) -> bool:
        """Whether ``query`` may leave session state (see :mod:`actors.pgsql`)."""
        return _leaves_state(query)

    async def reset_session(self) -> None:
        """``DISCARD ALL``, then forget every statement prepared on this connection (ours and
        asyncpg's own cache: the server no longer has them)."""
        raw = self._raw
        await self._run(lambda: raw.execute(RESET_SQL))
        self._prepared.clear()
        drop = getattr(raw, "_drop_local_statement_cache", None)  # asyncpg's own cache
        if drop is not None:
            drop()

    def _statement(self, query: str) -> Any:
        stmt = self._prepared.get(query)
        if stmt is not None:
            self._prepared.move_to_end(query)
        return stmt

    async def _prepared_call(self, query: str, make: Any) -> Any:
        try:
            return await self._run(make)
        except DatabaseError as exc:
            if exc.sqlstate in ("26000", "0A000") or "prepared statement" in exc.message:
                self._prepared.pop(query, None)  # deallocated (DISCARD ALL) or invalidated
            raise

    async def prepare(self, query: str) -> None:
        """Prepare ``query`` (one round trip) and use that statement for later executions of
        the same text on this connection (bounded, least recently used dropped)."""
        raw = self._raw
        stmt = await self._run(lambda: raw.prepare(query))
        self._prepared[query] = stmt
        self._prepared.move_to_end(query)
        while len(self._prepared) > _MAX_PREPARED:
            self._prepared.popitem(last=False)

    async def open_cursor(self, query: str, params: Params, batch_size: int) -> AsyncpgCursor:
        """Stream through an asyncpg cursor (a protocol-level portal, ``batch_size`` rows per
        round trip). Portals live in a transaction: outside one, the cursor opens its own and
        its close (also when the last batch is read) commits it, or rolls it back if it failed.
        Inside the caller's transaction the portal ends with that transaction."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        args = _args(params)
        raw = self._raw
        own_tx = self.status() == "idle"
        if own_tx:
            await self._sql("BEGIN")

        async def open_portal() -> Any:
            return await raw.cursor(query, *args)

        try:
            portal = await self._run(open_portal)
        except DatabaseError:
            if own_tx:
                await self._sql("ROLLBACK")
            raise
        slot = 0
        while slot in self._cursors:
            slot += 1
        cursor = AsyncpgCursor(self, slot, portal, batch_size, own_tx)
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
        await self._sql(sql)

    async def commit(self) -> None:
        """``COMMIT``. A failed transaction is rolled back and reported (SQLSTATE 25P02)."""
        if self.status() == "idle":
            await trio.lowlevel.checkpoint()
            return
        failed = self.status() == "error"
        tag = await self._sql("COMMIT")
        if failed or tag == "ROLLBACK":
            raise DatabaseError(
                "COMMIT of a failed transaction: it was rolled back", sqlstate="25P02"
            )

    async def rollback(self) -> None:
        """``ROLLBACK``."""
        await self._sql("ROLLBACK")

    async def savepoint(self, name: str) -> None:
        """``SAVEPOINT "name"``."""
        await self._sql(f"SAVEPOINT {quote_ident(name)}")

    async def release(self, name: str) -> None:
        """``RELEASE SAVEPOINT "name"``."""
        await self._sql(f"RELEASE SAVEPOINT {quote_ident(name)}")

    async def rollback_to(self, name: str) -> None:
        """``ROLLBACK TO SAVEPOINT "name"`` (the savepoint stays)."""
        await self._sql(f"ROLLBACK TO SAVEPOINT {quote_ident(name)}")


class AsyncpgCursor:
    """A streaming result from :meth:`AsyncpgConnection.open_cursor` (``actors.driver.Cursor``)."""

    def __init__(
        self, conn: AsyncpgConnection, slot: int, portal: Any, batch_size: int, own_tx: bool
    ) -> None:
        self._conn = conn
        self._slot = slot
        self._portal = portal
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
        self._portal = None
        self._conn._cursors.pop(self._slot, None)

    async def fetch_batch(self) -> list[Row]:
        """The next ``batch_size`` rows at most; [] once the result is exhausted."""
        if self._exhausted:
            await trio.lowlevel.checkpoint()
            return []
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise DatabaseError("the cursor is closed", sqlstate="34000")
        portal, n = self._portal, self._batch_size
        records = await self._conn._run(lambda: portal.fetch(n))
        if records and not self._names:
            self._names = list(records[0].keys())
        batch = [tuple(record) for record in records]
        if len(batch) < n:
            self._exhausted = True
            await self.close()
        return batch

    async def close(self) -> None:
        """Release the cursor; end the transaction it opened (COMMIT, or ROLLBACK if failed)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._forget()
        conn = self._conn
        status = conn.status()
        if self._own_tx and status == "transaction":
            await conn._sql("COMMIT")
        elif self._own_tx and status == "error":
            await conn._sql("ROLLBACK")
        else:
            await trio.lowlevel.checkpoint()


def from_url(url: str, **options: Any) -> AsyncpgDriver:
    """An :class:`AsyncpgDriver` for a ``postgresql+asyncpg://`` URL (the rest is asyncpg's
    DSN). Raises ValueError, without echoing the URL, for another scheme."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("postgresql+asyncpg", "postgres+asyncpg"):
        raise ValueError(
            f"not an asyncpg URL (scheme {scheme or '(none)'!r}); use postgresql+asyncpg://"
        )
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"invalid PostgreSQL URL: {exc}") from None
    return AsyncpgDriver(urlunsplit(parts._replace(scheme="postgresql")), **options)
