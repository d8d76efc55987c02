"""The lease: one client's hold on one actor's connection (DBConnection's holder).

A lease is made when a connection is lent and ends when it is given back. The client does its
I/O on ``lease.conn`` in its own task; the lease records what the actor needs to know when the
connection comes back, and lets the actor take the connection away (:meth:`Lease.revoke`).

Rules:

* The lease never sends anything itself: it talks to whoever lent the connection through the
  small :class:`LeaseOwner` protocol (the actor implements it), so this module imports nothing
  but the driver protocol and Trio.
* The flags only ever go from "clean" to "dirty" during a lease: ``interrupted`` (a call was
  cancelled or timed out midway: protocol state unknown), ``broken`` (the driver said the
  connection is dead), ``crashed`` (the driver raised an exception it has no business raising,
  a bug: the connection is dead and its actor crashes, for the supervisor to restart and count
  against the restart intensity), ``killed`` (``Connection.kill()``), ``revoked`` (the actor
  took the connection back: hold deadline, kill, shutdown; the reason is the message later
  calls raise), ``left_state`` (the holder may have changed session state: the actor resets the
  session before anyone else gets the connection).
* ``op_task`` / ``op_scope`` are set by the holder around each driver call and cleared by
  :meth:`Lease.op_finished`; the actor reads them to know whether a call is in flight.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import trio

from actors.driver import Connection

__all__ = ["Crash", "Lease", "LeaseOwner"]


@dataclass(frozen=True, slots=True)
class Crash:
    """A driver's unexpected exception during a holder's call, as the actor reports it:
    ``text`` (type and message, scrubbed of secrets) and ``cause`` (the exception itself, or
    None when its chain held a secret: it is then not chained to anything)."""

    text: str
    cause: BaseException | None


class LeaseOwner(Protocol):
    """What a lease (and its holder) may ask of the actor that lent it. All synchronous."""

    @property
    def index(self) -> int:
        """The connection slot, for messages."""
        ...

    @property
    def retiring(self) -> bool:
        """The connection is due for replacement: do not put it back in the idle set."""
        ...

    @property
    def statements(self) -> OrderedDict[str, None]:
        """The statement texts prepared on the current connection, least recently used first
        (emptied on every new connection and by a session reset)."""
        ...

    def kill(self, why: str, generation: int) -> None:
        """Close the connection of ``generation`` now and connect a new one."""
        ...

    def poke(self, deadline: float) -> None:
        """Wake the owner by ``deadline`` (a hold deadline was set or moved)."""
        ...


class Lease:
    """One client's hold on one connection, from checkout to return. See the module docstring."""

    __slots__ = (
        "_op_done",
        "active",
        "actor",
        "broken",
        "conn",
        "crashed",
        "generation",
        "hold_deadline",
        "interrupted",
        "killed",
        "left_state",
        "op_scope",
        "op_task",
        "revoked",
    )

    def __init__(self, actor: LeaseOwner, conn: Connection, generation: int) -> None:
        self.actor = actor
        self.conn = conn
        self.generation = generation
        self.active = True
        self.revoked: str | None = None
        self.killed = False
        self.interrupted = False
        self.broken = False
        self.crashed: Crash | None = None  # the driver's unexpected exception (implies broken)
        self.left_state = False  # may have changed session state: reset before the next lease
        self.op_task: trio.lowlevel.Task | None = None
        self.op_scope: trio.CancelScope | None = None
        self._op_done: trio.Event | None = None
        self.hold_deadline = math.inf

    def revoke(self, reason: str) -> None:
        """Take the connection away from the holder: its in-flight call (if any) is cancelled
        and every later call raises ``ConnectionLost`` with ``reason``."""
        if self.revoked is None:
            self.revoked = reason
        if self.op_scope is not None:
            self.op_scope.cancel()

    def kill(self, reason: str, why: str) -> None:
        """Revoke the lease for good (later calls, and a call in flight, get ``ConnectionLost``
        with ``reason``) and have the owner replace the connection (``why``: for its log)."""
        self.killed = True
        self.revoke(reason)
        self.actor.kill(why, self.generation)

    def set_hold_deadline(self, deadline: float) -> None:
        """Move the hold deadline and make sure the owner wakes for it."""
        self.hold_deadline = deadline
        self.actor.poke(deadline)

    def op_finished(self) -> None:
        """Called by the holder's task when a call on the connection returns."""
        self.op_task = None
        self.op_scope = None
        if self._op_done is not None:
            self._op_done.set()
            self._op_done = None

    async def wait_op_finished(self, timeout: float) -> None:
        """Wait (bounded) until no call of the holder is in flight on the connection. Not a
        checkpoint when nothing is in flight (the actor calls it on its shutdown path)."""
        if self.op_task is None:
            return
        self._op_done = done = trio.Event()
        with trio.move_on_after(timeout):
            await done.wait()
