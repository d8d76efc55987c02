"""The trio-asyncio loop that hosts a driver's connections, and the crossing into it.

Why: an asyncio driver's connection belongs to one asyncio loop (its transport, its futures).
Under Trio that loop is a trio-asyncio loop, and the pool calls the connection from several Trio
tasks (the actor, each client in turn). This module answers, once for both drivers, "which loop"
and "how does a Trio task run one coroutine on it".

Loop ownership (the rule, also in :mod:`actors.aio`):

* At ``connect()``, if the calling Trio task runs inside ``trio_asyncio.open_loop()`` (the
  pool was opened inside it, so its actor tasks inherit the loop), the connection lives on that
  running loop, which stays the caller's: the driver never closes it.
* Otherwise the driver runs its own loop: :class:`LoopHost` opens ``trio_asyncio.open_loop()``
  in a Trio *system task* (:func:`trio.lowlevel.spawn_system_task`, so no nursery is needed) on
  the first connect, counts the connections living on it, and stops it when the last one
  closes. A new connect later starts a new loop. So no asyncio object outlives the connections,
  whoever owns the driver; ``driver.close()`` closes what is left and waits for the loop to end.
  The loop belongs to one ``trio.run``: a driver reused in another run starts a fresh one.

Crossing: :class:`Call` wraps one coroutine in an :class:`asyncio.Task` on the loop and parks
the Trio task until it finishes. A Trio cancellation cancels the asyncio task and releases the
Trio task *at once* (``Abort.SUCCEEDED``): it does not wait for the asyncio side to unwind,
which is what :func:`trio_asyncio.aio_as_trio` does. The unfinished asyncio task is then the
connection's business (``status()`` says "unknown"; ``reset()`` waits for it). No
``open_loop()`` is entered per call, so no ExceptionGroup layers appear; :func:`leaf` unwraps
single-member groups anyway.

Rules: no asyncio call is made from a Trio task except ``loop.create_task`` and
``Task.cancel`` (both thread-unaware scheduling, safe on a trio-asyncio loop); everything else
runs inside an asyncio task or a loop callback. Every asyncio task's outcome is retrieved, so
asyncio never logs "exception was never retrieved".
"""

from __future__ import annotations

import asyncio
from asyncio.events import _set_running_loop
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

import outcome
import trio
import trio_asyncio  # type: ignore[import-untyped]

__all__ = ["Call", "LoopHost", "LoopLease", "leaf", "wait_done"]

T = TypeVar("T")


def leaf(exc: BaseException) -> BaseException:
    """The single exception inside nested one-member exception groups (else ``exc``)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class _Stepped:
    """Run a coroutine's steps with ``loop`` as asyncio's thread-local running loop.

    trio-asyncio makes :func:`asyncio.get_running_loop` find its loop by patching the
    ``asyncio`` module, which a library misses if it bound the function before trio-asyncio
    was imported (psycopg's ``waiting`` module does: ``from asyncio import get_running_loop``)
    and which C code never sees. Setting the running loop around each step serves them all.
    """

    __slots__ = ("_coro", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> None:
        self._loop = loop
        self._coro = coro

    def __await__(self) -> Generator[Any, Any, Any]:
        gen = self._coro.__await__()
        send: Any = None
        error: BaseException | None = None
        while True:
            _set_running_loop(self._loop)
            try:
                if error is not None:
                    step = gen.throw(error)
                else:
                    step = gen.send(send)
            except StopIteration as stop:
                return stop.value
            finally:
                _set_running_loop(None)
                error = None
            try:
                send = yield step
            except BaseException as exc:  # CancelledError thrown in by the Task: pass it on
                error = exc


async def _stepped(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    result: T = await _Stepped(loop, coro)
    return result


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a finished future's outcome as seen (asyncio logs unretrieved exceptions)."""
    if not fut.cancelled():
        fut.exception()


class Call(Generic[T]):
    """One coroutine run as an asyncio task on ``loop``, awaited by one Trio task.

    ``late`` is called (in the loop) with the result if the task succeeds after its Trio waiter
    left: a connect that landed just too late closes the connection nobody will use.
    """

    __slots__ = ("_task", "_waiting", "abandoned", "future", "late")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, T],
        late: Callable[[T], object] | None = None,
    ) -> None:
        wrapper = _stepped(loop, coro)
        try:
            self.future: asyncio.Future[T] = loop.create_task(wrapper)
        except BaseException:
            wrapper.close()  # the loop is closed: no "coroutine was never awaited" warning
            coro.close()
            raise
        self.late = late
        self.abandoned = False
        self._task: trio.lowlevel.Task | None = None
        self._waiting = False
        self.future.add_done_callback(self._done)

    def _done(self, fut: asyncio.Future[T]) -> None:
        if self._waiting:
            self._waiting = False
            assert self._task is not None
            trio.lowlevel.reschedule(self._task, outcome.capture(fut.result))
            return
        _retrieve(fut)
        if self.abandoned and self.late is not None and not fut.cancelled():
            if fut.exception() is None:
                self.late(fut.result())

    async def wait(self) -> T:
        """Wait for the result. A Trio cancellation cancels the asyncio task and returns at once
        (the task may still be running: see :attr:`future`)."""
        fut = self.future
        if fut.done():
            result = outcome.capture(fut.result)
            await trio.lowlevel.checkpoint()
            return result.unwrap()
        self._task = trio.lowlevel.current_task()
        self._waiting = True

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._waiting = False
            self.abandoned = True
            fut.cancel()
            return trio.lowlevel.Abort.SUCCEEDED

        result_value: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result_value

    def abandon(self, error: BaseException) -> None:
        """Release the waiting Trio task now with ``error`` (a close under the call)."""
        self.abandoned = True
        if self._waiting:
            self._waiting = False
            assert self._task is not None
            trio.lowlevel.reschedule(self._task, outcome.Error(error))


async def wait_done(fut: asyncio.Future[Any]) -> None:
    """Wait until ``fut`` is done, without cancelling it when this wait is cancelled."""
    if fut.done():
        await trio.lowlevel.checkpoint()
        return
    done = trio.Event()
    fut.add_done_callback(lambda _: done.set())
    await done.wait()


class _HostedLoop:
    """One trio-asyncio loop run by a Trio system task, for one ``trio.run``."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = trio.Event()
        self.stop = trio.Event()
        self.stopped = trio.Event()
        self.users = 0
        self.error: BaseException | None = None

    async def run(self) -> None:
        try:
            async with trio_asyncio.open_loop() as loop:
                self.loop = loop
                self.ready.set()
                await self.stop.wait()
        except BaseExceptionGroup as group:
            cancelled, rest = group.split(trio.Cancelled)
            self.error = rest
            if cancelled is not None:
                raise cancelled from None  # the end of the run: Trio's own cancellation
        except Exception as exc:  # a system task must not raise: keep it for debugging
            self.error = exc
        finally:
            self.ready.set()
            self.stopped.set()


class LoopLease:
    """A connection's hold on its loop; :meth:`release` it once, when the connection closes."""

    __slots__ = ("_host", "_hosted", "loop", "owned")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: LoopHost | None = None,
        hosted: _HostedLoop | None = None,
    ) -> None:
        self.loop = loop
        self.owned = hosted is not None
        """True when the driver runs this loop (False: the caller's running loop)."""
        self._host = host
        self._hosted = hosted

    def release(self) -> None:
        """Give the hold back (idempotent). The driver's own loop stops with its last user."""
        host, hosted = self._host, self._hosted
        self._host = self._hosted = None
        if host is not None and hosted is not None:
            host._release(hosted)


class LoopHost:
    """The loop of one driver's connections (see the module documentation for the rule)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._current: _HostedLoop | None = None
        self._stopping: list[_HostedLoop] = []

    @property
    def running(self) -> bool:
        """The driver's own loop is running (or starting) in this process."""
        return self._current is not None

    async def acquire(self) -> LoopLease:
        """A hold on the loop a new connection should live on (started if need be)."""
        running = trio_asyncio.current_loop.get()
        if running is not None and not running.is_closed():
            await trio.lowlevel.checkpoint()
            return LoopLease(running)
        token = trio.lowlevel.current_trio_token()
        hosted = self._current
        if hosted is None or hosted.token is not token:
            hosted = _HostedLoop(token)
            self._current = hosted
            trio.lowlevel.spawn_system_task(hosted.run, name=f"{self._name} asyncio loop")
        hosted.users += 1
        try:
            await hosted.ready.wait()
        except BaseException:
            self._release(hosted)
            raise
        loop = hosted.loop
        if loop is None or loop.is_closed() or hosted.stopped.is_set():
            self._release(hosted)
            raise RuntimeError(f"{self._name}: the asyncio loop failed to start: {hosted.error!r}")
        return LoopLease(loop, self, hosted)

    def _release(self, hosted: _HostedLoop) -> None:
        hosted.users -= 1
        if hosted.users <= 0:
            hosted.stop.set()
            if self._current is hosted:
                self._current = None
            if not hosted.stopped.is_set():
                self._stopping.append(hosted)

    async def wait_stopped(self) -> None:
        """Wait until every loop of this run that was told to stop has ended."""
        token = trio.lowlevel.current_trio_token()
        keep = []
        for hosted in self._stopping:
            if hosted.token is token:
                await hosted.stopped.wait()
            elif not hosted.stopped.is_set():
                keep.append(hosted)  # pragma: no cover - another run's loop
        self._stopping = keep
        await trio.lowlevel.checkpoint()
