"""The supervisor: runs one task per connection slot and restarts a crashed actor with backoff.

Connect failures are not crashes: the actor retries them itself with backoff. A crash is an
actor task ending with an exception (a bug, or backoff kind ``stop`` giving up). The supervisor
restarts it after a backoff delay and counts it against a *restart intensity* (Erlang/OTP's rule):
more than ``max_restarts`` crashes within ``restart_window`` seconds means something is badly
wrong, and the pool fails as a whole with an error that says why, instead of restarting forever.

One failure is not restarted at all: an actor whose driver said the connect options can never
work (:class:`~actors.actor.ActorMisconfigured`: an invalid port, an unknown option, an SQLite
file in a missing directory). The pool fails at once with that reason, so the waiting clients
and every later call get a :class:`~supervisor.errors.PoolClosed` that says why.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import NoReturn, final

import trio

from actors.actor import Actor, ActorMisconfigured
from supervisor.errors import PoolClosed
from supervisor.lender import Lender

__all__ = ["Supervisor"]


@final
class Supervisor:
    """Starts and restarts the actors of one pool inside the pool's nursery.

    The lender registers the slots and makes the actors; the supervisor runs them, and tells the
    lender when one ends (:meth:`Lender.actor_gone`) or when the pool must fail
    (:meth:`Lender.fail`).
    """

    def __init__(
        self,
        lender: Lender,
        nursery: trio.Nursery,
        *,
        delays: Callable[[], Iterator[float]],
        max_restarts: int,
        restart_window: float,
    ) -> None:
        self._lender = lender
        self._nursery = nursery
        self._delays = delays
        self._max_restarts = max_restarts
        self._window = restart_window
        self._crashes: deque[float] = deque()

    def start(self, index: int) -> None:
        """Start supervising slot ``index`` (the pool has registered the slot already)."""
        self._nursery.start_soon(self._supervise, index, name=f"pool {self._lender.name}#{index}")

    async def _supervise(self, index: int) -> None:
        lender = self._lender
        delays: Iterator[float] | None = None
        while True:
            actor = lender.new_actor(index)
            try:
                await actor.run()
            except ActorMisconfigured as exc:
                lender.actor_gone(actor, crashed=False)
                lender.report("crash", actor, error=exc)
                text = str(exc)
                prefix = f"pool {lender.name!r}: "
                self._fail(f"failed: {text.removeprefix(prefix)}", exc)
            except Exception as exc:
                lender.actor_gone(actor, crashed=True)
                lender.report("crash", actor, error=exc)
                self._check_intensity(actor, exc)
                if actor.generation > 0:
                    delays = None  # it had connected: a fresh crash, restart delays start over
                delays = delays or self._delays()
                await trio.sleep(next(delays, 0.0))
                lender.report("restart", actor)
                continue
            except BaseException:
                lender.actor_gone(actor, crashed=False)
                raise
            lender.actor_gone(actor, crashed=False)
            return

    def _check_intensity(self, actor: Actor, exc: Exception) -> None:
        now = trio.current_time()
        crashes = self._crashes
        crashes.append(now)
        while crashes and crashes[0] < now - self._window:
            crashes.popleft()
        if len(crashes) > self._max_restarts:
            reason = (
                f"failed: {len(crashes)} actor crashes within {self._window:g}s exceed "
                f"max_restarts={self._max_restarts}; last crash (connection #{actor.index}): "
                f"{type(exc).__name__}: {self._lender.scrub(str(exc))}"
            )
            self._fail(reason, exc)

    def _fail(self, reason: str, exc: Exception) -> NoReturn:
        """Fail the pool as a whole with ``reason`` and end this supervising task with it."""
        lender = self._lender
        error = PoolClosed(reason, pool=lender.name)
        if lender.failure is None:  # the first failure is the pool's; later ones are copies
            lender.fail(error)
        raise error from exc
