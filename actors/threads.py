"""Blocking calls in worker threads that a cancelled caller can walk away from.

Why: ``sqlite3``, synchronous psycopg, libpq's ``PQcancel`` and every blocking connect must
run off the Trio loop, and the cancellation rule of :mod:`actors.driver` says that a cancelled
caller goes free at once. ``trio.to_thread.run_sync(..., abandon_on_cancel=True)`` does that
but leaves every driver the same questions. This module answers them once:

* A call whose caller left *before* its thread began never runs. Otherwise it would reach the
  database behind the back of whoever uses the connection next.
* A call still running after its caller left is remembered ("in flight"). The next call waits
  for it; :meth:`ThreadEngine.interrupt` can ask it to stop; :meth:`ThreadEngine.close` never
  waits for it.
* A result that lands after its caller left goes to a ``late`` cleanup (a connect that
  finished just too late: close the connection nobody will use).
* Closing finishes the resource (closes the handle) exactly once. :meth:`ThreadEngine.close`
  does it in a fresh thread. If a call is still running on the resource, that call's own
  thread does it once the call returns: a libpq or sqlite3 handle must not be freed under a
  running call.

Rules:

* One :class:`ThreadEngine` per connection. It owns its :class:`trio.CapacityLimiter`, so
  abandoned threads never take threads from Trio's global budget or from another connection.
* Calls run one at a time. Their callers queue FIFO on the Trio side, and the running call
  also holds :attr:`ThreadEngine.serial` in its thread.
* :attr:`ThreadEngine.lock` (a :class:`threading.Lock`) guards everything that the Trio side
  and the worker threads share. It is never held across a blocking call except the short
  ``interrupt`` hooks. A driver may put its own shared flags under it.
* The module knows nothing of databases. A driver turns :class:`EngineClosed` into its own
  error.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import trio

__all__ = ["EngineClosed", "ThreadEngine", "call_in_thread"]

T = TypeVar("T")


class EngineClosed(Exception):
    """The engine was closed before the call ran, or :meth:`ThreadEngine.close` woke its caller."""


class _Skipped:
    """What a worker returns for a call it did not run (caller gone, or engine closed)."""


_SKIPPED = _Skipped()


def _quietly(fn: Callable[[], object]) -> None:
    """Run a cleanup. Closing never fails, so its exceptions are dropped."""
    with contextlib.suppress(Exception):
        fn()


def _report(token: trio.lowlevel.TrioToken, fn: Callable[[], object]) -> None:
    """From a worker thread: run ``fn`` in the Trio thread soon. Drop it if Trio has finished."""
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(fn)


def _in_fresh_thread(fn: Callable[[], object], then: Callable[[], object] | None = None) -> None:
    """Run ``fn`` in a new thread that starts even if this task is already cancelled.

    The thread uses no limiter. ``then`` runs in the Trio thread afterwards.
    """
    token = trio.lowlevel.current_trio_token()

    def done(_: object) -> None:
        if then is not None:
            _report(token, then)

    trio.lowlevel.start_thread_soon(lambda: _quietly(fn), done)


class _Call(Generic[T]):
    """One call, as seen by its caller and by its worker thread.

    The flags are guarded by the engine's lock.
    """

    __slots__ = ("abandoned", "finished", "interrupted", "scope", "skip", "started", "value")

    def __init__(self) -> None:
        self.started = False  # its thread began running fn
        self.finished = False  # fn returned or raised
        self.skip = False  # its caller left before it started: it must never run
        self.abandoned = False  # its caller left while fn ran
        self.interrupted = False  # ThreadEngine.interrupt() asked it to stop
        self.value: tuple[T] | None = None  # a result not delivered yet (kept for ``late``)
        self.scope = trio.CancelScope()  # close() cancels it to wake the caller


class ThreadEngine:
    """The worker-thread calls of one resource (a database connection), one at a time.

    ``limiter`` is either the number of threads of a private :class:`trio.CapacityLimiter`
    or a limiter to share. ``finish`` releases the resource (for example ``raw.close``) and
    runs exactly once, after :meth:`close`: see there.
    """

    def __init__(
        self,
        limiter: int | trio.CapacityLimiter = 1,
        *,
        finish: Callable[[], object] | None = None,
    ) -> None:
        self.lock = threading.Lock()
        """Guards the state that the Trio side and the worker threads share."""
        self.serial = threading.Lock()
        """Held in the worker thread while a call runs: one call at a time, even in threads."""
        self._limiter = (
            limiter if isinstance(limiter, trio.CapacityLimiter) else trio.CapacityLimiter(limiter)
        )
        self._finish = finish
        self._finish_claimed = False
        self._finished = trio.Event()
        self._order = trio.Lock()
        self._flight: _Call[Any] | None = None
        self._wake = trio.Event()
        self._closing = False

    # -- state (no I/O)

    @property
    def closing(self) -> bool:
        """True once :meth:`close` was called (``finish`` may still be running)."""
        return self._closing

    @property
    def in_flight(self) -> bool:
        """True from the start of a call until it lands.

        This includes a call that its cancelled caller abandoned and that still runs.
        """
        return self._flight is not None

    @property
    def running(self) -> bool:
        """True while a call's function runs in its thread (maybe abandoned by its caller)."""
        call = self._flight
        return call is not None and call.started and not call.finished

    def stop_requested(self) -> bool:
        """For a running call's function, in its thread: should it give up early?

        True when its caller left, when :meth:`interrupt` marked it, or when the engine is
        closing.
        """
        with self.lock:
            call = self._flight  # while fn runs, the flight is its call
            return self._closing or (call is not None and (call.abandoned or call.interrupted))

    # -- calls

    async def call(self, fn: Callable[[], T], *, late: Callable[[T], object] | None = None) -> T:
        """Run ``fn()`` in a worker thread and return its result or raise its exception.

        The call first waits, in FIFO order, until no earlier call is in flight. If this
        caller is cancelled, it is released at once:

        * before the thread started ``fn``: ``fn`` never runs;
        * while ``fn`` runs: the call stays in flight until it returns, and the next call
          waits for it;
        * if ``fn`` then returns a value, ``late(value)`` runs in a worker thread to dispose
          of it.

        Raises :class:`EngineClosed` when the engine is closed before ``fn`` starts, or when
        :meth:`close` wakes this caller while ``fn`` still runs.
        """
        async with self._order:
            while self._flight is not None and not self._closing:
                await self._wake.wait()
            if self._closing:
                raise EngineClosed("closed")
            return await self._start(fn, late)

    async def aside(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` beside the calls: not queued, not serialised, allowed after close.

        It uses this engine's limiter and is abandoned when its caller is cancelled. This is
        for out-of-band requests that must reach a running call, such as libpq's ``PQcancel``.
        """
        return await call_in_thread(fn, limiter=self._limiter)

    async def _start(self, fn: Callable[[], T], late: Callable[[T], object] | None) -> T:
        call: _Call[T] = _Call()
        self._flight = call
        token = trio.lowlevel.current_trio_token()

        def work() -> T | _Skipped:
            with self.serial:
                with self.lock:
                    if call.skip or self._closing:
                        return _SKIPPED
                    call.started = True
                try:
                    value = fn()
                except BaseException:
                    self._ended(call, None, late, token)
                    raise
                self._ended(call, (value,), late, token)
                return value

        delivered = False
        result: T | _Skipped = _SKIPPED
        try:
            with call.scope:
                result = await trio.to_thread.run_sync(
                    work, abandon_on_cancel=True, limiter=self._limiter
                )
                delivered = True
        finally:
            self._settle(call, delivered, late)
        if isinstance(result, _Skipped):
            raise EngineClosed("closed")  # closed before fn started, or close() woke us
        return result

    def _ended(
        self,
        call: _Call[T],
        value: tuple[T] | None,
        late: Callable[[T], object] | None,
        token: trio.lowlevel.TrioToken,
    ) -> None:
        """In the worker thread, once ``fn`` returned (``value``) or raised (None)."""
        with self.lock:
            call.finished = True
            abandoned = call.abandoned
            if value is not None and late is not None and not abandoned:
                call.value = value  # the caller may still be cancelled before it gets it
            finish = self._closing and not self._finish_claimed and self._finish is not None
            if finish:
                self._finish_claimed = True
        if value is not None and late is not None and abandoned:
            dispose, result = late, value[0]
            _quietly(lambda: dispose(result))
        if finish and self._finish is not None:
            _quietly(self._finish)
            _report(token, self._finished.set)
        if abandoned:
            _report(token, lambda: self._land(call))

    def _settle(self, call: _Call[T], delivered: bool, late: Callable[[T], object] | None) -> None:
        """In Trio, once the caller's wait is over: forget the call unless its thread runs."""
        with self.lock:
            if not call.started:
                call.skip = True  # it never ran and never will
            abandoned = call.started and not call.finished
            call.abandoned = abandoned
            stray = None if delivered else call.value
            call.value = None
        if stray is not None and late is not None:
            dispose, value = late, stray[0]
            _in_fresh_thread(lambda: dispose(value))  # fn returned just as its caller left
        if not abandoned:
            self._land(call)

    def _land(self, call: _Call[T]) -> None:
        if self._flight is call:
            self._flight = None
            self._notify()

    def _notify(self) -> None:
        """Wake the callers waiting for the flight to land (or for the engine to close)."""
        self._wake.set()
        self._wake = trio.Event()

    # -- stopping

    def interrupt(self, how: Callable[[], object]) -> bool:
        """Ask the running call to stop: mark it and run ``how()`` (e.g. ``raw.interrupt``).

        ``how`` runs under :attr:`lock`, so the call cannot finish meanwhile. It is not run
        when no call is running. Returns whether it ran.
        """
        with self.lock:
            call = self._flight
            if call is None or not call.started or call.finished:
                return False
            call.interrupted = True
            how()
            return True

    async def close(self, interrupt: Callable[[], object] | None = None) -> bool:
        """Refuse new calls and finish the resource. Never raises, never waits for a call.

        If a call is running, ``interrupt()`` runs under :attr:`lock`, its caller is woken at
        once with :class:`EngineClosed`, and its thread runs ``finish`` when the call returns.
        Otherwise ``finish`` runs here in a fresh thread. This task waits for it unless it is
        cancelled; the finish then carries on alone. Returns whether a call was running. A
        second close finds nothing more to finish.
        """
        with self.lock:
            self._closing = True
            call = self._flight
            running = call is not None and call.started and not call.finished
            if running and interrupt is not None:
                interrupt()
            finish_here = not running and not self._finish_claimed
            if finish_here:
                self._finish_claimed = True
        if call is not None:
            call.scope.cancel()
        self._notify()  # callers waiting for the flight give up: closed
        if finish_here and self._finish is not None:
            _in_fresh_thread(self._finish, self._finished.set)
            await self._finished.wait()
        else:
            if finish_here:
                self._finished.set()
            await trio.lowlevel.checkpoint()
        return running

    async def wait_finished(self) -> None:
        """Wait until ``finish`` has run, which happens after :meth:`close`.

        Useful when the handle must really be closed, for example before a file is deleted.
        """
        await self._finished.wait()


async def call_in_thread(
    fn: Callable[[], T],
    *,
    late: Callable[[T], object] | None = None,
    limiter: trio.CapacityLimiter | None = None,
) -> T:
    """Run one ``fn()`` in a worker thread, using the rules of :meth:`ThreadEngine.call`.

    ``fn`` never runs if its caller left first. The caller is released at once when it is
    cancelled, and ``late(value)`` disposes of a result that lands after that. This suits
    one-off calls such as a connect. The threads come from ``limiter`` (default: Trio's
    global limiter).
    """
    if limiter is None:
        limiter = trio.to_thread.current_default_thread_limiter()
    engine = ThreadEngine(limiter)
    return await engine.call(fn, late=late)
