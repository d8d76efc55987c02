"""Messages on an actor's inbox. Only :mod:`actors.actor` builds them: other tasks call the
actor's methods (``checkin``, ``kill``, ``replace_at``), which post these.

The hot path (a clean lease coming back) sends no message: the lender puts the actor straight back
in the idle set. Messages are for the work that needs the actor's own task: recovering a dirty
connection, killing one, replacing one later.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from actors.lease import Lease

__all__ = ["Check", "Checkin", "Disconnect", "Exit", "Kill", "Message"]


@dataclass(frozen=True, slots=True)
class Checkin:
    """A lease came back dirty (interrupted call, open transaction or cursor, broken, killed,
    or the connection is due for replacement). The actor recovers or replaces the connection."""

    lease: Lease


@dataclass(frozen=True, slots=True)
class Kill:
    """Close the current connection now and connect a new one (``Connection.kill()``)."""

    reason: str
    generation: int


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Replace the current connection at time ``at`` (``Pool.disconnect_all``): at once if it is
    idle then, else as soon as its holder gives it back. No client fails because of it."""

    at: float


@dataclass(frozen=True, slots=True)
class Check:
    """Ping the connection now if it is idle (``Pool.check``); reply True if it was found dead
    (the actor then replaces it), False otherwise."""

    reply: trio.MemorySendChannel[bool]


@dataclass(frozen=True, slots=True)
class Exit:
    """The pool shrank (``Pool.resize``): close the connection and end this slot, at once if
    idle, else when its holder gives it back."""


Message = Checkin | Kill | Disconnect | Check | Exit
