"""The SQL sandbox (Ecto's SQL.Sandbox): a test's work on one connection, rolled back at the end.

While a sandbox is open on a pool, every checkout by an admitted task (the owner, the tasks
started in nurseries it opened inside the block, at any depth, tasks ``allow``-ed, or every
task with ``shared=True``) gets a
*view* of the sandbox's one connection instead of a connection of its own. The rules:

* The sandbox holds one lease for its whole life, inside a transaction opened at entry and
  rolled back at exit: nothing a test does reaches the database for good.
* Views are serialized: one task at a time holds the connection, for a whole block (a
  transaction block of one task is never interleaved with another task's statements). Waiting
  for it is bounded by the checkout timeout.
* Every view opens a savepoint; the next view releases it, or rolls back to it when the
  database reported an error, so one failing statement does not poison the test. The
  application's own transactions become savepoints too (its commits never reach the database)
  and its isolation / read-only options are ignored.
* A task that is not admitted gets a ``PoolError`` saying how to admit it, instead of a
  connection outside the sandbox (which would escape the rollback). A task admitted by
  ``allow`` that uses the pool after the owner's block ended gets a ``PoolError`` saying the
  owner exited.
* A call interrupted inside a view (cancelled mid-query) leaves the connection mid-protocol: the
  next view restores it (server-side cancel, roll back) and opens a fresh sandbox transaction;
  what the test wrote before is gone then, and ``restarts`` counts it.
* ``ownership_timeout`` bounds the sandbox's hold on its connection (the lease's hold
  deadline): a test that leaks a sandbox cannot hold a connection forever.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import final

import trio

from actors.actor import restore_idle
from actors.driver import TransactionOptions
from supervisor.errors import CheckoutTimeout, PoolError
from supervisor.lender import Lender
from supervisor.options import SessionSettings
from supervisor.session import Session, TxScope

__all__ = ["Sandbox", "open_sandbox"]


def _started_inside(
    task: trio.lowlevel.Task, owner: trio.lowlevel.Task, before: frozenset[int]
) -> bool:
    """``task`` is the owner, or was started (at any depth) in a nursery the owner opened
    inside the sandbox's block (not one of ``before``: the owner's nurseries at entry)."""
    current: trio.lowlevel.Task | None = task
    while current is not None:
        if current is owner:
            return True
        nursery = current.parent_nursery
        if nursery is None:
            return False
        if nursery.parent_task is owner:
            return id(nursery) not in before
        current = nursery.parent_task
    return False


@final
class Sandbox:
    """One open sandbox of one pool. Made by :func:`open_sandbox`."""

    def __init__(
        self, lender: Lender, owner: trio.lowlevel.Task, real: Session, *, shared: bool
    ) -> None:
        self._lender = lender
        self.owner = owner
        self.shared = shared
        self.closed = False
        self.restarts = 0
        self._before = frozenset(id(n) for n in owner.child_nurseries)
        self._real = real
        self._allowed: set[trio.lowlevel.Task] = set()
        self._lock = trio.Lock()
        self._count = 0
        self._pending: tuple[str, Session] | None = None
        self._settings = SessionSettings(
            row_factory=lender.settings.row_factory,
            statement_cache_size=lender.settings.statement_cache_size,
            reset="never",
        )

    def allow(self, task: trio.lowlevel.Task) -> None:
        """Admit ``task`` (from outside the owner's tree, e.g. a server a fixture started)."""
        if not isinstance(task, trio.lowlevel.Task):
            raise TypeError(f"allow() takes a trio.lowlevel.Task, not {type(task).__name__}")
        self._allowed.add(task)

    def admits(self, task: trio.lowlevel.Task) -> bool:
        """Whether ``task``'s pool calls run in this sandbox."""
        return (
            self.shared
            or task in self._allowed
            or _started_inside(task, self.owner, self._before)
        )

    async def checkout(self, task: trio.lowlevel.Task, timeout: float | None) -> Session | None:
        """A view for ``task``; None when the sandbox is closed and ``task`` was never
        admitted (the pool then serves it normally)."""
        name = self._lender.name
        if self.closed:
            if task in self._allowed:
                await trio.lowlevel.checkpoint()
                raise PoolError(
                    "the sandbox owner exited: this task was admitted with allow() to a sandbox "
                    "whose block has ended; open a new sandbox (or use the pool outside one)",
                    pool=name,
                )
            return None
        if not self.admits(task):
            await trio.lowlevel.checkpoint()
            raise PoolError(
                f"task {task.name!r} is not in the sandbox of this pool: start it from the "
                "sandbox's block, admit it with box.allow(task), or open the sandbox with "
                "shared=True",
                pool=name,
            )
        if timeout is None:
            timeout = self._lender.limits.checkout_timeout
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            await self._lock.acquire()
        if scope.cancelled_caught:
            raise CheckoutTimeout(
                f"the sandbox's connection was held by another task for {timeout:g}s", pool=name
            )
        try:
            await self._settle()
            self._count += 1
            savepoint = f"tcs_box_{self._count}"
            real = self._real
            await real.call("savepoint", real.conn.savepoint, savepoint, check_failed=False)
        except BaseException:
            self._lock.release()
            raise
        view = Session(
            self._lender.reporter, self._lender.limits, real.actor, real.conn, real.generation,
            task, self._settings,
        )
        view.scopes.append(TxScope(savepoint))
        view.sandbox = self
        self._pending = (savepoint, view)
        self._lender.holders[task] = view
        return view

    def release(self, view: Session) -> None:
        """``view``'s block ended (called by the lender's checkin, in the view's task)."""
        if view.broken:  # the one real connection is dead (or its driver crashed)
            real = self._real
            real.broken = True
            if real.crashed is None:
                real.crashed = view.crashed
        self._lock.release()

    async def _settle(self) -> None:
        """End the previous view's savepoint: release it, roll back to it after an error, or
        restart the sandbox transaction after an interrupted call."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        savepoint, view = pending
        real = self._real
        conn = real.conn
        if real.broken:
            raise real.failed_error(
                "the sandbox's connection was lost: its transaction, and everything done in "
                "the sandbox, is gone"
            )
        if view.interrupted or view.broken or view.needs_reset or view.streams:
            limits = self._lender.limits
            clean = await restore_idle(conn, interrupted=True, timeout=limits.cleanup_timeout)
            if not clean:
                raise PoolError("the sandbox's connection could not be recovered after an "
                                "interrupted call", pool=self._lender.name)
            self.restarts += 1
            await real.call("begin", conn.begin, TransactionOptions(), check_failed=False)
            return
        if conn.status() == "error":
            await real.call("rollback_to", conn.rollback_to, savepoint, check_failed=False)
        await real.call("release", conn.release, savepoint, check_failed=False)

    async def close(self) -> None:
        """Wait (bounded) for the views to end, then roll everything back."""
        self.closed = True
        lender = self._lender
        real = self._real
        with trio.CancelScope(shield=True):
            with trio.move_on_after(lender.limits.shutdown_grace):
                await self._lock.acquire()
                self._lock.release()
            self._pending = None
            if real.revoked is None and not real.broken and not real.interrupted:
                conn = real.conn
                with trio.move_on_after(lender.limits.cleanup_timeout):
                    try:
                        if conn.status() in ("transaction", "error", "unknown"):
                            await real.call("rollback", conn.rollback, check_failed=False)
                    except PoolError:
                        real.needs_reset = True
            lender.checkin(real)


@asynccontextmanager
async def open_sandbox(
    lender: Lender, *, shared: bool, ownership_timeout: float | None
) -> AsyncIterator[Sandbox]:
    """Open a sandbox on ``lender`` for the calling task (see the module docstring)."""
    current = lender.sandbox
    if current is not None and not current.closed:
        raise PoolError("a sandbox is already open on this pool", pool=lender.name)
    owner = trio.lowlevel.current_task()
    if lender.holders.get(owner) is not None:
        raise PoolError(
            "open the sandbox before taking a connection in this task, not inside a block",
            pool=lender.name,
        )
    lender.sandbox = None
    real = await lender.checkout(None, True, owner)
    del lender.holders[owner]  # the owner's own blocks go through views, like everyone's
    try:
        await real.call("begin", real.conn.begin, TransactionOptions(), check_failed=False)
    except BaseException:
        lender.checkin(real)
        raise
    if ownership_timeout is not None:
        real.set_hold_deadline(trio.current_time() + ownership_timeout)
    box = Sandbox(lender, owner, real, shared=shared)
    lender.sandbox = box
    try:
        yield box
    finally:
        await box.close()
