"""Messages on an actor's inbox. Only :mod:`actors.actor` builds them: other tasks call the
actor's methods (``checkin``, ``kill``, ``replace_at``), which post these.

The hot path (a clean lease coming back) sends no message: the lender puts the actor straight back
in the idle set. Messages are for the work that needs the actor's own task: recovering a dirty
connection, killing one, replacing one later.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.lease import Lease

__all__ = ["Checkin", "Disconnect", "Kill", "Message"]


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


Message = Checkin | Kill | Disconnect
