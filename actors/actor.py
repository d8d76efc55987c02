"""The actor: one Trio task that owns one live connection for its whole life.

The actor connects (with backoff), keeps the connection healthy while it is idle (ping after
``idle_interval``, replace after ``max_lifetime``), and takes it back from clients. It does not
run client queries: a client holds a :class:`Lease` and does its I/O directly on the connection in
its own task (DBConnection's holder idea), so a query costs no message hop. The actor steps in only
for what must not run in a client's task:

* recovering a connection returned dirty (cancelled mid-call, transaction left open, cursor left
  open): cancel on the server, drain, roll back, or replace it; the cancelled client is already
  gone and is never delayed by this;
* revoking a lease held past its deadline, or killed: the in-flight call is cancelled (the holder
  sees ``ConnectionLost``), the connection closed and replaced;
* replacing a connection that failed a ping, outlived ``max_lifetime`` or was asked to go by
  ``disconnect_all``.

Everything the actor needs from the pool goes through the :class:`Host` protocol, so this module
knows nothing of pools (the direction of imports is ``supervisor`` -> ``actors``). Everything
other tasks need from the actor is a synchronous method of :class:`Actor` (never a message built
by the caller):

* ``lend`` / ``mark_idle`` / ``withdraw``: the lender moves the actor between the idle set and
  clients. These are the only writes of ``state`` from outside the actor's task,
  and each checks the state it leaves (HikariCP's rule: a transition from an unexpected state
  is a bug and raises, instead of silently lending one connection twice);
* ``checkin`` (a dirty lease came back), ``kill`` and ``replace_at``: post to the inbox;
* ``poke``: wake the actor earlier (a hold deadline moved).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, Protocol, final

import trio

from actors.driver import Connection, Driver, Misconfigured
from actors.lease import Lease
from actors.messages import Check, Checkin, Disconnect, Exit, Kill, Message

__all__ = [
    "Actor",
    "ActorConfig",
    "ActorGaveUp",
    "ActorMisconfigured",
    "ActorState",
    "Host",
    "restore_idle",
]

ActorState = Literal["connecting", "backoff", "idle", "busy", "maintenance", "stopped"]
"""``idle``: in the pool's idle set. ``busy``: lent to a client. ``maintenance``: being pinged
or recovered, or just given back. ``connecting`` / ``backoff``: no connection yet."""

_LENDABLE: tuple[ActorState, ...] = ("idle", "connecting", "maintenance")
_READYING: tuple[ActorState, ...] = ("connecting", "maintenance")


class ActorGaveUp(Exception):
    """The backoff policy said stop after a failed connect: the actor exits and its supervisor
    decides (restart with backoff, or fail the pool when the restart intensity is exceeded)."""


class ActorCrashed(Exception):
    """The driver raised an unexpected exception during a holder's call (a bug, not a lost
    connection or a database error): the actor closes the connection and ends with this, so
    its supervisor restarts it with backoff and counts the crash against the restart intensity.
    The driver's exception is the ``__cause__``."""


class ActorMisconfigured(Exception):
    """The driver said the connect options can never work (:class:`~actors.driver.Misconfigured`):
    the actor exits at once, without backoff, and its supervisor fails the pool (no restart)."""


class Host(Protocol):
    """What an actor needs from whoever runs it (the pool)."""

    name: str

    def ready(self, actor: Actor) -> None:
        """The actor's connection is ready for a client: serve a waiter or mark it idle."""
        ...

    def withdraw(self, actor: Actor) -> bool:
        """Take the actor out of the idle set for its own maintenance; False if it was not idle
        (a client got it first)."""
        ...

    def can_shrink(self, actor: Actor) -> bool:
        """Whether this actor may exit because it idled past ``max_idle``."""
        ...

    async def configure(self, options: Mapping[str, Any], index: int) -> Mapping[str, Any]:
        """Connect options for the next attempt (credential rotation; the user's hook may be
        plain or async)."""
        ...

    async def after_connect(self, actor: Actor, conn: Connection) -> None:
        """Run the user's hook on a fresh connection before its first use."""
        ...

    async def reset_session(self, actor: Actor, conn: Connection) -> None:
        """Drop the session state a lease left (``reset=``), so the next lease finds the
        connection as it was after connect and ``after_connect``."""
        ...

    def report(
        self, event: str, actor: Actor, *, error: BaseException | None = None, message: str = ""
    ) -> None:
        """Count and log a lifecycle event."""
        ...

    def scrub(self, text: str) -> str:
        """``text`` with every known secret removed."""
        ...


@dataclass(frozen=True, slots=True)
class ActorConfig:
    """Per-pool settings every actor shares."""

    driver: Driver
    backoff: Callable[[], Iterator[float]]
    idle_interval: float = 1.0
    max_idle: float | None = None
    max_lifetime: float | None = None
    lifetime_jitter: float = 0.05
    connect_timeout: float | None = 10.0
    cleanup_timeout: float = 5.0
    rng: random.Random = field(default_factory=random.Random)


@final
class Actor:
    """The task that owns one connection slot (``index``) of a pool. See the module docstring.

    ``run()`` returns normally only when the pool shrank this slot (idle past ``max_idle``);
    it raises :class:`ActorGaveUp` when the backoff policy stops and :class:`ActorMisconfigured`
    at once when the driver says the connect options can never work; it is cancelled at
    shutdown.
    """

    def __init__(self, index: int, host: Host, config: ActorConfig) -> None:
        self.index = index
        self.host = host
        self.config = config
        self.state: ActorState = "connecting"
        self.conn: Connection | None = None
        self.lease: Lease | None = None
        self.generation = 0
        self.idle_since = 0.0
        self.connected_at = 0.0
        self.expires_at = math.inf
        self._replace_at = math.inf
        self.retiring = False  # due for replacement: must not go back to the idle set
        self.statements: OrderedDict[str, None] = OrderedDict()  # prepared on this connection
        self.exiting = False
        self.checked_at = 0.0
        self._sleep: trio.CancelScope | None = None
        self._why = ""
        self._why_error: BaseException | None = None
        self._send, self._inbox = trio.open_memory_channel[Message](math.inf)

    def __repr__(self) -> str:
        return f"<Actor {self.host.name}#{self.index} {self.state} gen={self.generation}>"


    # -- called from other tasks (all synchronous, never block) --------------------------------

    def _bad_transition(
        self, allowed: tuple[ActorState, ...], to: ActorState, returning: Lease | None = None
    ) -> NoReturn:
        held = "" if returning is None else " holding the lease given back"
        raise RuntimeError(
            f"{self!r}: cannot become {to!r} from {self.state!r} (expected one of "
            f"{', '.join(allowed)}{held}); this is a bug in the pool"
        )

    # The transitions on the hot path test the state inline (no helper call): they run twice
    # per checkout.

    def lend(self, lease: Lease, returning: Lease | None = None) -> None:
        """``lease`` now holds the connection: a checkout, or a hand-over to a waiter (from
        the idle set, from the actor, or straight from ``returning``, a clean lease just given
        back)."""
        if returning is None:
            if self.state not in _LENDABLE:
                self._bad_transition(_LENDABLE, "busy")
        elif self.state != "busy" or self.lease is not returning:
            self._bad_transition(("busy",), "busy", returning)
        self.state = "busy"
        self.lease = lease

    def mark_idle(self, now: float, returning: Lease | None = None) -> None:
        """The connection is in the idle set from ``now`` on (``returning``: the clean lease
        that was just given back, which must be the one holding it)."""
        if returning is None:
            if self.state not in _READYING:
                self._bad_transition(_READYING, "idle")
        elif self.state != "busy" or self.lease is not returning:
            self._bad_transition(("busy",), "idle", returning)
        self.state = "idle"
        self.lease = None
        self.idle_since = now

    def withdraw(self) -> bool:
        """Leave the idle set for maintenance; False if the actor was not idle."""
        if self.state != "idle":
            return False
        self.state = "maintenance"
        return True

    def checkin(self, lease: Lease) -> None:
        """``lease`` came back dirty: recover (or replace) the connection in the actor's task."""
        if self.state != "busy":
            self._bad_transition(("busy",), "maintenance")
        self.state = "maintenance"
        if self.lease is lease:
            self.lease = None
        self._send.send_nowait(Checkin(lease))

    def kill(self, why: str, generation: int) -> None:
        """Close the connection of ``generation`` now (revoking its lease) and reconnect."""
        self._send.send_nowait(Kill(why, generation))

    def replace_at(self, at: float) -> None:
        """Replace the connection at time ``at``: then if idle, else when its holder returns it."""
        self._send.send_nowait(Disconnect(at))

    def check(self, reply: trio.MemorySendChannel[bool]) -> None:
        """Ping now if idle; ``reply`` gets True if the connection was dead (``Pool.check``)."""
        self._send.send_nowait(Check(reply))

    def retire_slot(self) -> None:
        """End this slot (the pool shrank): at once if idle, else when its lease comes back."""
        self.exiting = True
        self.retiring = True
        self._send.send_nowait(Exit())

    def poke(self, deadline: float) -> None:
        """Make the actor wake by ``deadline`` (a hold deadline was set or moved earlier)."""
        if self._sleep is not None and deadline < self._sleep.deadline:
            self._sleep.deadline = deadline

    # -- the task -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, reconnect, until shrunk, cancelled, or out of backoff."""
        try:
            while True:
                await self._connect()
                if not await self._serve():
                    return
        finally:
            with trio.CancelScope(shield=True):
                lease, self.lease = self.lease, None
                if lease is not None:
                    lease.revoke(f"pool {self.host.name!r} closed the connection (actor stopped)")
                    if lease.op_task is not None and lease.op_scope is None:
                        await self._close()
                    await lease.wait_op_finished(self.config.cleanup_timeout)
                self.host.withdraw(self)
                await self._close()
                self.state = "stopped"

    async def _connect(self) -> None:
        config = self.config
        delays = config.backoff()
        while True:
            self.state = "connecting"
            options = await self.host.configure(config.driver.options, self.index)
            conn: Connection | None = None
            try:
                with trio.fail_after(config.connect_timeout or math.inf):
                    conn = await config.driver.connect(options)
                    await self.host.after_connect(self, conn)
            except BaseException as exc:
                if conn is not None:  # made but not ready (hook failed, timeout, shutdown)
                    with trio.CancelScope(shield=True):
                        await _close_quietly(conn, config.cleanup_timeout)
                if not isinstance(exc, Exception):
                    raise
                self.host.report("connect_failed", self, error=exc)
                if isinstance(exc, Misconfigured):
                    text = str(exc) or type(exc).__name__
                    safe = self.host.scrub(text)
                    raise ActorMisconfigured(
                        f"pool {self.host.name!r}: the connect options are invalid "
                        f"(retrying cannot help): {safe}"
                    ) from (exc if safe == text else None)
                delay = next(delays, None)
                if delay is None:
                    text = f"{type(exc).__name__}: {exc}"
                    safe = self.host.scrub(text)
                    raise ActorGaveUp(
                        f"pool {self.host.name!r}: connection #{self.index} gave up after a "
                        f"failed connect (backoff kind 'stop'): {safe}"
                    ) from (exc if safe == text else None)
                self.state = "backoff"
                await trio.sleep(delay)
                continue
            now = trio.current_time()
            self.conn = conn
            self.generation += 1
            self.connected_at = now
            self.retiring = False
            self.statements = OrderedDict()
            self._replace_at = math.inf
            if config.max_lifetime is None:
                self.expires_at = math.inf
            else:
                jitter = 1.0 - config.lifetime_jitter * config.rng.random()
                self.expires_at = now + config.max_lifetime * jitter
            self.host.report("connect", self)
            return

    async def _serve(self) -> bool:
        """Serve the current connection; return True to reconnect, False to exit (shrink)."""
        self.host.ready(self)
        while True:
            with trio.move_on_at(self._next_deadline()) as scope:
                self._sleep = scope
                message = await self._inbox.receive()
            self._sleep = None
            if scope.cancelled_caught:
                verdict = await self._on_timer()
            else:
                verdict = await self._on_message(message)
            if verdict == "reconnect":
                await self._close()
                return True
            if verdict == "exit":
                await self._close()
                return False

    def _next_deadline(self) -> float:
        now = trio.current_time()
        config = self.config
        if self.state == "idle":
            ping_at = max(self.idle_since, self.checked_at) + config.idle_interval
            deadline = min(ping_at, self.expires_at, self._replace_at)
            if config.max_idle is not None and self.host.can_shrink(self):
                deadline = min(deadline, self.idle_since + config.max_idle)
            return deadline
        # Busy or being recovered by the pool: wake for the hold deadline, for a due replacement,
        # and periodically, because a clean return to the idle set sends no message (hot path):
        # often enough that neither the idle ping nor max_idle is noticed late.
        period = config.idle_interval
        if config.max_idle is not None:
            period = min(period, config.max_idle)
        deadline = now + period
        if self.lease is not None:
            deadline = min(deadline, self.lease.hold_deadline)
        if not self.retiring:
            deadline = min(deadline, self.expires_at, self._replace_at)
        return deadline

    async def _on_timer(self) -> str:
        now = trio.current_time()
        config = self.config
        if self.state == "idle":
            due = self._due(now)
            shrink = (
                config.max_idle is not None
                and now >= self.idle_since + config.max_idle
                and self.host.can_shrink(self)
            )
            if (due or shrink) and self.host.withdraw(self):
                self.state = "maintenance"
                if due:
                    self._why = "replaced (max_lifetime or disconnect_all)"
                    return "reconnect"
                self.exiting = True
                self._why = "idle longer than max_idle above min_size"
                return "exit"
            ping_at = max(self.idle_since, self.checked_at) + config.idle_interval
            if now >= ping_at and self.host.withdraw(self):
                return await self._ping()
            return "stay"
        lease = self.lease
        if lease is not None and now >= lease.hold_deadline:
            return await self._revoke(lease, "held longer than its hold deadline (hold_timeout)")
        if self._due(now):
            self.retiring = True
        return "stay"

    def _due(self, now: float | None = None) -> bool:
        """The connection outlived ``max_lifetime`` or ``disconnect_all`` asked for it."""
        if now is None:
            now = trio.current_time()
        return now >= self.expires_at or now >= self._replace_at

    async def _ping(self) -> str:
        self.state = "maintenance"
        conn = self.conn
        assert conn is not None
        bound = self.config.connect_timeout or self.config.cleanup_timeout
        try:
            with trio.fail_after(bound):
                await conn.ping()
        except Exception as exc:
            self.host.report("ping_failed", self, error=exc)
            self._why, self._why_error = "ping failed", exc
            return "reconnect"
        # A ping is not a use: keep the idle clock running (max_idle), note when we checked.
        idle_since = self.idle_since
        self.checked_at = trio.current_time()
        self.host.ready(self)
        state: str = self.state  # ready() may have handed it straight to a waiter
        if state == "idle":
            self.idle_since = idle_since
        return "stay"

    async def _revoke(self, lease: Lease, reason: str) -> str:
        lease.revoke(f"pool {self.host.name!r}: connection #{self.index} was {reason}")
        self._why = f"lease revoked: {reason}"
        self.lease = None
        self.state = "maintenance"
        self.host.report("revoked", self, message=reason)
        if lease.op_task is not None and lease.op_scope is None:
            # The call in flight has no cancel scope of its own (no deadline was set): the
            # driver's kill-safe close() is what makes it fail promptly.
            await self._close()
        await lease.wait_op_finished(self.config.cleanup_timeout)
        return "reconnect"

    async def _on_message(self, message: Message) -> str:
        if isinstance(message, Checkin):
            lease = message.lease
            if lease.actor is not self or lease.generation != self.generation:
                return "stay"
            return await self._recover(lease)
        if isinstance(message, Kill):
            if message.generation != self.generation:
                return "stay"
            if self.lease is not None:
                return await self._revoke(self.lease, f"killed: {message.reason}")
            if self.state == "idle" and not self.host.withdraw(self):
                return "stay"
            return "reconnect"
        if isinstance(message, Disconnect):
            self._replace_at = min(self._replace_at, message.at)
            return "stay"
        if isinstance(message, Check):
            if not self.host.withdraw(self):
                message.reply.send_nowait(False)
                return "stay"
            verdict = await self._ping()
            message.reply.send_nowait(verdict == "reconnect")
            return verdict
        if isinstance(message, Exit):
            if self.state == "idle" and self.host.withdraw(self):
                self._why = "the pool shrank (resize)"
                return "exit"
            return "stay"  # busy: it exits when its lease comes back (see _recover)
        raise TypeError(f"unknown message {message!r}")  # pragma: no cover

    async def _recover(self, lease: Lease) -> str:
        """Bring a dirty connection back, in this task, so its last holder is not delayed."""
        self.state = "maintenance"
        if self.lease is lease:
            self.lease = None
        if self.exiting:
            self._why = "the pool shrank (resize)"
            return "exit"
        if lease.crashed is not None:
            crash = lease.crashed
            self._why, self._why_error = "the driver raised an unexpected exception", crash.cause
            raise ActorCrashed(
                f"pool {self.host.name!r}: connection #{self.index}: the driver raised an "
                f"unexpected exception during a call ({crash.text})"
            ) from crash.cause
        if lease.broken or lease.revoked is not None or self.retiring or self._due():
            self._why = "lost" if lease.broken else "replaced (max_lifetime or disconnect_all)"
            return "reconnect"
        conn = self.conn
        assert conn is not None
        try:
            clean = await restore_idle(
                conn, interrupted=lease.interrupted, timeout=self.config.cleanup_timeout
            )
        except Exception as exc:
            self._why, self._why_error = "recovery failed", exc
            return "reconnect"
        if not clean:
            self._why = "recovery timed out or left the connection dirty"
            return "reconnect"
        if lease.left_state:
            try:
                with trio.fail_after(self.config.cleanup_timeout):
                    await self.host.reset_session(self, conn)
            except Exception as exc:
                self._why, self._why_error = "session reset failed", exc
                return "reconnect"
            self.statements = OrderedDict()
        self.host.report("recovered", self)
        self.host.ready(self)
        return "stay"

    async def _close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        self.state = "maintenance" if self.state != "stopped" else "stopped"
        why, error = self._why, self._why_error
        self._why, self._why_error = "", None
        with trio.CancelScope(shield=True):
            await _close_quietly(conn, self.config.cleanup_timeout)
        self.host.report("disconnect", self, error=error, message=why)


async def restore_idle(conn: Connection, *, interrupted: bool, timeout: float) -> bool:
    """Bring a connection back to a clean idle state: cancel the statement in flight (if a call
    was interrupted), then reset, within ``timeout``. True if it is idle now; False if that
    timed out or left it dirty. Driver exceptions propagate.

    Shared by the actor (recovering a dirty lease) and a client that caught a cancellation and
    goes on using its handle.
    """
    with trio.move_on_after(timeout) as scope:
        if interrupted:
            await conn.cancel()
        await conn.reset()
    return not scope.cancelled_caught and conn.status() == "idle"


async def _close_quietly(conn: Connection, timeout: float) -> None:
    with trio.move_on_after(timeout):
        try:
            await conn.close()
        except Exception:  # a driver's close must not raise; if it does, the socket is gone anyway
            pass
