"""Reconnect and restart delays (DBConnection's backoff kinds).

A :class:`Backoff` is a frozen policy; :meth:`Backoff.delays` makes a fresh iterator of delays for
one run of failures. A fresh iterator is started after every good connect, so a connection that
worked and then dropped reconnects at once and only repeated failures back off.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, final

from supervisor.errors import ConfigError
from supervisor.validate import check_number

__all__ = ["Backoff", "BackoffKind"]

BackoffKind = Literal["stop", "exp", "rand", "rand_exp"]
_KINDS = ("stop", "exp", "rand", "rand_exp")


@final
@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait between attempts after a failure.

    * ``stop``: give up at once; the actor exits and the supervisor's restart intensity decides
      whether the pool survives.
    * ``exp``: ``min``, ``2*min``, ``4*min``, ... capped at ``max``.
    * ``rand``: uniform between ``min`` and ``max``.
    * ``rand_exp`` (default): decorrelated jitter. Each delay is uniform between
      ``min(prev, max(min, max/3))`` and ``min(3*prev, max)``, starting from ``min``, so a fleet
      of clients that lost the same server does not reconnect in lockstep.
    """

    kind: BackoffKind = "rand_exp"
    min: float = 1.0
    max: float = 30.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"backoff kind must be one of {', '.join(_KINDS)}, not {self.kind!r}")
        for field in ("min", "max"):
            check_number(f"backoff {field}", getattr(self, field), zero=True, finite=True)
        if self.min > self.max:
            raise ConfigError(f"backoff min ({self.min}) must not exceed max ({self.max})")
        if self.max == 0 and self.kind != "stop":
            raise ConfigError(
                f"Backoff(kind={self.kind!r}, min={self.min}, max={self.max}) would retry a "
                "failed connect at once, forever (100% CPU): backoff max must be > 0 "
                "(use kind 'stop' to give up instead)"
            )

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """A fresh, endless (except for ``stop``) iterator of delays in seconds."""
        rng = rng or random.Random()
        if self.kind == "stop":
            return iter(())
        if self.kind == "exp":
            return self._exp()
        if self.kind == "rand":
            return (rng.uniform(self.min, self.max) for _ in iter(int, 1))
        return self._rand_exp(rng)

    def _exp(self) -> Iterator[float]:
        delay = self.min
        while True:
            yield min(delay, self.max)
            delay = min(max(delay * 2, 1e-3), self.max)

    def _rand_exp(self, rng: random.Random) -> Iterator[float]:
        lower = max(self.min, self.max / 3)
        prev = self.min
        yield prev
        while True:
            # From min=0, 3*prev would stay 0 forever (a reconnect loop with no pause): grow
            # from a floor of 1 ms, as ``exp`` does.
            upper = min(3 * max(prev, 1e-3), self.max)
            prev = rng.uniform(min(prev, lower, upper), upper)
            yield prev
