"""A session: one lease as the pool sees it, its transaction scopes, and the one place where a
client's call meets the driver.

Every database call of a handle goes through :meth:`Session.call`, which is where the rules live:

* a handle is usable by one task at a time (``PoolError`` when two tasks overlap: protocol
  messages are never interleaved);
* a revoked lease (hold deadline, ``kill()``, shutdown) raises ``ConnectionLost``;
* a failed transaction raises ``TransactionFailed`` without touching the database (see below
  for one whose connection is gone);
* a call cancelled midway marks the lease *interrupted*: nothing more is sent by the client; the
  actor cancels and drains it in its own task once the lease is returned (or, if the client
  caught the cancellation and goes on, the next call recovers first, bounded);
* driver errors are translated in one place: ``actors.driver.DatabaseError`` becomes
  ``QueryError`` (``IntegrityError``, ``SerializationFailure``), ``actors.driver.ConnectionLost``
  becomes ``supervisor.ConnectionLost``, a refused argument ``ConfigError``; any other exception
  that leaves the driver mid-protocol (status ``"unknown"``) is a driver crash:
  ``ConnectionLost`` for the client, and the connection's actor crashes (supervisor restart,
  restart intensity); one raised between messages is the caller's own (a parameter adapter):
  raised as itself, nothing ran, the connection and its transaction stay as they were; every
  message names the pool and is scrubbed of secrets;
* a transaction whose connection is gone raises ``ConnectionLost`` from every later call (a
  failed one otherwise raises ``TransactionFailed``).

A session knows nothing of pools: it gets the pool's :class:`~supervisor.reporter.Reporter` and
:class:`~supervisor.limits.SafetyLimits`, and talks to its actor through the lease's owner
protocol (:class:`actors.lease.LeaseOwner`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, final

import trio

from actors import driver as drv
from actors.actor import restore_idle
from actors.lease import Crash, Lease, LeaseOwner
from supervisor.errors import (
    ConfigError,
    ConnectionLost,
    IntegrityError,
    PoolError,
    QueryError,
    QueryTimeout,
    SerializationFailure,
    TransactionFailed,
)
from supervisor.limits import SafetyLimits
from supervisor.log import LogEntry
from supervisor.options import DEFAULT_SETTINGS, SessionSettings
from supervisor.reporter import Reporter

__all__ = ["Query", "Session", "StatementLike", "TxScope", "short"]

class StatementLike(Protocol):
    """A :class:`~supervisor.Statement`, as a handle sees it: its SQL text."""

    @property
    def text(self) -> str: ...


Query = str | StatementLike


class SandboxView(Protocol):
    """What a sandbox's view session needs from its sandbox (supervisor.sandbox.Sandbox)."""

    def release(self, view: Session) -> None: ...
"""What a handle method runs: SQL text, or a statement from ``pool.statement(...)``."""


T = TypeVar("T")
_SERIALIZATION_STATES = frozenset({"40001", "40P01"})


def short(query: str, limit: int = 200) -> str:
    query = " ".join(query.split())
    return query if len(query) <= limit else query[: limit - 3] + "..."


class TxScope:
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


@final
class Session(Lease):
    """A lease as the pool sees it: owner task, transaction scopes, open streams."""

    __slots__ = (
        "checkout_wait",
        "guarded",
        "limits",
        "needs_reset",
        "reporter",
        "row_factory",
        "sandbox",
        "savepoints",
        "scopes",
        "statement_cache_size",
        "streams",
        "task",
        "watch_state",
    )

    def __init__(
        self,
        reporter: Reporter,
        limits: SafetyLimits,
        actor: LeaseOwner,
        conn: drv.Connection,
        generation: int,
        task: trio.lowlevel.Task | None,
        settings: SessionSettings = DEFAULT_SETTINGS,
    ) -> None:
        super().__init__(actor, conn, generation)
        self.reporter = reporter
        self.limits = limits
        self.task = task
        self.row_factory = settings.row_factory
        self.sandbox: SandboxView | None = None  # set on a sandbox's views (supervisor.sandbox)
        self.statement_cache_size = settings.statement_cache_size
        # reset="auto": watch the statements for session state (drivers that can tell);
        # "always": dirty from the start
        self.watch_state = settings.reset == "auto" and hasattr(conn, "leaves_session_state")
        self.left_state = settings.reset == "always"
        self.scopes: list[TxScope] = []
        self.savepoints = 0
        self.streams: set[object] = set()  # open handles.Stream objects
        self.needs_reset = False
        self.checkout_wait = 0.0
        # Calls run under their own cancel scope only when a deadline may cut them short.
        self.guarded = limits.hold_timeout is not None or limits.query_timeout is not None

    # -- state checks ----------------------------------------------------------------------

    def clean(self) -> bool:
        """Whether the connection can go straight back to the idle set (no actor work)."""
        return not (
            self.interrupted
            or self.broken
            or self.needs_reset
            or self.streams
            or self.left_state
            or self.killed
            or self.actor.retiring
            or self.conn.status() != "idle"
        )

    def _lost(self, why: str | None = None) -> ConnectionLost:
        reason = self.revoked or why or "the connection was lost"
        return ConnectionLost(reason, pool=self.reporter.name)

    def _enter(self) -> None:
        """Checks before any call: revoked, concurrent use."""
        if self.revoked is not None:
            raise self._lost()
        if self.op_task is not None:
            raise PoolError(
                "a connection handle was used by two tasks at once "
                f"(task {self.op_task.name!r} is running a call on it); give each task its own "
                "handle (pool.run() in that task)",
                pool=self.reporter.name,
            )

    def failed_error(self, text: str) -> PoolError:
        """What using a failed transaction raises: ``ConnectionLost`` when its connection is gone
        (the truth, whatever call finds it: one fault, one exception), else
        ``TransactionFailed``."""
        if self.broken or self.revoked is not None:
            return self._lost(text)
        return TransactionFailed(text, pool=self.reporter.name)

    def fail_all(self, reason: str) -> None:
        for scope in self.scopes:
            scope.fail(reason)

    def set_hold_deadline(self, deadline: float) -> None:
        """Move the hold deadline; calls now run under a cancel scope so it can be enforced."""
        self.guarded = True
        super().set_hold_deadline(deadline)

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
        if query is not None:
            if "\x00" in query:
                await trio.lowlevel.checkpoint()
                raise QueryError(
                    "the SQL text contains a NUL character (\\x00), which PostgreSQL would "
                    f"silently cut the statement at; refusing to run {name}: {short(query)!r}",
                    pool=self.reporter.name, query=query,
                )
            if self.watch_state and not self.left_state:
                self.left_state = self.conn.leaves_session_state(query)  # type: ignore[attr-defined]
        if check_failed and self.scopes and self.scopes[-1].failed:
            await trio.lowlevel.checkpoint()
            raise self.failed_error(
                f"transaction is failed ({self.scopes[-1].reason}); it can only be rolled back; "
                f"refusing to run {name}" + (f": {short(query)}" if query else "")
            )
        if self.broken:
            # Lost, or the driver crashed: nothing more goes to this connection.
            await trio.lowlevel.checkpoint()
            raise self._lost(
                "the connection was lost earlier in this block; refusing to run "
                f"{name}" + (f": {short(query)}" if query else "")
            )
        rep = self.reporter
        self.op_task = trio.lowlevel.current_task()
        started = time.perf_counter() if rep.hook is not None else 0.0
        error: BaseException | None = None
        hidden: PoolError | None = None  # an error whose cause held a secret: raised unchained
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
                timeout = self.limits.query_timeout
                if timeout is not None:
                    scope.deadline = trio.current_time() + timeout
                result = await fn(*args)
            if scope.cancelled_caught:
                # Our own scope was cancelled: revocation, or the query timeout.
                self.interrupted = True
                self.fail_all(f"{name} was interrupted")
                if self.revoked is not None:
                    raise self._lost()
                rep.query_timed_out()
                raise QueryTimeout(
                    f"{name} took longer than query_timeout={timeout}s and was "
                    "cancelled" + (f": {short(query)}" if query else ""),
                    pool=rep.name,
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
                rep.scrub(f"connection lost during {name}: {exc}")
            ) from exc
        except drv.DatabaseError as exc:
            error = _query_error(rep, exc, query, getattr(self.conn, "paramstyle", None))
            if self.scopes and self.conn.status() == "idle":
                # The database ended the transaction by itself (SQLite does, for some errors):
                # later statements would autocommit. Nothing more may run in this transaction.
                self.fail_all("the database rolled the transaction back after an error")
            raise error from (exc.__cause__ or exc)
        except PoolError as exc:
            error = exc
            raise
        except Exception as exc:
            if self.conn.status() == "unknown":
                # Mid-protocol: a driver crash (see _crash).
                error, cause = self._crash(name, exc)
                if cause is not None:
                    raise error from cause
                hidden = error  # raised below, outside this handler: no chain at all
            elif isinstance(exc, ValueError | TypeError):
                # Refused before any I/O (a bad isolation level, mode or parameter): the
                # connection is untouched and stays usable. Not so for a batch: rows before
                # the refused one may have run, so a transaction around it is failed.
                if name == "execute_many":
                    self.fail_all("execute_many refused the arguments of one of its rows")
                hint = placeholder_hint(query, getattr(self.conn, "paramstyle", None))
                error = ConfigError(rep.scrub(f"{name} refused its arguments: {exc}{hint}"),
                                    pool=rep.name)
                raise error from exc
            else:
                # The driver is between messages (idle, in a transaction): the caller's own
                # code that the driver ran, such as a parameter adapter, raised before the
                # statement was sent. It is the caller's exception, as a refused argument is:
                # nothing ran, the connection and its transaction stay as they were.
                if rep.chain_is_safe(exc):
                    error = exc
                    raise
                error = hidden = PoolError(f"{name} raised {rep.describe(exc)}", pool=rep.name)
        except BaseException as exc:
            # KeyboardInterrupt and the like, in the middle of a call: protocol state unknown.
            error = exc
            self.broken = True
            self.fail_all(f"{name} was interrupted")
            raise
        finally:
            self.op_finished()
            if rep.hook is not None:
                rep.log(
                    LogEntry(
                        pool=rep.name,
                        call=name,
                        connection=self.actor.index,
                        query=query,
                        params=rep.log_params_of(params),
                        pool_time=self.checkout_wait if oneshot else None,
                        connection_time=time.perf_counter() - started,
                        result=_result_size(result) if error is None else None,
                        error=rep.safe_error(error),
                    ),
                )
        # Only an error whose cause held a secret gets here: raised outside the handlers, so
        # that not even __context__ links it to the driver's exception.
        assert hidden is not None
        raise hidden

    def _crash(self, name: str, exc: Exception) -> tuple[ConnectionLost, Exception | None]:
        """The driver raised what no driver may raise, and left the protocol mid-message
        (status ``"unknown"``): a bug in it, or in the code under it. The connection is dead;
        the actor crashes when the lease comes back, and the supervisor restarts it with
        backoff and counts the crash against the restart intensity (a driver that keeps
        failing fails the pool with one error instead of looping). The client gets
        ``ConnectionLost`` (never retried by the pool: the bug would strike again), the
        driver's exception as its ``__cause__`` unless its chain held a secret."""
        self.broken = True
        rep = self.reporter
        safe = rep.chain_is_safe(exc)
        text = rep.describe(exc)
        if self.crashed is None:
            self.crashed = Crash(text, exc if safe else None)
        self.fail_all(f"{name} failed unexpectedly")
        error = self._lost(
            f"the driver raised an unexpected exception during {name} ({text}); the "
            "connection is discarded"
        )
        return error, (exc if safe else None)

    async def recover_inline(self) -> None:
        """The client caught a cancellation (or a query timeout) and goes on using the lease:
        cancel and drain what was interrupted, roll back what was open, bounded; the transaction,
        if any, is failed."""
        self.fail_all("an interrupted call forced a rollback")
        try:
            clean = await restore_idle(
                self.conn, interrupted=self.interrupted, timeout=self.limits.cleanup_timeout
            )
        except drv.ConnectionLost as exc:
            self.broken = True
            text = f"recovery after an interrupted call: {exc}"
            raise self._lost(self.reporter.scrub(text)) from exc
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
        with trio.move_on_after(self.limits.cleanup_timeout) as scope:
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


_PLACEHOLDERS = {
    "format": ("%s (or %(name)s)", ("?", "$1")),
    "pyformat": ("%s (or %(name)s)", ("?", "$1")),
    "qmark": ("? (or :name)", ("%s", "$1")),
    "named": ("? (or :name)", ("%s", "$1")),
    "numeric": ("$1, $2, ...", ("%s", "?")),
}
_STRING_LITERAL = re.compile(r"'(?:[^']|'')*'")


def placeholder_hint(query: str | None, paramstyle: str | None) -> str:
    """A hint for an error on a query written with another driver's placeholders ("" when
    the query looks fine or the driver does not say which style it uses)."""
    if not query or paramstyle not in _PLACEHOLDERS:
        return ""
    ours, others = _PLACEHOLDERS[paramstyle]
    bare = _STRING_LITERAL.sub("''", query)
    for other in others:
        if other in bare:
            return f" (this driver's placeholders are {ours}, not {other})"
    return ""


def _query_error(
    rep: Reporter, exc: drv.DatabaseError, query: str | None, paramstyle: str | None = None
) -> QueryError:
    sqlstate = exc.sqlstate
    cls: type[QueryError] = QueryError
    if exc.kind == "integrity" or (sqlstate is not None and sqlstate.startswith("23")):
        cls = IntegrityError
    elif exc.kind == "serialization" or sqlstate in _SERIALIZATION_STATES:
        cls = SerializationFailure
    text = exc.message
    if sqlstate:
        text += f" (SQLSTATE {sqlstate})"
    text += placeholder_hint(query, paramstyle)
    if query:
        text += f" in query: {short(query)}"
    return cls(rep.scrub(text), pool=rep.name, sqlstate=sqlstate, query=query)
