"""Safety limits: the bounds on waiting, holding and cleaning up, as one value.

Racket web-server's connection manager idea: limits travel together as one value, with an
explicit :meth:`SafetyLimits.unlimited` for the rare program that really wants no bound. By
default the waits the pool itself does are bounded (a checkout, a connect, a cleanup, the
shutdown), while what is up to the application is not: how long a client holds a connection
(``hold_timeout``), how long one statement runs (``query_timeout``) and how many clients queue
(``max_waiting``) are unbounded until you set them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

from supervisor.validate import check_number

__all__ = ["SafetyLimits"]


@final
@dataclass(frozen=True, slots=True)
class SafetyLimits:
    """Bounds on waiting and holding, in seconds (``None`` means no bound).

    Bounded by default: ``checkout_timeout`` (30 s), ``connect_timeout`` (10 s),
    ``shutdown_grace`` (5 s), ``cleanup_timeout`` (5 s). Unbounded by default:
    ``hold_timeout``, ``query_timeout``, ``max_waiting``.

    ``checkout_timeout``: longest wait for a connection (``CheckoutTimeout``).
    ``hold_timeout``: longest a client may hold a lease; past it the lease is revoked, the
    connection closed under the client (who gets ``ConnectionLost``) and replaced.
    ``query_timeout``: longest one statement may run (``QueryTimeout``; cancelled server-side).
    ``max_waiting``: most clients queued at once; more get ``QueueDropped`` at once.
    ``connect_timeout``: longest one connect attempt (including ``after_connect``).
    ``shutdown_grace``: how long closing the pool waits for held handles to finish.
    ``cleanup_timeout``: bound on every shielded cleanup (rollback, cancel and drain, close).
    """

    checkout_timeout: float | None = 30.0
    hold_timeout: float | None = None
    query_timeout: float | None = None
    max_waiting: int | None = None
    connect_timeout: float | None = 10.0
    shutdown_grace: float = 5.0
    cleanup_timeout: float = 5.0

    def __post_init__(self) -> None:
        seconds = " of seconds"
        for name in ("checkout_timeout", "hold_timeout", "query_timeout", "connect_timeout"):
            check_number(f"limit {name}", getattr(self, name), optional=True, unit=seconds)
        check_number("limit shutdown_grace", self.shutdown_grace, zero=True, unit=seconds)
        check_number("limit cleanup_timeout", self.cleanup_timeout, unit=seconds)
        check_number("limit max_waiting", self.max_waiting, optional=True, zero=True,
                     integer=True)

    @classmethod
    def unlimited(cls) -> SafetyLimits:
        """No bound on waiting, holding or queries (cleanup and shutdown stay bounded, so
        closing a pool can never hang)."""
        return cls(
            checkout_timeout=None,
            hold_timeout=None,
            query_timeout=None,
            max_waiting=None,
            connect_timeout=None,
        )
