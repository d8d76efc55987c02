"""Safety limits: every wait and every hold has a bound unless you say otherwise.

Racket web-server's connection manager idea: limits travel together as one value, with an
explicit :meth:`SafetyLimits.unlimited` for the rare program that really wants no bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from supervisor.errors import ConfigError

__all__ = ["SafetyLimits"]


def _check(name: str, value: float | None, *, allow_none: bool, allow_zero: bool = False) -> None:
    if value is None:
        if not allow_none:
            raise ConfigError(f"{name} must be a number of seconds, not None")
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{name} must be a number, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, not {value!r}")


@dataclass(frozen=True, slots=True)
class SafetyLimits:
    """Bounds on waiting and holding, in seconds (``None`` means no bound).

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
        _check("checkout_timeout", self.checkout_timeout, allow_none=True)
        _check("hold_timeout", self.hold_timeout, allow_none=True)
        _check("query_timeout", self.query_timeout, allow_none=True)
        _check("connect_timeout", self.connect_timeout, allow_none=True)
        _check("shutdown_grace", self.shutdown_grace, allow_none=False, allow_zero=True)
        _check("cleanup_timeout", self.cleanup_timeout, allow_none=False)
        if self.max_waiting is not None and (
            isinstance(self.max_waiting, bool)
            or not isinstance(self.max_waiting, int)
            or self.max_waiting < 0
        ):
            raise ConfigError(
                f"max_waiting must be an integer >= 0 or None, not {self.max_waiting!r}"
            )

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
