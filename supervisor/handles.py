"""Connection and Transaction handles, what a client holds inside ``async with``, and the
blocks that lend them.

A handle is a thin view on a :class:`~supervisor.session.Session` (the lease plus its
transaction state); every database call goes through ``Session.call``, where the rules live. A
handle is usable only inside its block (``PoolError`` after). The blocks (:class:`RunBlock`,
:class:`TransactionBlock`) and the handles live in one module because they are made of each
other: a block lends a handle, and a handle opens nested blocks (``conn.transaction()``).

Transactions follow DBConnection's flat rule by default (a nested block issues no SQL and
poisons the whole transaction if it fails) and crystal-db's savepoints on request.

The blocks talk to the :class:`~supervisor.lender.Lender` only (checkout, checkin, the task's
held session), never to the pool; their entry and exit are KeyboardInterrupt-protected, so a
Ctrl-C cannot fall between getting a lease and owning it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, Literal, NoReturn, TypeVar, final

import trio

from actors import driver as drv
from supervisor.errors import (
    CardinalityError,
    ConfigError,
    ConnectionLost,
    PoolError,
    Rollback,
)
from supervisor.lender import Lender
from supervisor.rows import RowFactory, RowMaker, tuple_row
from supervisor.session import Query, Session, TxScope, short

__all__ = [
    "Connection",
    "PreparedStatement",
    "RunBlock",
    "Stream",
    "Transaction",
    "TransactionBlock",
    "one_shot",
    "transaction_options",
]

T = TypeVar("T")
Status = Literal["idle", "transaction", "error"]


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
            f"<{type(self).__name__} pool={self._session.reporter.name!r} "
            f"connection=#{self._session.actor.index} {state}>"
        )

    def _s(self) -> Session:
        if self._closed:
            raise PoolError(
                f"{type(self).__name__.lower()} handle used after its `async with` block ended",
                pool=self._session.reporter.name,
            )
        return self._session

    async def _sql(self, s: Session, query: Query) -> str:
        """The SQL text of ``query``; for a :class:`~supervisor.Statement`, prepared on this
        physical connection first if it is not yet (Racket's virtual statement)."""
        if type(query) is str:
            return query
        text = getattr(query, "text", None)
        if not isinstance(text, str):
            raise ConfigError(
                f"a query must be SQL text or a pool.statement(...), not {type(query).__name__}",
                pool=s.reporter.name,
            )
        cache = s.actor.statements
        if text in cache:
            cache.move_to_end(text)
            return text
        await s.call("prepare", s.conn.prepare, text, query=text)
        cache[text] = None
        if len(cache) > s.statement_cache_size:
            cache.popitem(last=False)
        return text

    async def execute(self, query: Query, params: drv.Params = None) -> int:
        """Run a statement; return the number of rows affected (-1 when the driver cannot tell).
        ``query`` is SQL text or a :class:`~supervisor.Statement`."""
        s = self._s()
        sql = await self._sql(s, query)
        return await s.call(
            "execute", s.conn.execute, sql, params, query=sql, params=params,
            oneshot=self._oneshot,
        )

    async def execute_many(self, query: Query, params_seq: Iterable[drv.Params]) -> int:
        """Run one statement once per parameter set; return the total rows affected.
        Atomic: outside a transaction it runs in one (inside one, it is part of it).
        Pipelined on PostgreSQL."""
        s = self._s()
        sql = await self._sql(s, query)
        batch = list(params_seq)
        if s.scopes:
            return await self._execute_many(s, sql, batch)
        async with self.transaction():
            total = await self._execute_many(s, sql, batch)
        return total

    async def _execute_many(self, s: Session, sql: str, batch: list[drv.Params]) -> int:
        many = getattr(s.conn, "execute_many", None)
        if many is not None:
            total: int = await s.call(
                "execute_many", many, sql, batch, query=sql, oneshot=self._oneshot
            )
            return total
        total = 0
        for params in batch:
            count = await s.call("execute", s.conn.execute, sql, params, query=sql,
                                 params=params, oneshot=self._oneshot)
            total += max(count, 0)
        return total

    async def fetch_all(
        self, query: Query, params: drv.Params = None, *, row_factory: RowFactory | None = None
    ) -> list[Any]:
        """Run a query and return all rows (tuples, or what ``row_factory`` makes)."""
        s = self._s()
        sql = await self._sql(s, query)
        rows = await s.call(
            "fetch_all", s.conn.fetch, sql, params, query=sql, params=params,
            oneshot=self._oneshot,
        )
        return _made(s, rows, row_factory)

    async def _fetch_exactly_one(
        self, call: str, query: Query, params: drv.Params, optional: bool
    ) -> drv.Row | None:
        s = self._s()
        sql = await self._sql(s, query)
        rows = await s.call(
            call, s.conn.fetch, sql, params, query=sql, params=params, oneshot=self._oneshot
        )
        if len(rows) == 1:
            return rows[0]
        if not rows and optional:
            return None
        expected = "at most one row" if optional else "exactly one row"
        raise CardinalityError(
            f"{call} expected {expected}, got {len(rows)}, from query: {short(sql)}",
            pool=s.reporter.name,
            query=sql,
            expected=expected,
            actual=len(rows),
        )

    async def fetch_one(
        self,
        query: Query,
        params: drv.Params = None,
        *,
        optional: bool = False,
        row_factory: RowFactory | None = None,
    ) -> Any:
        """Return the only row of the result (a tuple, or what ``row_factory`` makes).

        Raises ``CardinalityError`` for zero rows (unless ``optional``, then None) or for more
        than one row.
        """
        row = await self._fetch_exactly_one("fetch_one", query, params, optional)
        if row is None:
            return None
        return _made(self._session, [row], row_factory)[0]

    async def fetch_val(
        self, query: Query, params: drv.Params = None, *, optional: bool = False
    ) -> Any:
        """Return the first column of the only row (same row rules as :meth:`fetch_one`)."""
        row = await self._fetch_exactly_one("fetch_val", query, params, optional)
        if row is None:
            return None
        if not row:
            sql = query if isinstance(query, str) else str(getattr(query, "text", query))
            raise CardinalityError(
                f"fetch_val expected at least one column, got none, from query: {short(sql)}",
                pool=self._session.reporter.name, query=sql, expected="one column", actual=0,
            )
        return row[0]

    async def fetch_column(self, query: Query, params: drv.Params = None) -> list[Any]:
        """Return the first column of every row."""
        s = self._s()
        sql = await self._sql(s, query)
        rows = await s.call(
            "fetch_column", s.conn.fetch, sql, params, query=sql, params=params,
            oneshot=self._oneshot,
        )
        return [row[0] for row in rows]

    def stream(
        self,
        query: Query,
        params: drv.Params = None,
        *,
        batch_size: int = 1000,
        row_factory: RowFactory | None = None,
    ) -> Stream:
        """Iterate the rows of a large result with bounded memory (``batch_size`` rows at a
        time; a server-side cursor on PostgreSQL). Use as ``async for row in conn.stream(q)``;
        the cursor closes when the iteration ends, on ``aclose()``, or with the block."""
        s = self._s()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(
                f"stream batch_size must be a positive integer, not {batch_size!r}",
                pool=s.reporter.name,
            )
        return Stream(self, query, params, batch_size, row_factory)

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
            None, session=s, savepoint=savepoint,
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
            f"pool {s.reporter.name!r}: connection #{s.actor.index} was killed by its holder",
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


@final
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


@final
class PreparedStatement:
    """A statement prepared on one connection, run with new parameters each time."""

    __slots__ = ("_conn", "query")

    def __init__(self, conn: Connection, query: str) -> None:
        self._conn = conn
        self.query = query

    def __repr__(self) -> str:
        return f"<PreparedStatement {short(self.query, 60)!r}>"

    async def execute(self, params: drv.Params = None) -> int:
        """Run it; return the rows affected."""
        return await self._conn.execute(self.query, params)

    async def fetch_all(
        self, params: drv.Params = None, *, row_factory: RowFactory | None = None
    ) -> list[Any]:
        """Run it; return all rows."""
        return await self._conn.fetch_all(self.query, params, row_factory=row_factory)

    async def fetch_one(
        self,
        params: drv.Params = None,
        *,
        optional: bool = False,
        row_factory: RowFactory | None = None,
    ) -> Any:
        """Run it; return the only row."""
        return await self._conn.fetch_one(
            self.query, params, optional=optional, row_factory=row_factory
        )

    async def fetch_val(self, params: drv.Params = None, *, optional: bool = False) -> Any:
        """Run it; return the only value."""
        return await self._conn.fetch_val(self.query, params, optional=optional)

    async def fetch_column(self, params: drv.Params = None) -> list[Any]:
        """Run it; return the first column."""
        return await self._conn.fetch_column(self.query, params)


@final
class Stream:
    """Rows of a large result, fetched in batches. An async iterator and an async context
    manager (``async with conn.stream(q) as rows: async for row in rows``)."""

    def __init__(
        self,
        conn: Connection,
        query: Query,
        params: drv.Params,
        batch_size: int,
        row_factory: RowFactory | None = None,
    ) -> None:
        self._conn = conn
        self._query = query
        self._params = params
        self._batch_size = batch_size
        self._row_factory = row_factory
        self._make: RowMaker | None = None
        self._cursor: drv.Cursor | None = None
        self._batch: list[Any] = []
        self._pos = 0
        self._done = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self._pos < len(self._batch):
            row = self._batch[self._pos]
            self._pos += 1
            return row
        if self._done:
            raise StopAsyncIteration
        s = self._conn._s()
        if self._cursor is None:
            sql = await self._conn._sql(s, self._query)
            self._cursor = await s.call(
                "stream", s.conn.open_cursor, sql, self._params, self._batch_size,
                query=sql, params=self._params,
            )
            s.streams.add(self)
        sql_text = self._query if isinstance(self._query, str) else None
        batch = await s.call("stream", self._cursor.fetch_batch, query=sql_text)
        if not batch:
            await self.aclose()
            raise StopAsyncIteration
        if self._make is None:
            factory = self._row_factory or s.row_factory
            if factory is not tuple_row:  # names are known once rows came (server cursors)
                self._make = factory(_columns(s, self._cursor))
        make = self._make
        self._batch = batch if make is None else [make(row) for row in batch]
        self._pos = 1
        return self._batch[0]

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
        if not s.active or s.revoked is not None or s.broken:  # nothing to close on a dead one
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


@final
class RunBlock:
    """``async with pool.run() as conn``: lock a connection (or reuse the task's own)."""

    __slots__ = ("_handle", "_lender", "_owner", "_queue", "_timeout")

    def __init__(self, lender: Lender, timeout: float | None, queue: bool) -> None:
        self._lender = lender
        self._timeout = timeout
        self._queue = queue
        self._handle: Connection | None = None
        self._owner = False

    def __await__(self) -> NoReturn:
        raise TypeError(_not_a_handle(self._pool_name(), "pool.run()", "conn"))

    def __getattr__(self, name: str) -> NoReturn:
        raise AttributeError(_not_a_handle(self._pool_name(), "pool.run()", "conn", name))

    def _pool_name(self) -> str:
        return self._lender.name

    @trio.lowlevel.enable_ki_protection
    async def __aenter__(self) -> Connection:
        if self._handle is not None:
            raise PoolError("a pool.run() block can be entered only once; call pool.run() "
                            "again for a new block", pool=self._lender.name)
        lender = self._lender
        task = trio.lowlevel.current_task()
        session = lender.holders.get(task)
        if session is None:
            session = await lender.checkout(self._timeout, self._queue, task)
            self._owner = True
        else:
            await trio.lowlevel.checkpoint()
        self._handle = handle = Connection(session)
        return handle

    @trio.lowlevel.enable_ki_protection
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
            self._lender.checkin(handle._session)


def _columns(s: Session, source: object) -> list[str]:
    columns = getattr(source, "columns", None)
    if columns is None:
        raise PoolError(
            f"the {type(source).__name__} of this pool's driver does not report column names, "
            "so rows can only be tuples (row_factory=tuple_row)",
            pool=s.reporter.name,
        )
    names: list[str] = columns()
    return names


def _made(s: Session, rows: list[drv.Row], row_factory: RowFactory | None) -> list[Any]:
    """``rows`` as the row factory (this call's, else the pool's) makes them."""
    factory = row_factory or s.row_factory
    if factory is tuple_row:
        return rows
    make = factory(_columns(s, s.conn))
    return [make(row) for row in rows]


def _not_a_handle(pool: str, call: str, var: str, attribute: str | None = None) -> str:
    what = f" has no {attribute!r}" if attribute else " cannot be awaited"
    return (
        f"pool {pool!r}: {call} returns a block, not a connection, so it{what}; use it as "
        f"`async with {'pool.' if not call.startswith('pool.') else ''}{call} as {var}:` and "
        f"call {var}.{attribute or 'execute'}(...) inside the block"
    )


_NO_OPTIONS = drv.TransactionOptions()


def transaction_options(
    isolation: str | None, read_only: bool, mode: str | None
) -> drv.TransactionOptions:
    """The options for BEGIN; the shared default instance when nothing is asked for (no
    allocation on the common path, and nested blocks compare against it)."""
    if isolation is None and not read_only and mode is None:
        return _NO_OPTIONS
    return drv.TransactionOptions(isolation=isolation, read_only=read_only, mode=mode)


@final
class TransactionBlock:
    """``async with pool.transaction() as tx`` (or ``conn.transaction()``): BEGIN/COMMIT, or a
    nested flat block, or a savepoint, depending on what the task already holds."""

    __slots__ = ("_entered", "_kind", "_lender", "_options", "_owner", "_queue", "_savepoint",
                 "_scope", "_session", "_timeout", "_tx")

    def __init__(
        self,
        lender: Lender | None,
        *,
        session: Session | None = None,
        savepoint: bool = False,
        options: drv.TransactionOptions = _NO_OPTIONS,
        timeout: float | None = None,
        queue: bool = True,
    ) -> None:
        self._lender = lender
        self._session = session
        self._savepoint = savepoint
        self._options = options
        self._timeout = timeout
        self._queue = queue
        self._owner = False
        self._entered = False
        self._kind: Literal["outer", "flat", "savepoint"] = "outer"
        self._scope: TxScope | None = None
        self._tx: Transaction | None = None

    def _pool_name(self) -> str:
        if self._session is not None:
            return self._session.reporter.name
        assert self._lender is not None
        return self._lender.name

    def __await__(self) -> NoReturn:
        raise TypeError(_not_a_handle(self._pool_name(), "transaction()", "tx"))

    def __getattr__(self, name: str) -> NoReturn:
        raise AttributeError(_not_a_handle(self._pool_name(), "transaction()", "tx", name))

    @trio.lowlevel.enable_ki_protection
    async def __aenter__(self) -> Transaction:
        if self._entered:
            raise PoolError("a transaction block can be entered only once; call "
                            "transaction() again for a new block", pool=self._pool_name())
        self._entered = True
        session = self._session
        lender = self._lender
        if session is None:
            assert lender is not None  # a block made by the pool; handles pass their session
            session = lender.holders.get(trio.lowlevel.current_task())
            if session is None:
                # BEGIN follows at once and is a checkpoint: no extra scheduler pass needed.
                session = await lender.checkout(self._timeout, self._queue, schedule=False)
                self._owner = True
        self._session = session
        try:
            if session.scopes:
                sandboxed = session.sandbox is not None
                if self._options != _NO_OPTIONS and not sandboxed:
                    raise ConfigError(
                        "isolation, read_only and mode apply to the outermost transaction only; "
                        "this block is nested in an open transaction",
                        pool=session.reporter.name,
                    )
                current = session.scopes[-1]
                if current.failed:
                    await trio.lowlevel.checkpoint()
                    raise session.failed_error(
                        f"cannot open a nested block: the transaction is failed ({current.reason})"
                    )
                if self._savepoint or sandboxed:  # in a sandbox, every block is a savepoint
                    session.savepoints += 1
                    name = f"tcs_sp_{session.savepoints}"
                    await session.call("savepoint", session.conn.savepoint, name,
                                       check_failed=False)
                    self._kind = "savepoint"
                    self._scope = TxScope(name)
                    session.scopes.append(self._scope)
                else:
                    await trio.lowlevel.checkpoint()
                    self._kind = "flat"
                    self._scope = current
            else:
                try:
                    await session.call("begin", session.conn.begin, self._options,
                                       check_failed=False)
                except ConnectionLost:
                    if session.crashed is not None:
                        raise  # a driver crash is not retried: the bug would strike again
                    session = await self._restart(session)
                self._kind = "outer"
                self._scope = TxScope(None)
                session.scopes.append(self._scope)
        except BaseException:
            if self._owner:
                assert self._lender is not None
                self._lender.checkin(self._session)
            raise
        self._tx = tx = Transaction(session)
        return tx

    async def _restart(self, session: Session) -> Session:
        """BEGIN found the connection lost (a stale connection, killed while idle): nothing of
        this transaction has run yet, so when this block owns its lease it restarts on a fresh
        connection, once (counted as ``transaction_restarts``). Otherwise the loss is raised."""
        if not self._owner or self._lender is None:
            raise  # the ConnectionLost the caller is handling
        lender = self._lender
        lender.checkin(session)  # broken: its actor replaces it
        self._owner = False
        lender.reporter.transaction_restarted()
        session = await lender.checkout(self._timeout, self._queue, schedule=False)
        self._session, self._owner = session, True
        await session.call("begin", session.conn.begin, self._options, check_failed=False)
        return session

    @trio.lowlevel.enable_ki_protection
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
                assert self._lender is not None
                self._lender.checkin(session)

    def _exit_flat(
        self, tx: Transaction, scope: TxScope, exc: BaseException | None, own_rollback: bool
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
        scope: TxScope,
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
            raise session.failed_error(
                f"savepoint block rolled back: {scope.reason or 'the database reported an error'}"
            )
        return False

    async def _exit_outer(
        self,
        tx: Transaction,
        session: Session,
        scope: TxScope,
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
            raise session.failed_error(f"transaction rolled back, nothing was committed: {reason}")
        return False


async def one_shot(
    lender: Lender,
    method: Callable[[Connection], Awaitable[T]],
    *,
    retry: bool,
) -> T:
    """Run one call on the task's own lease (virtual connection) or on a fresh lease; retry a
    read once on a lost connection (crystal-db's rule, only where it is safe)."""
    session = lender.holders.get(trio.lowlevel.current_task())
    if session is not None:
        return await method(Connection(session))
    attempts = 2 if retry else 1
    for attempt in range(attempts):
        session = await lender.checkout(None, True, schedule=False)
        handle = Connection(session, oneshot=True)
        try:
            return await method(handle)
        except ConnectionLost:
            if attempt + 1 == attempts or session.crashed is not None:
                raise  # a driver crash is not retried: the bug would strike again
        finally:
            handle._closed = True
            lender.checkin(session)
    raise AssertionError("unreachable")  # pragma: no cover
