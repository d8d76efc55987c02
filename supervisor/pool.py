"""``open_pool`` and :class:`Pool`: options, admission, hand-over, statistics, shutdown.

Who gets which connection is decided synchronously, in one place (:meth:`Pool.ready` and
:meth:`Pool._checkout`), over plain state: the idle deque (FIFO: the longest-idle connection goes
first, so every connection is used and idle pings rarely fire on a busy pool) and the waiter queue
(:mod:`supervisor.queue`). A connection is handed to a waiting task by rescheduling that task with
the lease as its result, so a hand-over can never be lost to a cancellation racing with it.
"""

from __future__ import annotations

import inspect
import itertools
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import outcome
import trio

from actors.actor import Actor, ActorConfig
from actors.driver import Connection as DriverConnection
from actors.driver import Driver, Params, Row, redact
from actors.messages import Checkin, Disconnect
from supervisor.backoff import Backoff
from supervisor.errors import (
    CheckoutTimeout,
    ConfigError,
    PoolClosed,
    PoolError,
    QueueDropped,
    SerializationFailure,
)
from supervisor.handles import (
    Connection,
    RunBlock,
    Session,
    TransactionBlock,
    one_shot,
    transaction_options,
)
from supervisor.limits import SafetyLimits
from supervisor.log import LogEntry, LogHook, emit
from supervisor.queue import CoDel, Waiter, WaiterQueue

if TYPE_CHECKING:
    from supervisor.supervision import Supervisor

__all__ = ["Pool", "PoolStatistics", "open_pool"]

_names = itertools.count(1)


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a pool. ``idle + busy + connecting == size`` always holds.

    ``size``: connection slots currently supervised (between ``min_size`` and ``max_size``).
    ``idle``: ready in the idle set. ``busy``: lent to a client. ``connecting``: not available:
    connecting, backing off after a failure, or being pinged / recovered by its actor.
    ``waiting``: clients queued. Counters since the pool opened: ``checkouts``, ``connects``,
    ``disconnects``, ``restarts`` (actor crashes restarted), ``dropped`` (``QueueDropped``),
    ``timeouts`` (``CheckoutTimeout``), ``revoked`` (leases taken back), ``query_timeouts``.
    """

    name: str
    size: int
    min_size: int
    max_size: int
    idle: int
    busy: int
    connecting: int
    waiting: int
    checkouts: int
    connects: int
    disconnects: int
    restarts: int
    dropped: int
    timeouts: int
    revoked: int
    query_timeouts: int


class Pool:
    """A supervised set of database connections. Made by :func:`open_pool`, never directly.

    Every method that can wait is a Trio checkpoint. Handles from :meth:`run` and
    :meth:`transaction` are valid only inside their ``async with`` block and only for one task at
    a time; inside such a block, the same task's :meth:`run`, :meth:`transaction` and one-shot
    methods reuse its connection (re-entrant), while child tasks get their own.
    """

    def __init__(
        self,
        driver: Driver,
        *,
        name: str,
        min_size: int,
        max_size: int,
        queue_target: float,
        queue_interval: float,
        backoff: Backoff,
        idle_interval: float,
        max_idle: float | None,
        max_lifetime: float | None,
        after_connect: Callable[[Connection], Awaitable[Any]] | None,
        configure: Callable[[Mapping[str, Any], int], Mapping[str, Any]] | None,
        limits: SafetyLimits,
        log: LogHook | None,
        log_params: bool,
        max_restarts: int,
        restart_window: float,
        seed: int | None,
    ) -> None:
        self.name = name
        self.driver = driver
        self.limits = limits
        self.log_hook = log
        self.min_size = min_size
        self.max_size = max_size
        self._log_params = log_params
        self._after_connect = after_connect
        self._configure = configure
        self._backoff = backoff
        self._rng = random.Random(seed)
        self._max_restarts = max_restarts
        self._restart_window = restart_window
        self._queue_interval = queue_interval
        self._queue = WaiterQueue(CoDel(queue_target, queue_interval))
        self._idle: deque[Actor] = deque()
        self._actors: dict[int, Actor] = {}
        self._holders: dict[trio.lowlevel.Task, Session] = {}
        self._config = ActorConfig(
            driver=driver,
            backoff=lambda: backoff.delays(self._rng),
            idle_interval=idle_interval,
            max_idle=max_idle,
            max_lifetime=max_lifetime,
            connect_timeout=limits.connect_timeout,
            cleanup_timeout=limits.cleanup_timeout,
            rng=self._rng,
        )
        self._secrets: list[str] = []
        self._last_connect_error: str | None = None
        self._state = "new"
        self._failure: PoolError | None = None
        self._leases_out = 0
        self._all_returned: trio.Event | None = None
        self._supervisor: Supervisor | None = None
        self.stats_checkouts = 0
        self.stats_connects = 0
        self.stats_disconnects = 0
        self.stats_restarts = 0
        self.stats_dropped = 0
        self.stats_timeouts = 0
        self.stats_revoked = 0
        self.stats_query_timeouts = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<Pool {self.name!r} {self.driver.name} {self._state} size={s.size} idle={s.idle} "
            f"busy={s.busy} waiting={s.waiting}>"
        )

    # -- public API -----------------------------------------------------------------------------

    def run(self, *, timeout: float | None = None, queue: bool = True) -> RunBlock:
        """Lock one connection for a series of requests: ``async with pool.run() as conn``.

        ``timeout`` bounds the wait for a connection (default ``limits.checkout_timeout``;
        ``CheckoutTimeout``). ``queue=False`` raises ``QueueDropped`` at once when no connection
        is idle. In a task that already holds a connection of this pool, it reuses it.
        """
        _check_timeout(self, timeout)
        return RunBlock(self, timeout, queue)

    def transaction(
        self,
        *,
        savepoint: bool = False,
        isolation: str | None = None,
        read_only: bool = False,
        mode: str | None = None,
        timeout: float | None = None,
        queue: bool = True,
    ) -> TransactionBlock:
        """A transaction block: ``async with pool.transaction() as tx``.

        BEGIN on entry, COMMIT on normal exit, ROLLBACK on an exception (re-raised) or on
        ``tx.rollback()`` (suppressed). Inside a transaction the task already holds, it nests:
        flat by default (no SQL; a failure poisons the whole transaction), a SAVEPOINT with
        ``savepoint=True``. ``isolation`` (e.g. ``"serializable"``), ``read_only`` and ``mode``
        (SQLite: ``"deferred"``, ``"immediate"``, ``"exclusive"``) apply to the outermost block.
        """
        _check_timeout(self, timeout)
        return TransactionBlock(
            self,
            savepoint=savepoint,
            options=transaction_options(isolation, read_only, mode),
            timeout=timeout,
            queue=queue,
        )

    async def run_transaction(
        self,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        retries: int = 3,
        isolation: str | None = None,
        read_only: bool = False,
        mode: str | None = None,
    ) -> Any:
        """Run ``await fn(tx, *args)`` in a transaction and return its result, re-running the
        whole transaction up to ``retries`` more times on a ``SerializationFailure`` (SQLSTATE
        40001 / 40P01, SQLite busy), with a short randomized pause between attempts.

        ``isolation``, ``read_only`` and ``mode`` are passed to :meth:`transaction` (on SQLite,
        ``mode="immediate"`` avoids most busy retries of write transactions). Inside a
        transaction the task already holds, it cannot retry (the outer transaction is the unit
        of retry): it runs ``fn`` once as a nested flat block, and the options must be unset.
        """
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries must be an integer >= 0, not {retries!r}", pool=self.name)
        held = self._holders.get(trio.lowlevel.current_task())
        options: dict[str, Any] = {"isolation": isolation, "read_only": read_only, "mode": mode}
        if held is not None and held.scopes:
            async with self.transaction(**options) as tx:
                return await fn(tx, *args)
        attempt = 0
        while True:
            result: Any = None
            try:
                async with self.transaction(**options) as tx:
                    result = await fn(tx, *args)
                return result  # committed, or rolled back by tx.rollback() (then None)
            except SerializationFailure:
                if attempt >= retries:
                    raise
                attempt += 1
                await trio.sleep(self._rng.uniform(0, 0.01 * 2**attempt))

    async def execute(self, query: str, params: Params = None) -> int:
        """One-shot :meth:`Connection.execute` (on the task's held connection, if any). Never
        retried: a write may have committed before a connection dropped."""
        return await one_shot(self, lambda c: c.execute(query, params), retry=False)

    async def fetch_all(self, query: str, params: Params = None) -> list[Row]:
        """One-shot :meth:`Connection.fetch_all`; retried once on a lost connection when it ran
        on its own lease."""
        return await one_shot(self, lambda c: c.fetch_all(query, params), retry=True)

    async def fetch_one(
        self, query: str, params: Params = None, *, optional: bool = False
    ) -> Row | None:
        """One-shot :meth:`Connection.fetch_one` (retried once on a lost connection)."""
        return await one_shot(
            self, lambda c: c.fetch_one(query, params, optional=optional), retry=True
        )

    async def fetch_val(self, query: str, params: Params = None, *, optional: bool = False) -> Any:
        """One-shot :meth:`Connection.fetch_val` (retried once on a lost connection)."""
        return await one_shot(
            self, lambda c: c.fetch_val(query, params, optional=optional), retry=True
        )

    async def fetch_column(self, query: str, params: Params = None) -> list[Any]:
        """One-shot :meth:`Connection.fetch_column` (retried once on a lost connection)."""
        return await one_shot(self, lambda c: c.fetch_column(query, params), retry=True)

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of sizes and counters."""
        idle = busy = 0
        for actor in self._actors.values():
            if actor.state == "idle":
                idle += 1
            elif actor.state == "busy":
                busy += 1
        size = len(self._actors)
        return PoolStatistics(
            name=self.name,
            size=size,
            min_size=self.min_size,
            max_size=self.max_size,
            idle=idle,
            busy=busy,
            connecting=size - idle - busy,
            waiting=len(self._queue),
            checkouts=self.stats_checkouts,
            connects=self.stats_connects,
            disconnects=self.stats_disconnects,
            restarts=self.stats_restarts,
            dropped=self.stats_dropped,
            timeouts=self.stats_timeouts,
            revoked=self.stats_revoked,
            query_timeouts=self.stats_query_timeouts,
        )

    def disconnect_all(self, interval: float = 0.0) -> Awaitable[None]:
        """Replace every connection, spread evenly over ``interval`` seconds, without failing
        any client: an idle connection is replaced when its turn comes, a busy one when its
        holder gives it back (failover, DNS change, rotated credentials).

        The replacements are scheduled when this is called, and it returns at once; the result
        may be awaited (a checkpoint) or ignored: ``pool.disconnect_all()`` and
        ``await pool.disconnect_all()`` do the same.
        """
        if (
            isinstance(interval, bool)
            or not isinstance(interval, int | float)
            or not math.isfinite(interval)
            or interval < 0
        ):
            raise ConfigError(f"interval must be a number >= 0, not {interval!r}", pool=self.name)
        actors = sorted(self._actors.values(), key=lambda a: a.index)
        now = trio.current_time()
        for i, actor in enumerate(actors):
            actor.send(Disconnect(now + interval * i / max(len(actors), 1)))
        return _Scheduled()

    # -- checkout and return (the hot path) -----------------------------------------------------

    async def _checkout(
        self,
        timeout: float | None,
        queue: bool,
        task: trio.lowlevel.Task | None = None,
        *,
        schedule: bool = True,
    ) -> Session:
        """Lease a connection. ``schedule=False`` skips the scheduling half of the checkpoint
        on the fast path, for callers whose next step is a driver call (itself a checkpoint,
        by the driver protocol): one-shot queries and BEGIN. That saves one scheduler pass
        (10-12% of a one-shot `select 1` on PostgreSQL). Cancellation is still checked first.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._state != "open":
            raise self._closed_error()
        if task is None:
            task = trio.lowlevel.current_task()
        if self._idle:
            actor = self._idle.popleft()
            session = self._lend(actor, task)
            self._holders[task] = session
            if schedule:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return session
        return await self._wait(task, timeout, queue)

    async def _wait(
        self, task: trio.lowlevel.Task, timeout: float | None, queue: bool
    ) -> Session:
        if not queue:
            self.stats_dropped += 1
            raise QueueDropped(
                f"no idle connection and queue=False ({self._load()})", pool=self.name
            )
        limit = self.limits.max_waiting
        if limit is not None and len(self._queue) >= limit:
            self.stats_dropped += 1
            raise QueueDropped(
                f"the queue is full: max_waiting={limit} ({self._load()})", pool=self.name
            )
        self._maybe_grow()
        now = trio.current_time()
        waiter = Waiter(now, task)
        self._queue.push(waiter)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._queue.discard(waiter)
            return trio.lowlevel.Abort.SUCCEEDED

        if timeout is None:
            timeout = self.limits.checkout_timeout
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            session: Session = await trio.lowlevel.wait_task_rescheduled(abort)
            self._holders[task] = session
            return session
        self.stats_timeouts += 1
        error = CheckoutTimeout(
            f"no connection became available within {timeout:g}s ({self._load()})",
            pool=self.name,
        )
        emit(self.log_hook, LogEntry(pool=self.name, call="timeout", pool_time=timeout,
                                     error=error))
        assert scope.cancelled_caught
        raise error

    def _load(self) -> str:
        s = self.statistics()
        text = (
            f"size {s.size}/{s.max_size}, {s.busy} busy, {s.idle} idle, "
            f"{s.connecting} connecting, {s.waiting} waiting"
        )
        if self._last_connect_error is not None and s.idle == 0 and s.busy < s.size:
            # The database is the problem, not the load: say so.
            text += f"; last connect attempt failed: {self._last_connect_error}"
        return text

    def _lend(self, actor: Actor, task: trio.lowlevel.Task | None) -> Session:
        assert actor.conn is not None
        session = Session(self, actor, actor.conn, actor.generation, task)
        actor.lend(session)
        self._leases_out += 1
        self.stats_checkouts += 1
        hold = self.limits.hold_timeout
        if hold is not None:
            session.hold_deadline = trio.current_time() + hold
            actor.poke(session.hold_deadline)
        return session

    def _checkin(self, session: Session) -> None:
        """A block that owned a lease ended (synchronous: never delays the client)."""
        if not session.active:
            return
        session.active = False
        if self._holders.get(session.task) is session:  # type: ignore[arg-type]
            del self._holders[session.task]  # type: ignore[arg-type]
        self._leases_out -= 1
        if self._leases_out == 0 and self._all_returned is not None:
            self._all_returned.set()
        if session.revoked is not None:
            return
        actor = session.actor
        if session.op_task is not None:
            # The block ended while another task is still inside a call on its handle: the
            # connection is mid-call and must not be lent again. The actor takes it back
            # (the straggler gets ConnectionLost) and connects a fresh one.
            session.kill(
                f"pool {self.name!r}: the block holding connection #{actor.index} ended while "
                f"task {session.op_task.name!r} was still running a call on it",
                "block ended with a call in flight",
            )
            return
        actor.lease = None
        if session.clean():
            self.ready(actor)
        else:
            actor.state = "maintenance"
            actor.send(Checkin(session))

    # -- Host protocol (called by actors) -------------------------------------------------------

    def ready(self, actor: Actor) -> None:
        """Hand ``actor``'s connection to the next waiter, or put it in the idle set."""
        now = trio.current_time()
        if self._state == "open" and self._queue.live:
            waiter, dropped = self._queue.serve(now)
            for gone in dropped:
                self._drop(gone, now)
            if waiter is not None:
                session = self._lend(actor, waiter.token)
                session.checkout_wait = now - waiter.start
                trio.lowlevel.reschedule(waiter.token, outcome.Value(session))
                return
        else:
            self._queue.codel.on_idle()
        actor.state = "idle"
        actor.idle_since = now
        self._idle.append(actor)

    def withdraw(self, actor: Actor) -> bool:
        """Take ``actor`` out of the idle set (for a ping, a replacement, shutdown)."""
        if actor.state != "idle":
            return False
        try:
            self._idle.remove(actor)
        except ValueError:
            pass
        actor.state = "maintenance"
        return True

    def can_shrink(self, actor: Actor) -> bool:
        """Elastic pools close idle connections above ``min_size`` (actors already on their
        way out do not count, so simultaneous expiries never go below ``min_size``)."""
        staying = sum(1 for a in self._actors.values() if not a.exiting)
        return staying > self.min_size

    def configure(self, options: Mapping[str, Any], index: int) -> Mapping[str, Any]:
        """Options for the next connect attempt (the ``configure=`` hook, if any)."""
        options = dict(options)
        if self._configure is not None:
            result = self._configure(options, index)
            if not isinstance(result, Mapping):
                raise ConfigError(
                    f"configure= must return a mapping of connect options, not "
                    f"{type(result).__name__}",
                    pool=self.name,
                )
            options = dict(result)
        self._secrets = sorted(
            set(self._secrets) | set(self.driver.secrets(options)), key=len, reverse=True
        )
        return options

    async def after_connect(self, actor: Actor, conn: DriverConnection) -> None:
        """Run the ``after_connect=`` hook with a handle on the new connection."""
        if self._after_connect is None:
            return
        task = trio.lowlevel.current_task()
        session = Session(self, actor, conn, actor.generation, task)
        handle = Connection(session)
        self._holders[task] = session  # pool.* one-shot calls in the hook use this connection
        try:
            await self._after_connect(handle)
        finally:
            handle._closed = True
            if self._holders.get(task) is session:
                del self._holders[task]
        if session.interrupted or session.broken or conn.status() != "idle":
            raise PoolError(
                "after_connect left the connection busy or in a transaction", pool=self.name
            )

    def report(
        self, event: str, actor: Actor, *, error: BaseException | None = None, message: str = ""
    ) -> None:
        """Count a lifecycle event and pass it to the log hook."""
        if event == "connect":
            self.stats_connects += 1
            self._last_connect_error = None
        elif event == "connect_failed" and error is not None:
            self._last_connect_error = self.scrub(f"{type(error).__name__}: {error}")
        elif event == "disconnect":
            self.stats_disconnects += 1
        elif event == "revoked":
            self.stats_revoked += 1
        if self.log_hook is not None:
            text = message
            if error is not None:
                text = (text + ": " if text else "") + f"{type(error).__name__}: {error}"
            emit(
                self.log_hook,
                LogEntry(
                    pool=self.name,
                    call=event,
                    connection=actor.index,
                    error=self.safe_error(error),
                    message=self.scrub(text) or None,
                ),
            )

    # -- helpers used by handles and the supervisor ---------------------------------------------

    def scrub(self, text: str) -> str:
        """Remove every known secret from ``text``."""
        return redact(text, self._secrets)

    def safe_error(self, error: BaseException | None) -> BaseException | None:
        """``error`` for a log entry, or, if its text (or that of any exception it chains to)
        contains a known secret, a scrubbed stand-in with no chain: a log hook that prints
        ``entry.error`` must never print a password."""
        if error is None or not self._secrets:
            return error
        seen: set[int] = set()
        exc: BaseException | None = error
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            text = f"{exc!s} {exc!r}"
            if any(secret and secret in text for secret in self._secrets):
                return PoolError(
                    self.scrub(f"{type(error).__name__}: {error}"), pool=self.name
                )
            exc = exc.__cause__ or exc.__context__
        return error

    def log_params_of(self, params: Params) -> Any:
        """What the log hook may see of the parameters."""
        if params is None or self._log_params:
            return params
        return f"<{len(params)} params redacted>"

    def _drop(self, waiter: Waiter, now: float) -> None:
        self.stats_dropped += 1
        cause = (
            "no connection could be made"
            if self._last_connect_error is not None and not self._idle
            else "the pool is overloaded"
        )
        error = QueueDropped(
            f"dropped from the queue after waiting {now - waiter.start:.3f}s: {cause} "
            f"(queue_target={self._queue.codel.target:g}s, {self._load()})",
            pool=self.name,
        )
        emit(self.log_hook, LogEntry(pool=self.name, call="dropped", error=error,
                                     pool_time=now - waiter.start))
        trio.lowlevel.reschedule(waiter.token, outcome.Error(error))

    def _maybe_grow(self) -> None:
        if self._supervisor is None or len(self._actors) >= self.max_size:
            return
        starting = sum(1 for a in self._actors.values() if a.state in ("connecting", "backoff"))
        if starting <= len(self._queue):
            self._start_slot()

    def _start_slot(self) -> None:
        assert self._supervisor is not None
        index = next(i for i in itertools.count() if i not in self._actors)
        self._actors[index] = Actor(index, self, self._config)  # placeholder until it runs
        self._supervisor.start(index)

    def _new_actor(self, index: int) -> Actor:
        actor = self._actors.get(index)
        if actor is None or actor.state != "connecting" or actor.generation != 0:
            actor = Actor(index, self, self._config)
        self._actors[index] = actor
        return actor

    def _actor_gone(self, actor: Actor, *, crashed: bool) -> None:
        self.withdraw(actor)
        actor.state = "stopped"
        if not crashed and self._actors.get(actor.index) is actor:
            del self._actors[actor.index]

    def _fail(self, error: PoolError) -> None:
        self._failure = error
        self._state = "failed"
        for waiter in self._queue.drain():
            # A distinct instance per waiter: the supervisor raises ``error`` itself, and one
            # exception object must not travel up two tasks (it would be counted twice).
            trio.lowlevel.reschedule(waiter.token, outcome.Error(self._closed_error()))

    def _closed_error(self) -> PoolError:
        if self._failure is not None:
            return PoolClosed(str(self._failure), pool=self.name)
        return PoolClosed("the pool is closed", pool=self.name)

    async def _codel_poll(self) -> None:
        while True:
            await trio.sleep(self._queue_interval)
            now = trio.current_time()
            for waiter in self._queue.poll(now):
                self._drop(waiter, now)

    async def _open(self, nursery: trio.Nursery) -> None:
        from supervisor.supervision import Supervisor

        self._supervisor = Supervisor(
            self,
            nursery,
            delays=lambda: self._backoff.delays(self._rng),
            max_restarts=self._max_restarts,
            restart_window=self._restart_window,
        )
        self._state = "open"
        nursery.start_soon(self._codel_poll, name=f"pool {self.name} queue poll")
        for _ in range(self.min_size):
            self._start_slot()
        await trio.lowlevel.checkpoint()

    async def _close(self, nursery: trio.Nursery) -> None:
        if self._state == "open":
            self._state = "closing"
        closed = PoolClosed("the pool is closing", pool=self.name)
        for waiter in self._queue.drain():
            trio.lowlevel.reschedule(waiter.token, outcome.Error(closed))
        with trio.CancelScope(shield=True):
            if self._leases_out:
                self._all_returned = trio.Event()
                with trio.move_on_after(self.limits.shutdown_grace):
                    await self._all_returned.wait()
            if self._state == "closing":
                self._state = "closed"
        nursery.cancel_scope.cancel()


class _Scheduled:
    """What :meth:`Pool.disconnect_all` returns: the work is done; awaiting it is a
    checkpoint (Trio's rule for anything awaitable)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return trio.lowlevel.checkpoint().__await__()  # noqa: ASYNC105 - delegated await


def _check_timeout(pool: Pool, timeout: float | None) -> None:
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or math.isnan(timeout)
        or timeout < 0
    ):
        raise ConfigError(f"timeout must be a number of seconds >= 0, not {timeout!r}",
                          pool=pool.name)


# -- open_pool ------------------------------------------------------------------------------------


def _driver_for(target: str | Driver, name: str) -> Driver:
    if not isinstance(target, str):
        missing = [m for m in ("connect", "options", "secrets") if not hasattr(target, m)]
        if missing:
            raise ConfigError(
                f"target must be a database URL or a driver object; {type(target).__name__} "
                f"has no {', '.join(missing)}",
                pool=name,
            )
        return target
    scheme = target.split(":", 1)[0].lower() if ":" in target else ""
    try:
        if scheme in ("postgresql", "postgres"):
            from actors.psycopg import from_url as pg_from_url

            return pg_from_url(target)
        if scheme == "sqlite":
            from actors.sqlite import from_url as sqlite_from_url

            return sqlite_from_url(target)
    except ImportError as exc:
        raise ConfigError(
            f"the {scheme} driver is not installed ({exc}); install "
            f"trio-connection-supervisor[{'postgresql' if scheme != 'sqlite' else ''}]",
            pool=name,
        ) from exc
    except ValueError as exc:
        raise ConfigError(f"bad target URL: {exc}", pool=name) from exc
    raise ConfigError(
        f"unsupported target URL scheme {scheme + ':' if scheme else '(none)'}; use "
        "postgresql://, postgres://, sqlite:///path or sqlite://:memory:, or pass a driver",
        pool=name,
    )


def _number(name: str, pool: str, value: Any, *, optional: bool = False, zero: bool = False,
            integer: bool = False) -> None:
    if value is None and optional:
        return
    kinds: type | tuple[type, ...] = int if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kinds)
    if ok and not integer:
        ok = not math.isnan(value)
    if ok:
        ok = value >= 0 if zero else value > 0
    if not ok:
        what = "an integer" if integer else "a number"
        bound = ">= 0" if zero else "> 0"
        raise ConfigError(
            f"option {name} must be {what} {bound}{' or None' if optional else ''}, "
            f"not {value!r}",
            pool=pool,
        )


def open_pool(
    target: str | Driver,
    *,
    size: int | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    queue_target: float = 0.05,
    queue_interval: float = 1.0,
    backoff: Backoff | None = None,
    idle_interval: float = 1.0,
    max_idle: float | None = 600.0,
    max_lifetime: float | None = None,
    after_connect: Callable[[Connection], Awaitable[Any]] | None = None,
    configure: Callable[[Mapping[str, Any], int], Mapping[str, Any]] | None = None,
    limits: SafetyLimits | None = None,
    log: LogHook | None = None,
    log_params: bool = False,
    name: str | None = None,
    max_restarts: int = 10,
    restart_window: float = 60.0,
    seed: int | None = None,
) -> _PoolContext:
    """Open a pool: ``async with open_pool("sqlite:///app.db", size=4) as pool``.

    ``target`` is a URL (``postgresql://`` / ``postgres://``: psycopg; ``sqlite:///path`` or
    ``sqlite://:memory:``: SQLite) or a driver object. Options are validated here: a bad one
    raises :class:`ConfigError` naming it, and nothing is started.

    Sizing: ``size`` (fixed, default 10) or ``min_size`` / ``max_size`` (elastic: connections
    above ``min_size`` are opened when clients queue and closed after ``max_idle`` seconds
    idle). ``queue_target`` / ``queue_interval``: CoDel shedding (see :mod:`supervisor.queue`).
    ``backoff``: reconnect delays after failed connects, and restart delays after crashes.
    ``idle_interval``: ping a connection idle that long. ``max_lifetime``: replace connections
    older than that (minus up to 5% jitter, so they do not all expire together).
    ``after_connect``: ``async fn(conn)`` run on each new connection before its first use.
    ``configure``: ``fn(options, index) -> options`` before every connect (credential rotation).
    ``limits``: :class:`SafetyLimits`. ``log``: ``fn(LogEntry)``; ``log_params`` lets it see
    query parameters. ``name``: appears in every error message and log entry.
    ``max_restarts`` / ``restart_window``: restart intensity (more crashes than that within the
    window fail the pool). ``seed``: makes jitter and backoff reproducible.
    """
    pool_name = name if name is not None else f"{getattr(target, 'name', None) or 'pool'}"
    if name is not None and (not isinstance(name, str) or not name):
        raise ConfigError(f"option name must be a non-empty string, not {name!r}")
    if name is None:
        scheme = target.split(":", 1)[0] if isinstance(target, str) else pool_name
        pool_name = f"{scheme}-{next(_names)}"
    if size is not None and (min_size is not None or max_size is not None):
        raise ConfigError("give either size or min_size/max_size, not both", pool=pool_name)
    if size is not None:
        _number("size", pool_name, size, integer=True)
        lo = hi = size
    elif min_size is None and max_size is None:
        lo = hi = 10
    else:
        hi = max_size if max_size is not None else max(min_size or 0, 10)
        lo = min_size if min_size is not None else 0
        _number("min_size", pool_name, lo, integer=True, zero=True)
        _number("max_size", pool_name, hi, integer=True)
        if lo > hi:
            raise ConfigError(
                f"option min_size ({lo}) must not exceed max_size ({hi})", pool=pool_name
            )
    _number("queue_target", pool_name, queue_target)
    _number("queue_interval", pool_name, queue_interval)
    _number("idle_interval", pool_name, idle_interval)
    _number("max_idle", pool_name, max_idle, optional=True)
    _number("max_lifetime", pool_name, max_lifetime, optional=True)
    _number("max_restarts", pool_name, max_restarts, integer=True, zero=True)
    _number("restart_window", pool_name, restart_window)
    if backoff is None:
        backoff = Backoff()
    elif not isinstance(backoff, Backoff):
        raise ConfigError(f"option backoff must be a Backoff, not {backoff!r}", pool=pool_name)
    if limits is None:
        limits = SafetyLimits()
    elif not isinstance(limits, SafetyLimits):
        raise ConfigError(f"option limits must be a SafetyLimits, not {limits!r}", pool=pool_name)
    for opt, fn in (("after_connect", after_connect), ("configure", configure), ("log", log)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"option {opt} must be callable, not {fn!r}", pool=pool_name)
    if inspect.isfunction(after_connect) and not inspect.iscoroutinefunction(after_connect):
        raise ConfigError(
            "option after_connect must be an async function (async def f(conn)), "
            f"not the plain function {after_connect.__name__!r}",
            pool=pool_name,
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"option seed must be an integer or None, not {seed!r}", pool=pool_name)
    driver = _driver_for(target, pool_name)
    pool = Pool(
        driver,
        name=pool_name,
        min_size=lo,
        max_size=hi,
        queue_target=queue_target,
        queue_interval=queue_interval,
        backoff=backoff,
        idle_interval=idle_interval,
        max_idle=max_idle,
        max_lifetime=max_lifetime,
        after_connect=after_connect,
        configure=configure,
        limits=limits,
        log=log,
        log_params=log_params,
        max_restarts=max_restarts,
        restart_window=restart_window,
        seed=seed,
    )
    return _PoolContext(pool, owns_driver=isinstance(target, str))


class _PoolContext:
    """The async context manager returned by :func:`open_pool`.

    It runs the pool's nursery around the body and never lets an ExceptionGroup escape: a
    single error (from the body or from the pool) comes out as itself.
    """

    def __init__(self, pool: Pool, *, owns_driver: bool) -> None:
        self._pool = pool
        self._owns_driver = owns_driver
        self._cm: Any = None
        self._body_error: BaseException | None = None

    async def __aenter__(self) -> Pool:
        if self._cm is not None:
            raise PoolError("open_pool(...) context entered twice", pool=self._pool.name)
        self._cm = self._run()
        pool: Pool = await self._cm.__aenter__()
        return pool

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        try:
            result: bool | None = await self._cm.__aexit__(*exc_info)
            return result
        except BaseExceptionGroup as group:
            leaf = _single_leaf(group, self._pool, self._body_error)
            if leaf is None:
                raise
            cause, context, tb = leaf.__cause__, leaf.__context__, leaf.__traceback__
            try:
                raise leaf.with_traceback(tb)
            finally:
                leaf.__cause__, leaf.__context__ = cause, context
                del leaf, group

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[Pool]:
        pool = self._pool
        try:
            async with trio.open_nursery() as nursery:
                await pool._open(nursery)
                try:
                    yield pool
                except BaseException as exc:
                    self._body_error = exc  # to give back this very object, not a copy
                    raise
                finally:
                    await pool._close(nursery)
        finally:
            if self._owns_driver:
                await _close_driver(pool.driver)


async def _close_driver(driver: Driver) -> None:
    """Release a driver the pool built from a URL (optional ``close()``, sync or async)."""
    close = getattr(driver, "close", None)
    if close is None:
        return
    with trio.CancelScope(shield=True):
        result = close()
        if inspect.isawaitable(result):
            await result


def _same(a: BaseException, b: BaseException) -> bool:
    """``a`` is ``b``, or a copy Trio derived from it (same message, same leaves)."""
    if a is b:
        return True
    if isinstance(a, BaseExceptionGroup) and isinstance(b, BaseExceptionGroup):
        return (
            type(a) is type(b)
            and a.message == b.message
            and len(a.exceptions) == len(b.exceptions)
            and all(_same(x, y) for x, y in zip(a.exceptions, b.exceptions, strict=True))
        )
    return False


def _single_leaf(
    group: BaseExceptionGroup[BaseException], pool: Pool, body: BaseException | None
) -> BaseException | None:
    """The one exception a group stands for, or None if it really holds several.

    Cancellations are noise here (the nursery's own). When the pool failed, the supervisor's
    ``PoolClosed`` and the copies delivered to waiting clients are one failure: a body that
    raised something else wins (its context shows the failure), otherwise the pool's failure.
    """
    # Only the nursery's own group is ours to unwrap: an ExceptionGroup raised by the body (or
    # by a nursery inside it) is one of the children and comes out exactly as raised.
    unique = list({id(e): e for e in group.exceptions}.values())
    real = [e for e in unique if not isinstance(e, trio.Cancelled)]
    if pool._failure is not None:
        others = [e for e in real if not (isinstance(e, PoolClosed) and e.pool == pool.name)]
        if not others:
            return pool._failure
        real = others
    if len(real) == 1:
        if body is not None and _same(real[0], body):
            return body
        return real[0]
    if not real and unique:
        return unique[0]
    return None

