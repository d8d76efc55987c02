"""The lender: who gets which connection. The idle set, the waiters, the hand-over, the holders.

Who gets which connection is decided synchronously, in one place (:meth:`Lender.ready` and the
fast path of :meth:`Lender.checkout`), over plain state: the idle deque (FIFO: the longest-idle
connection goes first, so every connection is used and idle pings rarely fire on a busy pool)
and the waiter queue (:mod:`supervisor.queue`, CoDel shedding). A connection is handed to a
waiting task by rescheduling that task with the session as its result, so a hand-over can never
be lost to a cancellation racing with it.

Rules:

* The lender owns the slot registry (index -> actor), the idle set, the queue, the holder map
  (task -> session: what makes one-shots and nested blocks reuse the task's connection), the
  count of leases out and the count of checkouts. Nothing else writes them.
* Lending is one synchronous, KeyboardInterrupt-protected step (count the lease, register its
  holder, mark the actor busy), and so is giving back: a Ctrl-C can never leave a lease counted
  with no holder to return it.
* The lender is the actors' :class:`~actors.actor.Host`; what it cannot know (the user's
  ``configure`` and ``after_connect`` hooks, starting a new slot) is given to it by the pool as
  plain callables, so it imports nothing above :mod:`supervisor.session`.
"""

from __future__ import annotations

import inspect
import itertools
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, final

import outcome
import trio

from actors import driver as drv
from actors.actor import Actor, ActorConfig
from actors.driver import Driver
from supervisor.errors import CheckoutTimeout, ConfigError, PoolClosed, PoolError, QueueDropped
from supervisor.limits import SafetyLimits
from supervisor.options import PoolOptions
from supervisor.queue import CoDel, Waiter, WaiterQueue
from supervisor.reporter import Reporter
from supervisor.session import Session

__all__ = ["Lender", "LenderState", "PoolStatistics"]

LenderState = Literal["new", "open", "closing", "closed", "failed"]


@final
@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a pool. ``idle + busy + connecting == size`` always holds.

    ``size``: connection slots currently supervised (between ``min_size`` and ``max_size``).
    ``idle``: ready in the idle set. ``busy``: lent to a client. ``connecting``: not available:
    connecting, backing off after a failure, or being pinged / recovered by its actor.
    ``waiting``: clients queued. Counters since the pool opened: ``checkouts``, ``connects``,
    ``disconnects``, ``restarts`` (actor crashes restarted), ``dropped`` (``QueueDropped``),
    ``timeouts`` (``CheckoutTimeout``), ``revoked`` (leases taken back), ``query_timeouts``,
    ``transaction_restarts`` (transactions whose connection was found lost at BEGIN, before
    anything of them ran, restarted transparently on another connection).
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
    transaction_restarts: int


AfterConnect = Callable[[Actor, drv.Connection], Awaitable[None]]


class SandboxHook(Protocol):
    """What the lender asks of an open sandbox (supervisor.sandbox.Sandbox)."""

    @property
    def closed(self) -> bool: ...

    async def checkout(self, task: trio.lowlevel.Task, timeout: float | None) -> Session | None:
        """A view of the sandbox's connection for ``task``, or None: serve it normally."""
        ...


@final
class Lender:
    """The idle set, the waiters and the holders of one pool; the host of its actors."""

    def __init__(
        self,
        driver: Driver,
        options: PoolOptions,
        reporter: Reporter,
        *,
        after_connect: AfterConnect | None = None,
        reset_session: AfterConnect | None = None,
    ) -> None:
        self.name = options.name
        self.driver = driver
        self.limits: SafetyLimits = options.limits
        self.reporter = reporter
        self.min_size = options.min_size
        self.max_size = options.max_size
        self.state: LenderState = "new"
        self.failure: PoolError | None = None
        self.holders: dict[trio.lowlevel.Task, Session] = {}
        self.leases_out = 0
        self.checkouts = 0
        self.rng = random.Random(options.seed)
        self.grow: Callable[[int], None] | None = None  # set by the pool: start slot `index`
        self._configure = options.configure
        self._after_connect = after_connect
        self._reset_session = reset_session
        self.settings = options.session_settings
        self._queue_interval = options.queue_interval
        self._queue = WaiterQueue(CoDel(options.queue_target, options.queue_interval))
        self._idle: deque[Actor] = deque()
        self._actors: dict[int, Actor] = {}
        self._all_returned: trio.Event | None = None
        self._ready_waiters: list[trio.Event] = []
        self.sandbox: SandboxHook | None = None  # supervisor.sandbox, while one is open
        backoff = options.backoff
        self.config = ActorConfig(
            driver=driver,
            backoff=lambda: backoff.delays(self.rng),
            idle_interval=options.idle_interval,
            max_idle=options.max_idle,
            max_lifetime=options.max_lifetime,
            connect_timeout=options.limits.connect_timeout,
            cleanup_timeout=options.limits.cleanup_timeout,
            rng=self.rng,
        )

    # -- checkout and return (the hot path) -----------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def checkout(
        self,
        timeout: float | None,
        queue: bool,
        task: trio.lowlevel.Task | None = None,
        *,
        schedule: bool = True,
    ) -> Session:
        """Lease a connection to ``task`` (default: the current task).

        Trio's fast path: checkpoint if cancelled, take an idle connection without waiting,
        else park in the queue and be rescheduled with the session as the result.
        ``schedule=False`` skips the scheduling half of the checkpoint on the fast path, for
        callers whose next step is a driver call (itself a checkpoint, by the driver protocol):
        one-shot queries and BEGIN. Cancellation is still checked first.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.state != "open":
            raise self.closed_error()
        if task is None:
            task = trio.lowlevel.current_task()
        if self.sandbox is not None:
            view = await self.sandbox.checkout(task, timeout)
            if view is not None:
                return view
        if self._idle:
            session = self._lend(self._idle.popleft(), task)
            if schedule:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return session
        return await self._wait(task, timeout, queue)

    async def _wait(self, task: trio.lowlevel.Task, timeout: float | None, queue: bool) -> Session:
        if not queue:
            error = QueueDropped(f"no idle connection and queue=False ({self.load()})",
                                 pool=self.name)
            self.reporter.dropped(error)
            raise error
        limit = self.limits.max_waiting
        if limit is not None and len(self._queue) >= limit:
            error = QueueDropped(
                f"the queue is full: max_waiting={limit} ({self.load()})", pool=self.name
            )
            self.reporter.dropped(error)
            raise error
        self._maybe_grow()
        waiter = Waiter(trio.current_time(), task)
        self._queue.push(waiter)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._queue.discard(waiter)
            return trio.lowlevel.Abort.SUCCEEDED

        if timeout is None:
            timeout = self.limits.checkout_timeout
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            session: Session = await trio.lowlevel.wait_task_rescheduled(abort)
            return session
        assert scope.cancelled_caught and timeout is not None
        timed_out = CheckoutTimeout(
            f"no connection became available within {timeout:g}s ({self.load()})",
            pool=self.name,
        )
        self.reporter.timed_out(timed_out, timeout)
        raise timed_out

    @trio.lowlevel.enable_ki_protection
    def _lend(
        self, actor: Actor, task: trio.lowlevel.Task, returning: Session | None = None
    ) -> Session:
        """Lend ``actor``'s connection to ``task``: one step, safe from KeyboardInterrupt."""
        assert actor.conn is not None
        session = Session(
            self.reporter, self.limits, actor, actor.conn, actor.generation, task, self.settings
        )
        actor.lend(session, returning)
        self.holders[task] = session
        self.leases_out += 1
        self.checkouts += 1
        hold = self.limits.hold_timeout
        if hold is not None:
            session.hold_deadline = trio.current_time() + hold
            actor.poke(session.hold_deadline)
        return session

    def held(self, task: trio.lowlevel.Task) -> Session | None:
        """The session ``task`` holds from this pool, if any."""
        return self.holders.get(task)

    @trio.lowlevel.enable_ki_protection
    def checkin(self, session: Session) -> None:
        """A block that owned a lease ended (synchronous: never delays the client)."""
        if not session.active:
            return
        session.active = False
        task = session.task
        if task is not None and self.holders.get(task) is session:
            del self.holders[task]
        if session.sandbox is not None:
            session.sandbox.release(session)  # a view of a sandbox's one connection
            return
        self.leases_out -= 1
        if self.leases_out == 0 and self._all_returned is not None:
            self._all_returned.set()
        if session.revoked is not None:
            return
        actor: Actor = session.actor  # type: ignore[assignment]  # lent by one of our actors
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
        if session.clean():
            self.ready(actor, session)
        else:
            actor.checkin(session)

    # -- Host protocol (called by actors) -------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    def ready(self, actor: Actor, returning: Session | None = None) -> None:
        """Hand ``actor``'s connection to the next waiter, or put it in the idle set.
        ``returning``: the clean lease just given back (the hot path of a return)."""
        now = trio.current_time()
        if self.state == "open" and self._queue.live:
            waiting = len(self._queue)
            waiter, dropped = self._queue.serve(now)
            self._shed(dropped, now, waiting)
            if waiter is not None:
                session = self._lend(actor, waiter.token, returning)
                session.checkout_wait = now - waiter.start
                trio.lowlevel.reschedule(waiter.token, outcome.Value(session))
                return
        else:
            self._queue.codel.on_idle()
        actor.mark_idle(now, returning)
        self._idle.append(actor)
        if self._ready_waiters and len(self._idle) >= self.min_size:
            for event in self._ready_waiters:
                event.set()
            self._ready_waiters.clear()

    def withdraw(self, actor: Actor) -> bool:
        """Take ``actor`` out of the idle set (for a ping, a replacement, shutdown)."""
        if not actor.withdraw():
            return False
        try:
            self._idle.remove(actor)
        except ValueError:
            pass
        return True

    def can_shrink(self, actor: Actor) -> bool:
        """Elastic pools close idle connections above ``min_size`` (actors already on their
        way out do not count, so simultaneous expiries never go below ``min_size``)."""
        staying = sum(1 for a in self._actors.values() if not a.exiting)
        return staying > self.min_size

    async def configure(self, options: Mapping[str, Any], index: int) -> Mapping[str, Any]:
        """Options for the next connect attempt (the ``configure=`` hook, plain or async)."""
        options = dict(options)
        if self._configure is not None:
            result = self._configure(options, index)
            if inspect.isawaitable(result):
                result = await result
            if not isinstance(result, Mapping):
                raise ConfigError(
                    f"configure= must return a mapping of connect options, not "
                    f"{type(result).__name__}",
                    pool=self.name,
                )
            options = dict(result)
        self.reporter.learn_secrets(self.driver.secrets(options))
        return options

    async def after_connect(self, actor: Actor, conn: drv.Connection) -> None:
        """Run the ``after_connect=`` hook on a fresh connection."""
        if self._after_connect is None:
            return
        await self._after_connect(actor, conn)

    async def reset_session(self, actor: Actor, conn: drv.Connection) -> None:
        """Reset the session a lease left dirty (given by the pool: ``reset=``)."""
        if self._reset_session is not None:
            await self._reset_session(actor, conn)

    def report(
        self, event: str, actor: Actor, *, error: BaseException | None = None, message: str = ""
    ) -> None:
        """Count a lifecycle event and pass it to the log hook."""
        self.reporter.event(event, actor.index, error=error, message=message)

    def scrub(self, text: str) -> str:
        """Remove every known secret from ``text``."""
        return self.reporter.scrub(text)

    # -- slots ----------------------------------------------------------------------------------

    def new_slot(self) -> int:
        """Register a new connection slot (a placeholder actor until it runs) and return its
        index, the lowest one free."""
        index = next(i for i in itertools.count() if i not in self._actors)
        self._actors[index] = Actor(index, self, self.config)
        return index

    def new_actor(self, index: int) -> Actor:
        """The actor to run for slot ``index``: the placeholder if fresh, else a new one."""
        actor = self._actors.get(index)
        if actor is None or actor.state != "connecting" or actor.generation != 0:
            actor = Actor(index, self, self.config)
        self._actors[index] = actor
        return actor

    def actor_gone(self, actor: Actor, *, crashed: bool) -> None:
        """``actor``'s task ended; a slot that shrank or was stopped is unregistered (a crashed
        one stays registered until its restart)."""
        self.withdraw(actor)
        if not crashed and self._actors.get(actor.index) is actor:
            del self._actors[actor.index]

    def actors(self) -> list[Actor]:
        """The registered actors, by index."""
        return sorted(self._actors.values(), key=lambda a: a.index)

    def _maybe_grow(self) -> None:
        if self.grow is None or len(self._actors) >= self.max_size:
            return
        starting = sum(1 for a in self._actors.values() if a.state in ("connecting", "backoff"))
        if starting <= len(self._queue):
            self.grow(self.new_slot())

    def resize(self, min_size: int, max_size: int) -> None:
        """New size bounds (validated by the pool): start slots up to ``min_size``; retire the
        slots above ``max_size``, idle ones first, then the highest index."""
        self.min_size, self.max_size = min_size, max_size
        while self.grow is not None and self.state == "open" and len(self._staying()) < min_size:
            self.grow(self.new_slot())
        staying = self._staying()
        excess = len(staying) - max_size
        if excess > 0:
            staying.sort(key=lambda a: (a.state != "idle", -a.index))
            for actor in staying[:excess]:
                actor.retire_slot()

    def _staying(self) -> list[Actor]:
        return [a for a in self._actors.values() if not a.exiting]

    async def wait_ready(self, timeout: float | None) -> None:
        """Return once ``min_size`` connections are idle; ``CheckoutTimeout`` after
        ``timeout`` (default ``limits.checkout_timeout``)."""
        if self.state != "open":
            await trio.lowlevel.checkpoint()
            raise self.closed_error()
        if len(self._idle) >= self.min_size:
            await trio.lowlevel.checkpoint()
            return
        if timeout is None:
            timeout = self.limits.checkout_timeout
        event = trio.Event()
        self._ready_waiters.append(event)
        with trio.move_on_after(math.inf if timeout is None else timeout):
            await event.wait()
            return
        if event in self._ready_waiters:
            self._ready_waiters.remove(event)
        assert timeout is not None
        raise CheckoutTimeout(
            f"wait(): {len(self._idle)} of min_size={self.min_size} connections ready after "
            f"{timeout:g}s ({self.load()})",
            pool=self.name,
        )

    async def check(self, bound: float) -> int:
        """Have every idle connection's actor ping it now; return how many were dead (their
        actors replace them). Bounded by ``bound`` seconds."""
        idle = list(self._idle)
        send, receive = trio.open_memory_channel[bool](math.inf)
        for actor in idle:
            actor.check(send)
        dead = 0
        with trio.move_on_after(bound):
            for _ in idle:
                dead += await receive.receive()
        if not idle:
            await trio.lowlevel.checkpoint()
        return dead

    # -- queue ------------------------------------------------------------------------------------

    def load(self) -> str:
        """The pool's load, for error messages."""
        s = self.statistics()
        text = (
            f"size {s.size}/{s.max_size}, {s.busy} busy, {s.idle} idle, "
            f"{s.connecting} connecting, {s.waiting} waiting"
        )
        last = self.reporter.last_connect_error
        if last is not None and s.idle == 0 and s.busy < s.size:
            # The database is the problem, not the load: say so.
            text += f"; last connect attempt failed: {last}"
        return text

    def _shed(self, dropped: list[Waiter], now: float, waiting: int) -> None:
        """Fail the waiters CoDel shed. ``waiting`` is the queue length before the sweep, so
        the message tells the numbers that triggered it."""
        if not dropped:
            return
        codel = self._queue.codel
        s = self.statistics()
        load = (
            f"{len(dropped)} of {waiting} waiting shed; size {s.size}/{s.max_size}, "
            f"{s.busy} busy, {s.idle} idle, {s.connecting} connecting"
        )
        for waiter in dropped:
            waited = now - waiter.start
            failed = self.reporter.connect_failed_since(waiter.start)
            if failed is not None:
                why = f"no connection could be made while it waited ({failed})"
            else:
                why = (
                    "the pool is overloaded: requests waited longer than "
                    f"queue_target={codel.target:g}s for a whole queue_interval="
                    f"{codel.interval:g}s, so those waiting over 2 x queue_target were shed "
                    "(for slow queries raise queue_target, or the pool size)"
                )
            error = QueueDropped(
                f"dropped from the queue after waiting {waited:.3f}s: {why} ({load})",
                pool=self.name,
            )
            self.reporter.dropped(error, waited)
            trio.lowlevel.reschedule(waiter.token, outcome.Error(error))

    async def poll_queue(self) -> None:
        """CoDel's periodic poll: shed waiters even when nothing is checked in (database down).
        Runs until cancelled."""
        while True:
            await trio.sleep(self._queue_interval)
            now = trio.current_time()
            waiting = len(self._queue)
            self._shed(self._queue.poll(now), now, waiting)

    # -- lifecycle --------------------------------------------------------------------------------

    def open(self) -> None:
        """Start lending."""
        self.state = "open"

    def fail(self, error: PoolError) -> None:
        """The pool failed as a whole: refuse new work, fail every waiter."""
        self.failure = error
        self.state = "failed"
        for waiter in self._queue.drain():
            # A distinct instance per waiter: the supervisor raises ``error`` itself, and one
            # exception object must not travel up two tasks (it would be counted twice).
            trio.lowlevel.reschedule(waiter.token, outcome.Error(self.closed_error()))

    def closed_error(self) -> PoolError:
        """What a request gets when the pool is not open."""
        if self.failure is not None:
            return PoolClosed(str(self.failure), pool=self.name)
        return PoolClosed("the pool is closed", pool=self.name)

    async def close(self, grace: float) -> None:
        """Stop lending: fail every waiter, then wait up to ``grace`` seconds (shielded) for the
        leases out to come back."""
        if self.state == "open":
            self.state = "closing"
        closed = PoolClosed("the pool is closing", pool=self.name)
        for waiter in self._queue.drain():
            trio.lowlevel.reschedule(waiter.token, outcome.Error(closed))
        with trio.CancelScope(shield=True):
            if self.leases_out:
                self._all_returned = trio.Event()
                with trio.move_on_after(grace):
                    await self._all_returned.wait()
            if self.state == "closing":
                self.state = "closed"

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of sizes and counters."""
        idle = busy = 0
        for actor in self._actors.values():
            if actor.state == "idle":
                idle += 1
            elif actor.state == "busy":
                busy += 1
        size = len(self._actors)
        r = self.reporter
        return PoolStatistics(
            name=self.name,
            size=size,
            min_size=self.min_size,
            max_size=self.max_size,
            idle=idle,
            busy=busy,
            connecting=size - idle - busy,
            waiting=len(self._queue),
            checkouts=self.checkouts,
            connects=r.connects,
            disconnects=r.disconnects,
            restarts=r.restarts,
            dropped=r.dropped_count,
            timeouts=r.timeouts,
            revoked=r.revoked,
            query_timeouts=r.query_timeouts,
            transaction_restarts=r.transaction_restarts,
        )
