"""The pool: the public facade over one lender, one supervisor and one reporter, and
``open_pool``, the only way to make one.

This module wires the layers together and holds no policy of its own: who gets which connection
is the lender's (:mod:`supervisor.lender`), starting and restarting actors the supervisor's
(:mod:`supervisor.supervision`), counters and scrubbing the reporter's
(:mod:`supervisor.reporter`), the rules of a call the session's (:mod:`supervisor.session`).
What it adds is the lifecycle: open the nursery, start ``min_size`` slots, run the user's
block, then stop taking work, let held handles finish (up to ``shutdown_grace``), close every
connection, and give back one error, never an ExceptionGroup (:mod:`supervisor.groups`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, NoReturn, TypeVar, final

import trio

import supervisor.statements as statements
from actors import driver as drv
from actors.actor import Actor
from actors.driver import Driver, Params
from supervisor.backoff import Backoff
from supervisor.errors import ConfigError, PoolError, SerializationFailure
from supervisor.groups import single_error
from supervisor.handles import (
    Connection,
    RunBlock,
    TransactionBlock,
    transaction_options,
)
from supervisor.lender import Lender, PoolStatistics
from supervisor.limits import SafetyLimits
from supervisor.log import LogHook
from supervisor.options import Configure, PoolOptions, ResetMode, SessionSettings
from supervisor.reporter import Reporter
from supervisor.rows import RowFactory, tuple_row
from supervisor.session import Query, Session
from supervisor.statements import Statement
from supervisor.supervision import Supervisor
from supervisor.validate import check_number

__all__ = ["Pool", "PoolContext", "PoolStatistics", "open_pool"]

_T = TypeVar("_T")

_HOOK_SETTINGS = SessionSettings(reset="never")
"""Sessions of the pool's own hooks: what after_connect sets up is the session's baseline."""


class _NoPublicConstructor(type):
    """Trio's rule for classes made only by a factory: calling the class raises ``TypeError``."""

    def __call__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} has no public constructor; "
            "use `async with open_pool(target, ...) as pool`"
        )

    def _create(cls: type[_T], *args: Any, **kwargs: Any) -> _T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc, no-any-return]


@final
class Pool(metaclass=_NoPublicConstructor):
    """A supervised set of database connections. Made by :func:`open_pool`, never directly.

    Every method that can wait is a Trio checkpoint. Handles from :meth:`run` and
    :meth:`transaction` are valid only inside their ``async with`` block and only for one task at
    a time; inside such a block, the same task's :meth:`run`, :meth:`transaction` and one-shot
    methods reuse its connection (re-entrant), while child tasks get their own.
    """

    def __init__(self, driver: Driver, options: PoolOptions) -> None:
        self._driver = driver
        self._options = options
        self._reporter = Reporter(options.name, options.log, log_params=options.log_params)
        self._lender = Lender(
            driver,
            options,
            self._reporter,
            after_connect=self._run_after_connect,
            reset_session=self._run_reset,
        )
        self._supervisor: Supervisor | None = None

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<Pool {self.name!r} {self._driver.name} {self._lender.state} size={s.size} "
            f"idle={s.idle} busy={s.busy} waiting={s.waiting}>"
        )

    @property
    def name(self) -> str:
        """The pool's name, as it appears in every message and log entry."""
        return self._options.name

    @property
    def driver(self) -> Driver:
        """The driver that makes this pool's connections."""
        return self._driver

    @property
    def limits(self) -> SafetyLimits:
        """The pool's :class:`SafetyLimits`."""
        return self._options.limits

    @property
    def min_size(self) -> int:
        """Connections kept open even when idle."""
        return self._lender.min_size

    @property
    def max_size(self) -> int:
        """Most connections open at once."""
        return self._lender.max_size

    # -- public API -----------------------------------------------------------------------------

    def run(self, *, timeout: float | None = None, queue: bool = True) -> RunBlock:
        """Lock one connection for a series of requests: ``async with pool.run() as conn``.

        ``timeout`` bounds the wait for a connection (default ``limits.checkout_timeout``;
        ``CheckoutTimeout``). ``queue=False`` raises ``QueueDropped`` at once when no connection
        is idle. In a task that already holds a connection of this pool, it reuses it.
        """
        if timeout is not None:
            _check_timeout(self.name, timeout)
        return RunBlock(self._lender, timeout, queue)

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
        if timeout is not None:
            _check_timeout(self.name, timeout)
        return TransactionBlock(
            self._lender,
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
        check_number("retries", retries, pool=self.name, integer=True, zero=True)
        if not callable(fn) or (
            inspect.isfunction(fn) and not inspect.iscoroutinefunction(fn)
        ):
            raise ConfigError(
                "run_transaction needs an async function, called as `await fn(tx, *args)`: "
                f"define it with `async def`, not {fn!r}",
                pool=self.name,
            )
        held = self._lender.held(trio.lowlevel.current_task())
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
                await trio.sleep(self._lender.rng.uniform(0, 0.01 * 2**attempt))

    async def execute(self, query: Query, params: Params = None) -> int:
        """One-shot :meth:`Connection.execute` (on the task's held connection, if any). Never
        retried: a write may have committed before a connection dropped."""
        return await statements.execute(self._lender, query, params)

    async def execute_many(self, query: Query, params_seq: Iterable[Params]) -> int:
        """One-shot :meth:`Connection.execute_many`: one statement per parameter set, in one
        transaction (or in the task's own); returns the total rows affected."""
        return await statements.execute_many(self._lender, query, params_seq)

    async def fetch_all(
        self, query: Query, params: Params = None, *, row_factory: RowFactory | None = None
    ) -> list[Any]:
        """One-shot :meth:`Connection.fetch_all`; retried once on a lost connection when it ran
        on its own lease."""
        return await statements.fetch_all(self._lender, query, params, row_factory)

    async def fetch_one(
        self,
        query: Query,
        params: Params = None,
        *,
        optional: bool = False,
        row_factory: RowFactory | None = None,
    ) -> Any:
        """One-shot :meth:`Connection.fetch_one` (retried once on a lost connection)."""
        return await statements.fetch_one(self._lender, query, params, optional, row_factory)

    async def fetch_val(
        self, query: Query, params: Params = None, *, optional: bool = False
    ) -> Any:
        """One-shot :meth:`Connection.fetch_val` (retried once on a lost connection)."""
        return await statements.fetch_val(self._lender, query, params, optional)

    async def fetch_column(self, query: Query, params: Params = None) -> list[Any]:
        """One-shot :meth:`Connection.fetch_column` (retried once on a lost connection)."""
        return await statements.fetch_column(self._lender, query, params)

    def statement(self, query: str) -> Statement:
        """A :class:`Statement` for ``query`` (sync, no I/O): prepared lazily once per physical
        connection, again after a reconnect; usable through the pool or on any handle."""
        if not isinstance(query, str):
            raise ConfigError(
                f"pool.statement() takes SQL text, not {type(query).__name__}", pool=self.name
            )
        return Statement(self._lender, query)

    async def wait(self, timeout: float | None = None) -> None:
        """Return once ``min_size`` connections are idle (ready for clients); raise
        ``CheckoutTimeout`` after ``timeout`` seconds (default ``limits.checkout_timeout``),
        saying why (the last connect error, if connects are failing)."""
        if timeout is not None:
            _check_timeout(self.name, timeout)
        await self._lender.wait_ready(timeout)

    async def check(self) -> int:
        """Ping every idle connection now; the dead ones are replaced. Returns how many were
        found dead (it does not wait for their replacements)."""
        return await self._lender.check(self.limits.cleanup_timeout)

    def resize(self, min_size: int | None = None, max_size: int | None = None) -> None:
        """Change the pool's size bounds now (sync; ``ConfigError`` on bad values, and then
        nothing changes). Growing ``min_size`` starts connections; lowering ``max_size`` closes
        idle ones above it at once and busy ones when they are given back."""
        lender = self._lender
        lo = lender.min_size if min_size is None else min_size
        hi = lender.max_size if max_size is None else max_size
        check_number("min_size", lo, pool=self.name, integer=True, zero=True)
        check_number("max_size", hi, pool=self.name, integer=True)
        if lo > hi:
            raise ConfigError(f"min_size ({lo}) must not exceed max_size ({hi})", pool=self.name)
        lender.resize(lo, hi)

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of sizes and counters."""
        return self._lender.statistics()

    def disconnect_all(self, interval: float = 0.0) -> Awaitable[None]:
        """Replace every connection, spread evenly over ``interval`` seconds, without failing
        any client: an idle connection is replaced when its turn comes, a busy one when its
        holder gives it back (failover, DNS change, rotated credentials).

        The replacements are scheduled when this is called, and it returns at once; the result
        may be awaited (a checkpoint) or ignored: ``pool.disconnect_all()`` and
        ``await pool.disconnect_all()`` do the same.
        """
        check_number("interval", interval, pool=self.name, zero=True, finite=True)
        actors = self._lender.actors()
        now = trio.current_time()
        for i, actor in enumerate(actors):
            actor.replace_at(now + interval * i / max(len(actors), 1))
        return _Scheduled()

    # -- checkout and return (the hot path) -----------------------------------------------------

    # -- lifecycle (used by open_pool) ----------------------------------------------------------

    async def _run_hook(
        self,
        what: str,
        hook: Callable[[Connection], Awaitable[Any]],
        actor: Actor,
        conn: drv.Connection,
    ) -> None:
        """Run a user hook (``after_connect=``, ``reset=``) with a handle on ``conn``; the pool's
        one-shot calls in the hook run on it too. It must leave the connection idle."""
        task = trio.lowlevel.current_task()
        lender = self._lender
        session = Session(self._reporter, self.limits, actor, conn, actor.generation, task,
                          _HOOK_SETTINGS)
        handle = Connection(session)
        lender.holders[task] = session
        try:
            await hook(handle)
        finally:
            handle._closed = True
            if lender.holders.get(task) is session:
                del lender.holders[task]
        if session.interrupted or session.broken or conn.status() != "idle":
            raise PoolError(
                f"{what} left the connection busy or in a transaction", pool=self.name
            )

    async def _run_after_connect(self, actor: Actor, conn: drv.Connection) -> None:
        """The ``after_connect=`` hook, if any."""
        hook = self._options.after_connect
        if hook is not None:
            await self._run_hook("after_connect", hook, actor, conn)

    async def _run_reset(self, actor: Actor, conn: drv.Connection) -> None:
        """Reset a session a lease left dirty: the user's ``reset=`` function (with a handle),
        or the driver's own reset; then ``after_connect`` again, so the next lease finds the
        connection as a new one."""
        reset = self._options.reset
        if callable(reset):
            await self._run_hook("the reset= function", reset, actor, conn)
            return
        driver_reset = getattr(conn, "reset_session", None)
        if driver_reset is not None:
            await driver_reset()
        await self._run_after_connect(actor, conn)

    def _start_slot(self, index: int) -> None:
        assert self._supervisor is not None
        self._supervisor.start(index)

    async def _open(self, nursery: trio.Nursery) -> None:
        options = self._options
        lender = self._lender
        self._supervisor = Supervisor(
            lender,
            nursery,
            delays=lambda: options.backoff.delays(lender.rng),
            max_restarts=options.max_restarts,
            restart_window=options.restart_window,
        )
        lender.grow = self._start_slot
        lender.open()
        nursery.start_soon(lender.poll_queue, name=f"pool {self.name} queue poll")
        for _ in range(options.min_size):
            self._start_slot(lender.new_slot())
        await trio.lowlevel.checkpoint()

    async def _close(self, nursery: trio.Nursery) -> None:
        await self._lender.close(self.limits.shutdown_grace)
        nursery.cancel_scope.cancel()


@final
class _Scheduled:
    """What :meth:`Pool.disconnect_all` returns: the work is done; awaiting it is a
    checkpoint (Trio's rule for anything awaitable)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return trio.lowlevel.checkpoint().__await__()  # noqa: ASYNC105 - delegated await


def _check_timeout(pool: str, timeout: float | None) -> None:
    check_number("timeout", timeout, pool=pool, optional=True, zero=True, unit=" of seconds")


# -- open_pool ------------------------------------------------------------------------------------

_EXTRAS = {"sqlite": "", "postgresql+asyncpg": "asyncpg", "postgres+asyncpg": "asyncpg"}
_KEYWORDS = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*=")


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
    if "://" not in target and _KEYWORDS.match(target):
        scheme = "postgresql"  # a libpq keyword string: "host=... dbname=..."
        try:
            from actors.psycopg import PsycopgDriver
        except ImportError as exc:
            raise ConfigError(
                f"the postgresql driver is not installed ({exc}); install "
                "trio-connection-supervisor[postgresql]",
                pool=name,
            ) from exc
        try:
            return PsycopgDriver(target)
        except ValueError as exc:
            raise ConfigError(f"bad libpq keyword target: {exc}", pool=name) from exc
    try:
        if scheme in ("postgresql+asyncpg", "postgres+asyncpg"):
            from actors.aio import from_url as aio_from_url

            return aio_from_url(target)
        if scheme in ("postgresql", "postgres"):
            from actors.psycopg import from_url as pg_from_url

            return pg_from_url(target)
        if scheme == "sqlite":
            from actors.sqlite import from_url as sqlite_from_url

            return sqlite_from_url(target)
    except ImportError as exc:
        raise ConfigError(
            f"the {scheme} driver is not installed ({exc}); install "
            f"trio-connection-supervisor[{_EXTRAS.get(scheme, 'postgresql')}]",
            pool=name,
        ) from exc
    except ValueError as exc:
        raise ConfigError(f"bad target URL: {exc}", pool=name) from exc
    shown = f"{scheme}:" if re.fullmatch(r"[a-z][a-z0-9+.-]{0,30}", scheme) else "(none)"
    raise ConfigError(
        f"unsupported target URL scheme {shown}; use postgresql://, postgres://, "
        "postgresql+asyncpg://, sqlite:///path or sqlite://:memory:, a libpq keyword string, "
        "or pass a driver",
        pool=name,
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
    configure: Configure | None = None,
    limits: SafetyLimits | None = None,
    log: LogHook | None = None,
    log_params: bool = False,
    name: str | None = None,
    max_restarts: int = 10,
    restart_window: float = 60.0,
    seed: int | None = None,
    row_factory: RowFactory = tuple_row,
    statement_cache_size: int = 100,
    reset: ResetMode | Callable[[Connection], Awaitable[Any]] = "auto",
) -> PoolContext:
    """Open a pool: ``async with open_pool("sqlite:///app.db", size=4) as pool``.

    ``target`` is a URL (``postgresql://`` / ``postgres://``: psycopg, Trio-native;
    ``postgresql+asyncpg://``: asyncpg hosted through trio-asyncio; ``sqlite:///path`` or
    ``sqlite://:memory:``: SQLite), a libpq keyword string (``"host=... dbname=..."``) or a
    driver object. Options are validated here: a bad one
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
    ``row_factory``: how rows come back by default (:mod:`supervisor.rows`).
    ``statement_cache_size``: statements kept prepared per connection (least recently used
    evicted). ``reset``: session hygiene between leases: ``"auto"`` (default: reset only after
    a lease whose statements may have changed session state, at no cost otherwise),
    ``"always"``, ``"never"``, or an ``async fn(conn)`` awaited after every lease instead of the
    built-in reset.

    Returns a :class:`PoolContext`, an async context manager that yields the :class:`Pool`.
    """
    options = PoolOptions.build(
        target,
        size=size,
        min_size=min_size,
        max_size=max_size,
        name=name,
        backoff=backoff,
        limits=limits,
        queue_target=queue_target,
        queue_interval=queue_interval,
        idle_interval=idle_interval,
        max_idle=max_idle,
        max_lifetime=max_lifetime,
        after_connect=after_connect,
        configure=configure,
        log=log,
        log_params=log_params,
        max_restarts=max_restarts,
        restart_window=restart_window,
        seed=seed,
        row_factory=row_factory,
        statement_cache_size=statement_cache_size,
        reset=reset,
    )
    driver = _driver_for(target, options.name)
    return PoolContext._create(Pool._create(driver, options), owns_driver=isinstance(target, str))


@final
class PoolContext(metaclass=_NoPublicConstructor):
    """What :func:`open_pool` returns: ``async with`` it to run the pool around a block.

    It runs the pool's nursery around the body and never lets an ExceptionGroup escape: a
    single error (from the body or from the pool) comes out as itself (the rule is in
    :mod:`supervisor.groups`). It can be entered once. ``await open_pool(...)`` is a mistake
    and raises ``TypeError`` saying to use ``async with``.
    """

    def __init__(self, pool: Pool, *, owns_driver: bool) -> None:
        self._pool = pool
        self._owns_driver = owns_driver
        self._cm: Any = None
        self._body_error: BaseException | None = None

    def __repr__(self) -> str:
        return f"<PoolContext for pool {self._pool.name!r}>"

    def __await__(self) -> NoReturn:
        raise TypeError(
            f"pool {self._pool.name!r}: open_pool(...) is not awaitable; use "
            "`async with open_pool(...) as pool:` (the pool lives as long as the block)"
        )

    async def __aenter__(self) -> Pool:
        if self._cm is not None:
            raise PoolError("open_pool(...) context entered twice", pool=self._pool.name)
        self._cm = self._run()
        try:
            pool: Pool = await self._cm.__aenter__()
        except BaseExceptionGroup as group:
            self._raise_single(group)  # the pool failed while opening
        return pool

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            result: bool | None = await self._cm.__aexit__(exc_type, exc, tb)
            return result
        except BaseExceptionGroup as group:
            self._raise_single(group)

    def _raise_single(self, group: BaseExceptionGroup[BaseException]) -> NoReturn:
        pool = self._pool
        leaf = single_error(
            group, pool=pool.name, body=self._body_error, failure=pool._lender.failure
        )
        cause, context, leaf_tb = leaf.__cause__, leaf.__context__, leaf.__traceback__
        try:
            raise leaf.with_traceback(leaf_tb)
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
