"""The checkout queue: FIFO waiters with CoDel shedding (DBConnection's queue_target/interval).

Everything here is plain data and arithmetic: no Trio, no I/O. The pool asks this module "a
connection was just returned at time ``now``: whom do I serve, whom do I drop?" and performs the
hand-over itself. That keeps the policy testable with numbers alone (httpcore's pool idea).

CoDel in one paragraph: while connections come back faster than clients arrive, nobody waits
long and nothing happens. When, over a whole ``interval``, even the *shortest* wait of a served
client exceeded ``target``, the pool is *slow*: it is overloaded, not just bursty. While slow,
clients that have already waited more than ``2 * target`` are dropped (``QueueDropped``) instead
of being served late, so the ones that remain are served within bounded time and callers can
shed load upstream. The flag is re-evaluated every interval, so the pool recovers by itself when
the load falls.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CoDel", "Waiter", "WaiterQueue"]


@dataclass(eq=False, slots=True)
class Waiter:
    """One client waiting for a connection. ``token`` is the pool's handle on the waiting task."""

    start: float
    token: Any = None
    done: bool = False


@dataclass(slots=True)
class CoDel:
    """CoDel state: ``delay`` is the minimum wait seen in the current interval, ``next`` the end
    of that interval, ``slow`` whether the previous interval was overloaded."""

    target: float
    interval: float
    delay: float = 0.0
    slow: bool = False
    next: float = 0.0

    def on_serve(self, now: float, head_wait: float) -> tuple[bool, float]:
        """A connection is being handed to the queue's head, which has waited ``head_wait``.

        Returns ``(drop_old, threshold)``: when ``drop_old`` is true, waiters that have waited
        more than ``threshold`` must be dropped before serving. Updates the state.
        """
        if now >= self.next:
            self.slow = self.delay > self.target
            self.next = now + self.interval
            self.delay = head_wait
            return False, 0.0
        if not self.slow:
            self.delay = min(self.delay, head_wait)
            return False, 0.0
        return True, 2 * self.target

    def on_idle(self) -> None:
        """A connection went idle with nobody waiting: the queue is empty, delay is zero."""
        self.delay = 0.0

    def on_poll(self, now: float, head_wait: float | None) -> tuple[bool, float]:
        """Periodic check (every ``interval``) for the case where nothing is returned at all,
        e.g. the database is down. If the head has waited a whole interval, the pool is slow:
        drop waiters older than ``2 * target``."""
        if head_wait is None or head_wait < self.interval:
            return False, 0.0
        self.slow = True
        self.delay = max(self.delay, head_wait)
        self.next = now + self.interval
        return True, 2 * self.target


@dataclass(slots=True)
class WaiterQueue:
    """FIFO of waiters with lazy deletion (a cancelled waiter is marked ``done`` and skipped)."""

    codel: CoDel
    _queue: deque[Waiter] = field(default_factory=deque)
    live: int = 0

    def __len__(self) -> int:
        return self.live

    def push(self, waiter: Waiter) -> None:
        """Add a waiter at the tail."""
        self._queue.append(waiter)
        self.live += 1

    def discard(self, waiter: Waiter) -> None:
        """Forget a waiter that gave up (cancelled or timed out); O(1)."""
        if not waiter.done:
            waiter.done = True
            self.live -= 1

    def _head(self) -> Waiter | None:
        queue = self._queue
        while queue and queue[0].done:
            queue.popleft()
        return queue[0] if queue else None

    def _pop_head(self) -> Waiter:
        waiter = self._queue.popleft()
        waiter.done = True
        self.live -= 1
        return waiter

    def _drop_older(self, now: float, threshold: float, dropped: list[Waiter]) -> None:
        while (head := self._head()) is not None and now - head.start > threshold:
            dropped.append(self._pop_head())

    def serve(self, now: float) -> tuple[Waiter | None, list[Waiter]]:
        """A connection is available: return the waiter to hand it to (or None: keep it idle)
        and the waiters to drop with ``QueueDropped``."""
        dropped: list[Waiter] = []
        head = self._head()
        if head is None:
            self.codel.on_idle()
            return None, dropped
        drop_old, threshold = self.codel.on_serve(now, now - head.start)
        if drop_old:
            self._drop_older(now, threshold, dropped)
            head = self._head()
            if head is None:
                self.codel.on_idle()
                return None, dropped
            # DBConnection's dequeue_slow then serves like the fast path: the served wait
            # still counts towards this interval's minimum, so the pool can leave "slow".
            self.codel.delay = min(self.codel.delay, now - head.start)
        return self._pop_head(), dropped

    def poll(self, now: float) -> list[Waiter]:
        """The periodic CoDel check; returns the waiters to drop."""
        dropped: list[Waiter] = []
        head = self._head()
        drop_old, threshold = self.codel.on_poll(now, None if head is None else now - head.start)
        if drop_old:
            self._drop_older(now, threshold, dropped)
        return dropped

    def drain(self) -> list[Waiter]:
        """Remove and return every live waiter (pool closing)."""
        out = []
        while self._head() is not None:
            out.append(self._pop_head())
        return out
