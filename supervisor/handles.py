"""Connection and Transaction handles: what a client holds inside ``async with``.

A handle is a thin view on a :class:`Session` (the lease plus its transaction state). Every
database call goes through :meth:`Session.call`, which is where the rules live:

* a handle is usable only inside its block (``PoolError`` after), by one task at a time
  (``PoolError`` when two tasks overlap: protocol messages are never interleaved);
* a revoked lease (hold deadline, ``kill()``, shutdown) raises ``ConnectionLost``;
* a failed transaction raises ``TransactionFailed`` without touching the database;
* a call cancelled midway marks the lease *interrupted*: nothing more is sent by the client; the
  actor cancels and drains it in its own task once the lease is returned (or, if the client
  caught the cancellation and goes on, the next call recovers first, bounded);
* driver errors become ``QueryError`` (and subclasses) or ``ConnectionLost``, naming the pool.

Transactions follow DBConnection's flat rule by default (a nested block issues no SQL and
poisons the whole transaction if it fails) and crystal-db's savepoints on request.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeVar

import trio

from actors import driver as drv
from actors.actor import Actor, Lease, restore_idle
from actors.messages import Kill
from supervisor.errors import (
    CardinalityError,
    ConfigError,
    ConnectionLost,
    IntegrityError,
    PoolError,
    QueryError,
    QueryTimeout,
    Rollback,
    SerializationFailure,
    TransactionFailed,
)
from supervisor.log import LogEntry, emit

if TYPE_CHECKING:
    from supervisor.pool import Pool

__all__ = ["Connection", "PreparedStatement", "Stream", "Transaction"]

T = TypeVar("T")
Status = Literal["idle", "transaction", "error"]
_SERIALIZATION_STATES = frozenset({"40001", "40P01"})


def _short(query: str, limit: int = 200) -> str:
    query = " ".join(query.split())
    return query if len(query) <= limit else query[: limit - 3] + "..."


class _TxScope:
    """One transaction level that can fail on its own: the outermost transaction or a savepoint.
    Flat nested blocks share the scope of the level they are nested in."""

    __slots__ = ("failed", "reason", "savepoint")

    def __init__(self, savepoint: str | None) -> None:
        self.savepoint = savepoint
        self.failed = False
        self.reason = ""

    def fail(self, reason: str) -> None:
        if not self.failed:
            self.failed = True
            self.reason = reason


class Session(Lease):
    """A lease as the pool sees it: owner task, transaction scopes, open streams."""

    __slots__ = (
        "checkout_wait",
        "guarded",
        "needs_reset",
        "pool",
        "savepoints",
        "scopes",
        "streams",
        "task",
    )

    def __init__(
        self, pool: Pool, actor: Actor, conn: drv.Connection, generation: int,
        task: trio.lowlevel.Task | None,
    ) -> None:
        super().__init__(actor, conn, generation)
        self.pool = pool
        self.task = task
        self.scopes: list[_TxScope] = []
        self.savepoints = 0
        self.streams: set[Stream] = set()
        self.needs_reset = False
        self.checkout_wait = 0.0
        # Calls run under their own cancel scope only when a deadline may cut them short.
        limits = pool.limits
        self.guarded = limits.hold_timeout is not None or limits.query_timeout is not None

    # -- state checks ----------------------------------------------------------------------

    def clean(self) -> bool:
        """Whether the connection can go straight back to the idle set (no actor work)."""
        return not (
            self.interrupted
            or self.broken
            or self.needs_reset
            or self.streams
            or self.killed
            or self.actor.retire
            or self.conn.status() != "idle"
        )

    def _lost(self, why: str | None = None) -> ConnectionLost:
        reason = self.revoked or why or "the connection was lost"
        return ConnectionLost(reason, pool=self.pool.name)

    def _enter(self) -> None:
        """Checks before any call: revoked, concurrent use."""
        if self.revoked is not None:
            raise self._lost()
        if self.op_task is not None:
            raise PoolError(
                "a connection handle was used by two tasks at once "
                f"(task {self.op_task.name!r} is running a call on it); give each task its own "
                "handle (pool.run() in that task)",
                pool=self.pool.name,
            )

    def fail_all(self, reason: str) -> None:
        for scope in self.scopes:
            scope.fail(reason)

    def kill(self, reason: str, why: str) -> None:
        """Take the connection away for good: revoke the lease (later calls, and a call in
        flight, get ``ConnectionLost`` with ``reason``) and have the actor replace it."""
        self.killed = True
        self.revoke(reason)
        self.actor.send(Kill(why, self.generation))

    def set_hold_deadline(self, deadline: float) -> None:
        """Move the hold deadline; calls now run under a cancel scope so it can be enforced."""
        self.hold_deadline = deadline
        self.guarded = True
        self.actor.poke(deadline)

    # -- the one place where client I/O happens ------------------------------------------------

    async def call(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        query: str | None = None,
        params: drv.Params = None,
        check_failed: bool = True,
        oneshot: bool = False,
    ) -> T:
        """Run one driver call in the caller's task, with every rule of the module docstring."""
        self._enter()
        if check_failed and self.scopes and self.scopes[-1].failed:
            await trio.lowlevel.checkpoint()
            raise TransactionFailed(
                f"transaction is failed ({self.scopes[-1].reason}); it can only be rolled back; "
                f"refusing to run {name}" + (f": {_short(query)}" if query else ""),
                pool=self.pool.name,
            )
        pool = self.pool
        self.op_task = trio.lowlevel.current_task()
        started = time.perf_counter() if pool.log_hook is not None else 0.0
        error: BaseException | None = None
        result: Any = None
        try:
            if self.interrupted or self.needs_reset:
                # Inside the guarded region: another task cannot start a call meanwhile.
                await self.recover_inline()
            if not self.guarded:
                # Hot path: no deadline can fire during this call. A revocation (shutdown) then
                # relies on the driver's kill-safe close(), which fails the call promptly.
                result = await fn(*args)
                return result  # type: ignore[no-any-return]
            with trio.CancelScope() as scope:
                self.op_scope = scope
                timeout = pool.limits.query_timeout
                if timeout is not None:
                    scope.deadline = trio.current_time() + timeout
                result = await fn(*args)
            if scope.cancelled_caught:
                # Our own scope was cancelled: revocation, or the query timeout.
                self.interrupted = True
                self.fail_all(f"{name} was interrupted")
                if self.revoked is not None:
                    raise self._lost()
                pool.stats_query_timeouts += 1
                raise QueryTimeout(
                    f"{name} took longer than query_timeout={timeout}s and was "
                    "cancelled" + (f": {_short(query)}" if query else ""),
                    pool=pool.name,
                )
            return result  # type: ignore[no-any-return]
        except trio.Cancelled as exc:
            self.interrupted = True
            self.fail_all(f"{name} was cancelled")
            error = exc
            raise
        except drv.ConnectionLost as exc:
            error = exc
            if isinstance(exc, ConnectionLost):
                raise
            self.broken = True
            if self.revoked is not None:
                raise self._lost() from exc
            self.fail_all("the connection was lost")
            raise self._lost(
                pool.scrub(f"connection lost during {name}: {exc}")
            ) from exc
        except drv.DatabaseError as exc:
            error = _query_error(pool, exc, query)
            if self.scopes and self.conn.status() == "idle":
                # The database ended the transaction by itself (SQLite does, for some errors):
                # later statements would autocommit. Nothing more may run in this transaction.
                self.fail_all("the database rolled the transaction back after an error")
            raise error from (exc.__cause__ or exc)
        except (ValueError, TypeError) as exc:
            if self.conn.status() == "unknown":
                error = exc
                self.broken = True
                self.fail_all(f"{name} failed unexpectedly")
                raise
            # Refused before any I/O (a bad isolation level, mode or parameter): the
            # connection is untouched and stays usable.
            error = ConfigError(pool.scrub(f"{name} refused its arguments: {exc}"),
                                pool=pool.name)
            raise error from exc
        except BaseException as exc:
            error = exc
            if not isinstance(exc, PoolError):
                # Unknown failure inside the driver: protocol state unknown, replace the connection.
                self.broken = True
                self.fail_all(f"{name} failed unexpectedly")
            raise
        finally:
            self.op_finished()
            if pool.log_hook is not None:
                emit(
                    pool.log_hook,
                    LogEntry(
                        pool=pool.name,
                        call=name,
                        connection=self.actor.index,
                        query=query,
                        params=pool.log_params_of(params),
                        pool_time=self.checkout_wait if oneshot else None,
                        connection_time=time.perf_counter() - started,
                        result=_result_size(result) if error is None else None,
                        error=pool.safe_error(error),
                    ),
                )

    async def recover_inline(self) -> None:
        """The client caught a cancellation (or a query timeout) and goes on using the lease:
        cancel and drain what was interrupted, roll back what was open, bounded; the transaction,
        if any, is failed."""
        self.fail_all("an interrupted call forced a rollback")
        try:
            clean = await restore_idle(
                self.conn, interrupted=self.interrupted, timeout=self.pool.limits.cleanup_timeout
            )
        except drv.ConnectionLost as exc:
            self.broken = True
            raise self._lost(self.pool.scrub(f"recovery after an interrupted call: {exc}")) from exc
        if not clean:
            self.broken = True
            raise self._lost("the connection could not be recovered after an interrupted call")
        self.interrupted = False
        self.needs_reset = False

    async def cleanup(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """A rollback on an exception exit path, bounded by ``cleanup_timeout``.

        Deliberately not shielded: if a cancellation arrives now, the call is interrupted, the
        lease is marked dirty and the actor finishes the rollback in its own task, so the
        cancelled client is never delayed by recovery and the connection is never handed out
        with the transaction open. Failures mark the lease dirty instead of masking the
        exception being handled."""
        if self.revoked is not None or self.broken:
            return
        if (
            self.interrupted
            or self.op_task is not None
            or trio.current_effective_deadline() == -math.inf
        ):
            # Interrupted, or our task is already cancelled (the I/O would only raise
            # Cancelled and mask the exception being handled): the actor rolls back.
            self.needs_reset = True
            return
        with trio.move_on_after(self.pool.limits.cleanup_timeout) as scope:
            try:
                await self.call(name, fn, check_failed=False)
            except PoolError:
                self.needs_reset = True
        if scope.cancelled_caught:
            self.needs_reset = True


def _result_size(result: Any) -> Any:
    if isinstance(result, list):
        return len(result)
    if isinstance(result, int):
        return result
    return None


def _query_error(pool: Pool, exc: drv.DatabaseError, query: str | None) -> QueryError:
    sqlstate = exc.sqlstate
    cls: type[QueryError] = QueryError
    if exc.kind == "integrity" or (sqlstate is not None and sqlstate.startswith("23")):
        cls = IntegrityError
    elif exc.kind == "serialization" or sqlstate in _SERIALIZATION_STATES:
        cls = SerializationFailure
    text = exc.message
    if sqlstate:
        text += f" (SQLSTATE {sqlstate})"
    if query:
        text += f" in query: {_short(query)}"
    return cls(pool.scrub(text), pool=pool.name, sqlstate=sqlstate, query=query)


# -- handles -------------------------------------------------------------------------------------


class Connection:
    """A locked connection, valid inside its ``async with pool.run()`` block.

    Placeholders are the driver's own (``%s`` for PostgreSQL, ``?`` for SQLite); ``params`` is a
    sequence or a mapping and is never interpolated into the SQL text.
    """

    __slots__ = ("_closed", "_oneshot", "_session")

    def __init__(self, session: Session, *, oneshot: bool = False) -> None:
        self._session = session
        self._closed = False
        self._oneshot = oneshot

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.status()
        return (
            f"<{type(self).__name__} pool={self._session.pool.name!r} "
            f"connection=#{self._session.actor.index} {state}>"
        )

    def _s(self) -> Session:
        if self._closed:
            raise PoolError(
                f"{type(self).__name__.lower()} handle used after its `async with` block ended",
                pool=self._session.pool.name,
            )
        return self._session

    async def execute(self, query: str, params: drv.Params = None) -> int:
        """Run a statement; return the number of rows affected (-1 when the driver cannot tell)."""
        s = self._s()
        return await s.call(
            "execute", s.conn.execute, query, params, query=query, params=params,
            oneshot=self._oneshot,
        )

    async def fetch_all(self, query: str, params: drv.Params = None) -> list[drv.Row]:
        """Run a query and return all rows as tuples."""
        s = self._s()
        return await s.call(
            "fetch_all", s.conn.fetch, query, params, query=query, params=params,
            oneshot=self._oneshot,
        )

    async def _fetch_exactly_one(
        self, call: str, query: str, params: drv.Params, optional: bool
    ) -> drv.Row | None:
        s = self._s()
        rows = await s.call(
            call, s.conn.fetch, query, params, query=query, params=params, oneshot=self._oneshot
        )
        if len(rows) == 1:
            return rows[0]
        if not rows and optional:
            return None
        expected = "at most one row" if optional else "exactly one row"
        raise CardinalityError(
            f"{call} expected {expected}, got {len(rows)}, from query: {_short(query)}",
            pool=s.pool.name,
            query=query,
            expected=expected,
            actual=len(rows),
        )

    async def fetch_one(
        self, query: str, params: drv.Params = None, *, optional: bool = False
    ) -> drv.Row | None:
        """Return the only row of the result.

        Raises ``CardinalityError`` for zero rows (unless ``optional``, then None) or for more
        than one row.
        """
        return await self._fetch_exactly_one("fetch_one", query, params, optional)

    async def fetch_val(
        self, query: str, params: drv.Params = None, *, optional: bool = False
    ) -> Any:
        """Return the first column of the only row (same row rules as :meth:`fetch_one`)."""
        row = await self._fetch_exactly_one("fetch_val", query, params, optional)
        if row is None:
            return None
        if not row:
            raise CardinalityError(
                f"fetch_val expected at least one column, got none, from query: {_short(query)}",
                pool=self._session.pool.name, query=query, expected="one column", actual=0,
            )
        return row[0]

    async def fetch_column(self, query: str, params: drv.Params = None) -> list[Any]:
        """Return the first column of every row."""
        s = self._s()
        rows = await s.call(
            "fetch_column", s.conn.fetch, query, params, query=query, params=params,
            oneshot=self._oneshot,
        )
        return [row[0] for row in rows]

    def stream(
        self, query: str, params: drv.Params = None, *, batch_size: int = 1000
    ) -> Stream:
        """Iterate the rows of a large result with bounded memory (``batch_size`` rows at a
        time; a server-side cursor on PostgreSQL). Use as ``async for row in conn.stream(q)``;
        the cursor closes when the iteration ends, on ``aclose()``, or with the block."""
        s = self._s()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(
                f"stream batch_size must be a positive integer, not {batch_size!r}",
                pool=s.pool.name,
            )
        return Stream(self, query, params, batch_size)

    async def prepare(self, query: str) -> PreparedStatement:
        """Prepare ``query`` on this connection; the result runs it with new parameters and is
        valid as long as this handle."""
        s = self._s()
        await s.call("prepare", s.conn.prepare, query, query=query)
        return PreparedStatement(self, query)

    def transaction(
        self,
        *,
        savepoint: bool = False,
        isolation: str | None = None,
        read_only: bool = False,
        mode: str | None = None,
    ) -> TransactionBlock:
        """A transaction on this connection: outermost if none is open, else nested (flat by
        default, a savepoint with ``savepoint=True``)."""
        s = self._s()
        return TransactionBlock(
            s.pool, session=s, savepoint=savepoint,
            options=transaction_options(isolation, read_only, mode),
        )

    def status(self) -> Status:
        """``"idle"``, ``"transaction"`` or ``"error"``, as the database last reported it (no
        I/O). A connection whose state is unknown (interrupted, lost) reports ``"error"``."""
        s = self._s()
        status = s.conn.status()
        if status == "unknown" or s.revoked is not None or s.broken:
            return "error"
        return status

    def kill(self) -> None:
        """Close this connection now; the actor connects a new one. Every later call on this
        handle raises ``ConnectionLost``; the block still ends normally."""
        s = self._s()
        if s.revoked is not None:
            return
        s.kill(
            f"pool {s.pool.name!r}: connection #{s.actor.index} was killed by its holder",
            "kill() called by the holder",
        )

    def adjust_timeout(self, seconds: float) -> None:
        """Move this lease's hold deadline by ``seconds`` (may be negative). Without a deadline
        (no ``hold_timeout``), one is set ``seconds`` from now."""
        s = self._s()
        base = s.hold_deadline if s.hold_deadline != math.inf else trio.current_time()
        s.set_hold_deadline(base + seconds)

    def reset_timeout(self, seconds: float) -> None:
        """Set this lease's hold deadline to ``seconds`` from now."""
        self._s().set_hold_deadline(trio.current_time() + seconds)


class Transaction(Connection):
    """A :class:`Connection` inside a transaction block.

    After the block, ``committed`` tells whether its work was committed (for nested blocks:
    whether the block ended normally) and ``rollback_reason`` what was passed to
    :meth:`rollback`.
    """

    __slots__ = ("committed", "rollback_reason")

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.committed: bool | None = None
        self.rollback_reason: Any = None

    def rollback(self, reason: Any = None) -> NoReturn:
        """End this transaction block with a rollback: raises ``Rollback``, which this block
        catches and suppresses. Allowed on a transaction already marked failed."""
        self._s()
        raise Rollback(reason, target=self)


class PreparedStatement:
    """A statement prepared on one connection, run with new parameters each time."""

    __slots__ = ("_conn", "query")

    def __init__(self, conn: Connection, query: str) -> None:
        self._conn = conn
        self.query = query

    def __repr__(self) -> str:
        return f"<PreparedStatement {_short(self.query, 60)!r}>"

    async def execute(self, params: drv.Params = None) -> int:
        """Run it; return the rows affected."""
        return await self._conn.execute(self.query, params)

    async def fetch_all(self, params: drv.Params = None) -> list[drv.Row]:
        """Run it; return all rows."""
        return await self._conn.fetch_all(self.query, params)

    async def fetch_one(self, params: drv.Params = None, *, optional: bool = False) -> Any:
        """Run it; return the only row."""
        return await self._conn.fetch_one(self.query, params, optional=optional)

    async def fetch_val(self, params: drv.Params = None, *, optional: bool = False) -> Any:
        """Run it; return the only value."""
        return await self._conn.fetch_val(self.query, params, optional=optional)

    async def fetch_column(self, params: drv.Params = None) -> list[Any]:
        """Run it; return the first column."""
        return await self._conn.fetch_column(self.query, params)


class Stream:
    """Rows of a large result, fetched in batches. An async iterator and an async context
    manager (``async with conn.stream(q) as rows: async for row in rows``)."""

    def __init__(
        self, conn: Connection, query: str, params: drv.Params, batch_size: int
    ) -> None:
        self._conn = conn
        self._query = query
        self._params = params
        self._batch_size = batch_size
        self._cursor: drv.Cursor | None = None
        self._batch: list[drv.Row] = []
        self._pos = 0
        self._done = False

    def __aiter__(self) -> AsyncIterator[drv.Row]:
        return self

    async def __anext__(self) -> drv.Row:
        if self._pos < len(self._batch):
            row = self._batch[self._pos]
            self._pos += 1
            return row
        if self._done:
            raise StopAsyncIteration
        s = self._conn._s()
        if self._cursor is None:
            self._cursor = await s.call(
                "stream", s.conn.open_cursor, self._query, self._params, self._batch_size,
                query=self._query, params=self._params,
            )
            s.streams.add(self)
        batch = await s.call("stream", self._cursor.fetch_batch, query=self._query)
        if not batch:
            await self.aclose()
            raise StopAsyncIteration
        self._batch, self._pos = batch, 1
        return batch[0]

    async def aclose(self) -> None:
        """Close the cursor now (also done at the end of the iteration and of the block)."""
        self._done = True
        self._batch = []
        cursor, self._cursor = self._cursor, None
        s = self._conn._session
        if cursor is None:
            await trio.lowlevel.checkpoint()
            return
        s.streams.discard(self)
        if not s.active or s.revoked is not None:
            await trio.lowlevel.checkpoint()
            return
        try:
            await s.call("stream", cursor.close, check_failed=False)
        except BaseException:
            s.needs_reset = True
            raise

    async def __aenter__(self) -> Stream:
        await trio.lowlevel.checkpoint()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if isinstance(exc[1], Exception | None):
            await self.aclose()
        else:
            self._done = True
            self._conn._session.needs_reset = True


# -- blocks --------------------------------------------------------------------------------------


class RunBlock:
    """``async with pool.run() as conn``: lock a connection (or reuse the task's own)."""

    __slots__ = ("_handle", "_owner", "_pool", "_queue", "_timeout")

    def __init__(self, pool: Pool, timeout: float | None, queue: bool) -> None:
        self._pool = pool
        self._timeout = timeout
        self._queue = queue
        self._handle: Connection | None = None
        self._owner = False

    async def __aenter__(self) -> Connection:
        if self._handle is not None:
            raise PoolError("a pool.run() block can be entered only once; call pool.run() "
                            "again for a new block", pool=self._pool.name)
        pool = self._pool
        task = trio.lowlevel.current_task()
        session = pool._holders.get(task)
        if session is None:
            session = await pool._checkout(self._timeout, self._queue, task)
            self._owner = True
        else:
            await trio.lowlevel.checkpoint()
        self._handle = handle = Connection(session)
        return handle

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        handle = self._handle
        assert handle is not None
        handle._closed = True
        if self._owner:
            self._pool._checkin(handle._session)


_NO_OPTIONS = drv.TransactionOptions()


def transaction_options(
    isolation: str | None, read_only: bool, mode: str | None
) -> drv.TransactionOptions:
    """The options for BEGIN; the shared default instance when nothing is asked for (no
    allocation on the common path, and nested blocks compare against it)."""
    if isolation is None and not read_only and mode is None:
        return _NO_OPTIONS
    return drv.TransactionOptions(isolation=isolation, read_only=read_only, mode=mode)


class TransactionBlock:
    """``async with pool.transaction() as tx`` (or ``conn.transaction()``): BEGIN/COMMIT, or a
    nested flat block, or a savepoint, depending on what the task already holds."""

    __slots__ = ("_entered", "_kind", "_options", "_owner", "_pool", "_queue", "_savepoint",
                 "_scope", "_session", "_timeout", "_tx")

    def __init__(
        self,
        pool: Pool,
        *,
        session: Session | None = None,
        savepoint: bool = False,
        options: drv.TransactionOptions = _NO_OPTIONS,
        timeout: float | None = None,
        queue: bool = True,
    ) -> None:
        self._pool = pool
        self._session = session
        self._savepoint = savepoint
        self._options = options
        self._timeout = timeout
        self._queue = queue
        self._owner = False
        self._entered = False
        self._kind: Literal["outer", "flat", "savepoint"] = "outer"
        self._scope: _TxScope | None = None
        self._tx: Transaction | None = None

    async def __aenter__(self) -> Transaction:
        pool = self._pool
        if self._entered:
            raise PoolError("a transaction block can be entered only once; call "
                            "transaction() again for a new block", pool=pool.name)
        self._entered = True
        session = self._session
        if session is None:
            session = pool._holders.get(trio.lowlevel.current_task())
        if session is None:
            # BEGIN follows at once and is a checkpoint: no extra scheduler pass needed.
            session = await pool._checkout(self._timeout, self._queue, schedule=False)
            self._owner = True
        self._session = session
        try:
            if session.scopes:
                if self._options != _NO_OPTIONS:
                    raise ConfigError(
                        "isolation, read_only and mode apply to the outermost transaction only; "
                        "this block is nested in an open transaction",
                        pool=pool.name,
                    )
                current = session.scopes[-1]
                if current.failed:
                    await trio.lowlevel.checkpoint()
                    raise TransactionFailed(
                        f"cannot open a nested block: the transaction is failed ({current.reason})",
                        pool=pool.name,
                    )
                if self._savepoint:
                    session.savepoints += 1
                    name = f"tcs_sp_{session.savepoints}"
                    await session.call("savepoint", session.conn.savepoint, name,
                                       check_failed=False)
                    self._kind = "savepoint"
                    self._scope = _TxScope(name)
                    session.scopes.append(self._scope)
                else:
                    await trio.lowlevel.checkpoint()
                    self._kind = "flat"
                    self._scope = current
            else:
                await session.call("begin", session.conn.begin, self._options,
                                   check_failed=False)
                self._kind = "outer"
                self._scope = _TxScope(None)
                session.scopes.append(self._scope)
        except BaseException:
            if self._owner:
                pool._checkin(session)
            raise
        self._tx = tx = Transaction(session)
        return tx

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        tx = self._tx
        session = self._session
        scope = self._scope
        assert tx is not None and session is not None and scope is not None
        tx._closed = True
        own_rollback = isinstance(exc, Rollback) and exc.target is tx
        if own_rollback:
            assert isinstance(exc, Rollback)
            tx.rollback_reason = exc.reason
        try:
            if self._kind == "flat":
                return self._exit_flat(tx, scope, exc, own_rollback)
            if self._kind == "savepoint":
                return await self._exit_savepoint(tx, session, scope, exc, own_rollback)
            return await self._exit_outer(tx, session, scope, exc, own_rollback)
        finally:
            if self._owner:
                self._pool._checkin(session)

    def _exit_flat(
        self, tx: Transaction, scope: _TxScope, exc: BaseException | None, own_rollback: bool
    ) -> bool:
        if exc is None:
            tx.committed = not scope.failed
            return False
        tx.committed = False
        if own_rollback:
            scope.fail(f"a nested block rolled back ({tx.rollback_reason!r})")
            return True
        scope.fail(f"a nested block raised {type(exc).__name__}")
        return False

    async def _exit_savepoint(
        self,
        tx: Transaction,
        session: Session,
        scope: _TxScope,
        exc: BaseException | None,
        own_rollback: bool,
    ) -> bool:
        name = scope.savepoint
        assert name is not None
        if session.scopes and session.scopes[-1] is scope:
            session.scopes.pop()
        conn = session.conn
        if exc is None and not scope.failed and conn.status() in ("transaction", "unknown"):
            try:
                await session.call("release", conn.release, name, check_failed=False)
            except BaseException:
                tx.committed = False
                session.fail_all(f"releasing savepoint {name} failed")
                raise
            tx.committed = True
            return False
        tx.committed = False
        abrupt = exc is not None and not isinstance(exc, Exception | Rollback)
        if abrupt or session.interrupted:
            # Cancelled (or similar): no I/O in this task; the whole transaction is lost.
            session.fail_all("a savepoint block was interrupted")
            session.needs_reset = True
        else:
            await session.cleanup("rollback_to", lambda: conn.rollback_to(name))
            if session.needs_reset:
                session.fail_all(f"rolling back to savepoint {name} failed")
        if own_rollback:
            return True
        if exc is None:
            raise TransactionFailed(
                f"savepoint block rolled back: {scope.reason or 'the database reported an error'}",
                pool=session.pool.name,
            )
        return False

    async def _exit_outer(
        self,
        tx: Transaction,
        session: Session,
        scope: _TxScope,
        exc: BaseException | None,
        own_rollback: bool,
    ) -> bool:
        session.scopes.clear()
        conn = session.conn
        # "unknown": the driver cannot tell (a connection that died unnoticed). Try the COMMIT:
        # a dead connection then reports ConnectionLost, which is the truth.
        if exc is None and not scope.failed and conn.status() in ("transaction", "unknown"):
            tx.committed = False
            try:
                await session.call("commit", conn.commit, check_failed=False)
            except Exception:
                # Some databases keep the transaction open after a failed COMMIT (SQLite
                # busy): end it, or the next statement in this lease would join it and be
                # rolled back unseen.
                if conn.status() in ("transaction", "error"):
                    await session.cleanup("rollback", conn.rollback)
                raise
            tx.committed = True
            return False
        tx.committed = False
        status = conn.status()
        abrupt = exc is not None and not isinstance(exc, Exception | Rollback)
        if abrupt:
            session.needs_reset = True
        elif conn.status() in ("transaction", "error", "unknown") or session.interrupted:
            await session.cleanup("rollback", conn.rollback)
        if own_rollback:
            return True
        if exc is None:
            reason = scope.reason or f"the database reported the transaction as {status!r}"
            raise TransactionFailed(
                f"transaction rolled back, nothing was committed: {reason}",
                pool=session.pool.name,
            )
        return False


async def one_shot(
    pool: Pool,
    method: Callable[[Connection], Awaitable[T]],
    *,
    retry: bool,
) -> T:
    """Run one call on the task's own lease (virtual connection) or on a fresh lease; retry a
    read once on a lost connection (crystal-db's rule, only where it is safe)."""
    session = pool._holders.get(trio.lowlevel.current_task())
    if session is not None:
        return await method(Connection(session))
    attempts = 2 if retry else 1
    for attempt in range(attempts):
        session = await pool._checkout(None, True, schedule=False)
        handle = Connection(session, oneshot=True)
        try:
            return await method(handle)
        except ConnectionLost:
            if attempt + 1 == attempts:
                raise
        finally:
            handle._closed = True
            pool._checkin(session)
    raise AssertionError("unreachable")  # pragma: no cover


