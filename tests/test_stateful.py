"""Random operation sequences against a pool, checked after every step (Hypothesis).

Hypothesis generates a pool configuration (fixed or elastic size, hold timeout, lifetime,
checkout timeout) and a list of operations; each example runs them in
one ``trio.run`` with a frozen ``MockClock`` (time moves only on an ``advance`` operation, so
every step is deterministic). Each client is a task driven through a command channel: it checks
out a connection (maybe waiting in the queue), runs queries and transactions, raises, is
cancelled while waiting or in the middle of a blocking query, sees scripted driver failures, has
its connection killed or revoked by the hold deadline. After every step the test settles the
scheduler (``wait_all_tasks_blocked``) and checks the pool's invariants:

* no connection is lent twice (no two live leases share an actor or a driver connection), and a
  lent connection is never closed under a holder that was not revoked;
* ``idle + busy + connecting == size``, ``busy`` equals the clients holding a live lease,
  ``waiting`` equals the clients queued, and nobody waits while a connection is idle;
* every idle connection is open and in a clean ``"idle"`` state;
* waiters are served in FIFO order, and each client ends with the outcome its history allows
  (served, dropped or timed out only after waiting through time, lost only after a failure,
  a kill or a revocation).

At the end every client is released, the pool must be back to all idle, and closing it must
close every connection and leave no task behind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import trio
import trio.testing
from helpers import settle
from hypothesis import HealthCheck, given, settings

import supervisor
from actors.driver import ConnectionLost as DriverConnectionLost
from actors.scripted import ScriptedConnection, ScriptedDriver, blocking
from supervisor import (
    Backoff,
    CheckoutTimeout,
    Pool,
    PoolClosed,
    QueueDropped,
    SafetyLimits,
    TransactionFailed,
    open_pool,
)
from supervisor.session import Session


class Boom(Exception):
    """Raised by a client inside its block."""


@dataclass
class Config:
    size: int  # a fixed size, or the max_size of an elastic pool
    hold_timeout: float | None
    max_lifetime: float | None
    checkout_timeout: float | None
    min_size: int | None = None  # elastic when set: min_size..size, shrinking after max_idle
    max_idle: float = 2.0

    @property
    def lowest(self) -> int:
        return self.size if self.min_size is None else self.min_size


@dataclass(eq=False)
class Client:
    cid: int
    send: trio.MemorySendChannel[str]
    recv: trio.MemoryReceiveChannel[str]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    state: str = "waiting"  # waiting -> holding <-> busy -> done
    outcome: str | None = None
    session: Session | None = None
    conn: ScriptedConnection | None = None
    unblock: trio.Event | None = None
    queued: bool = False  # still waiting after the step that created it
    waited_through_time: bool = False
    cancelled: bool = False
    sent_raise: bool = False
    sent_lost: bool = False
    killed: bool = False
    served_seq: int | None = None  # the step during which it got its connection

    @property
    def revoked(self) -> bool:
        return self.session is not None and self.session.revoked is not None

    @property
    def inside(self) -> bool:
        return self.state in ("holding", "busy")


INDEX = st.integers(0, 9)
# Weighted by repetition: clients must arrive often enough to hold, queue and compete.
KINDS = ["checkout"] * 5 + [
    "query",
    "tx",
    "block",
    "block",
    "unblock",
    "cancel",
    "cancel",
    "raise",
    "lost",
    "kill",
    "return",
    "return",
    "return",
    "advance",
    "advance",
    "advance",
    "ping_fail",
    "disconnect_all",
]


def _op(kind: str) -> st.SearchStrategy[tuple[Any, ...]]:
    if kind in ("checkout", "ping_fail"):
        return st.just((kind,))
    if kind == "advance":
        return st.tuples(st.just(kind), st.sampled_from([0.02, 0.3, 1.0, 2.5]))
    if kind == "disconnect_all":
        return st.tuples(st.just(kind), st.sampled_from([0.0, 1.5]))
    return st.tuples(st.just(kind), INDEX)


OPS = st.sampled_from(KINDS).flatmap(_op)
CONFIGS = st.builds(
    Config,
    size=st.integers(1, 3),
    hold_timeout=st.sampled_from([None, 3.0]),
    max_lifetime=st.sampled_from([None, 4.0]),
    checkout_timeout=st.sampled_from([None, 0.5]),
    min_size=st.sampled_from([None, None, 0, 1]),
    max_idle=st.sampled_from([0.5, 2.0]),
)


class Harness:
    def __init__(
        self,
        pool: Pool,
        driver: ScriptedDriver,
        clock: trio.testing.MockClock,
        nursery: trio.Nursery,
        config: Config,
    ) -> None:
        self.pool = pool
        self.driver = driver
        self.clock = clock
        self.nursery = nursery
        self.config = config
        self.clients: list[Client] = []
        self.step = 0

    # -- the client task ------------------------------------------------------------------------

    async def client_main(self, c: Client) -> None:
        with c.scope:
            try:
                async with self.pool.run() as conn:
                    c.session = conn._session
                    c.conn = conn._session.conn  # type: ignore[assignment]
                    c.served_seq = self.step
                    # A client never gets a closed connection or one in an unknown state.
                    assert c.conn is not None and not c.conn.closed
                    assert conn.status() == "idle"
                    c.state = "holding"
                    async for cmd in c.recv:
                        if cmd == "return":
                            break
                        if cmd == "raise":
                            raise Boom()
                        if cmd == "kill":
                            conn.kill()
                            continue
                        c.state = "busy"
                        if cmd == "query":
                            await conn.execute("select 1")
                        elif cmd == "tx":
                            async with conn.transaction() as tx:
                                await tx.execute("update t set x = x + 1")
                            assert tx.committed
                        else:  # pragma: no cover
                            raise AssertionError(cmd)
                        c.state = "holding"
                c.outcome = "returned"
            except Boom:
                c.outcome = "raised"
            except supervisor.ConnectionLost:
                c.outcome = "lost"
            except QueueDropped:
                c.outcome = "dropped"
            except CheckoutTimeout:
                c.outcome = "timeout"
            except (PoolClosed, TransactionFailed) as exc:  # pragma: no cover
                c.outcome = f"unexpected {exc!r}"
        if c.scope.cancelled_caught:
            c.outcome = "cancelled"
        c.state = "done"

    # -- operations -----------------------------------------------------------------------------

    def pick(self, i: int, *states: str) -> Client | None:
        candidates = [c for c in self.clients if c.state in states]
        return candidates[i % len(candidates)] if candidates else None

    async def apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "checkout":
            send, recv = trio.open_memory_channel[str](math.inf)
            c = Client(len(self.clients), send, recv)
            self.clients.append(c)
            self.nursery.start_soon(self.client_main, c)
            await settle()
            c.queued = c.state == "waiting"
            return
        if kind == "advance":
            remaining = op[1]
            waiting = [c for c in self.clients if c.state == "waiting"]
            while remaining > 1e-9:
                step = min(remaining, 0.25)
                self.clock.jump(step)
                remaining -= step
                await settle()
            for c in waiting:
                c.waited_through_time = True
            return
        if kind == "ping_fail":
            self.driver.script("ping", DriverConnectionLost("server closed the connection"))
            return
        if kind == "disconnect_all":
            await self.pool.disconnect_all(op[1])
            await settle()
            return
        i = op[1]
        if kind == "cancel":
            target = self.pick(i, "waiting", "holding", "busy")
            if target is not None:
                target.cancelled = True
                target.scope.cancel()
        elif kind == "unblock":
            target = self.pick(i, "busy")
            if target is not None and target.unblock is not None:
                target.unblock.set()
                target.unblock = None
        elif kind in ("block", "lost"):
            target = self.pick(i, "holding")
            if target is None or target.revoked or target.killed:
                return
            if kind == "block":
                target.unblock = trio.Event()
                self.driver.script("execute", blocking(target.unblock, 0))
            else:
                target.sent_lost = True
                self.driver.script("execute", DriverConnectionLost("connection reset by peer"))
            target.send.send_nowait("query")
        else:  # query, tx, raise, kill, return: only for a client holding its connection
            target = self.pick(i, "holding")
            if target is None:
                return
            if kind == "raise":
                target.sent_raise = True
            if kind == "kill":
                target.killed = True
            target.send.send_nowait(kind)
        await settle()
        # Every scripted execute step was consumed by the client it was meant for.
        assert self.driver.pending("execute") == 0

    # -- checks ---------------------------------------------------------------------------------

    def check(self) -> None:
        pool = self.pool
        stats = pool.statistics()
        assert self.config.lowest <= stats.size <= self.config.size, stats
        assert min(stats.idle, stats.busy, stats.connecting, stats.waiting) >= 0
        assert stats.idle + stats.busy + stats.connecting == stats.size
        # Nothing is half-done once the scheduler settled: no connect fails in this test, so
        # every actor is either idle or lent out.
        assert stats.connecting == 0, stats

        inside = [c for c in self.clients if c.inside]
        live = [c for c in inside if not c.revoked]
        assert stats.busy == len(live), (stats, [(c.cid, c.state) for c in inside])
        assert stats.waiting == sum(1 for c in self.clients if c.state == "waiting")
        if stats.idle:
            assert stats.waiting == 0
        assert pool._lender.leases_out == len(inside)

        # No connection lent twice.
        conns = [id(c.conn) for c in inside]
        assert len(set(conns)) == len(conns)
        actors = [id(c.session.actor) for c in live if c.session is not None]
        assert len(set(actors)) == len(actors)
        for c in live:
            assert c.session is not None and c.session.active
            assert c.session.actor.lease is c.session
            assert c.session.actor.state == "busy"
            if not c.killed:
                assert c.conn is not None and not c.conn.closed

        for actor in pool._lender.actors():
            if actor.state == "idle":
                assert actor.conn is not None
                assert not actor.conn.closed  # type: ignore[attr-defined]
                assert actor.conn.status() == "idle"
                assert actor.lease is None
            else:
                assert actor.state == "busy"

        # FIFO: clients that had to queue are served in arrival order (clients handed a
        # connection during the same step are not ordered by this check).
        steps = [c.served_seq for c in self.clients if c.queued and c.served_seq is not None]
        assert steps == sorted(steps)

    def check_outcomes(self) -> None:
        for c in self.clients:
            assert c.state == "done"
            if c.cancelled:
                assert c.outcome == "cancelled", c
            elif c.sent_raise:
                assert c.outcome == "raised", c
            elif c.sent_lost:
                assert c.outcome == "lost", c
            elif c.outcome == "lost":
                assert c.revoked or c.killed, c
            elif c.outcome in ("dropped", "timeout"):
                assert c.waited_through_time and c.served_seq is None, c
                if c.outcome == "timeout":
                    assert self.config.checkout_timeout is not None
            else:
                assert c.outcome == "returned", c

    async def drain(self) -> None:
        """Release everything: unblock blocked queries, return every held connection; waiters
        are served as connections come back, and return in turn."""
        for _ in range(4 * len(self.clients) + 4):
            if all(c.state == "done" for c in self.clients):
                return
            self.step += 1
            for c in self.clients:
                if c.state == "busy" and c.unblock is not None:
                    c.unblock.set()
                    c.unblock = None
                elif c.state == "holding":
                    c.send.send_nowait("return")
            await settle()
            self.check()
        stuck = [(c.cid, c.state) for c in self.clients if c.state != "done"]
        raise AssertionError(f"clients never finished: {stuck}")


async def run_example(config: Config, ops: list[tuple[Any, ...]]) -> None:
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)
    driver = ScriptedDriver()
    tasks_before = trio.lowlevel.current_statistics().tasks_living
    limits = SafetyLimits(
        checkout_timeout=config.checkout_timeout,
        hold_timeout=config.hold_timeout,
        shutdown_grace=1.0,
        cleanup_timeout=1.0,
    )
    sizes: dict[str, Any] = (
        {"size": config.size}
        if config.min_size is None
        else {"min_size": config.min_size, "max_size": config.size, "max_idle": config.max_idle}
    )
    with trio.fail_after(100_000):
        async with open_pool(
            driver,
            **sizes,
            name="fuzz",
            queue_target=0.05,
            queue_interval=1.0,
            idle_interval=1.0,
            max_lifetime=config.max_lifetime,
            backoff=Backoff(kind="exp", min=0.1, max=1.0),
            limits=limits,
            seed=0,
        ) as pool:
            async with trio.open_nursery() as nursery:
                harness = Harness(pool, driver, clock, nursery, config)
                await settle()
                harness.check()
                for op in ops:
                    harness.step += 1
                    await harness.apply(op)
                    harness.check()
                await harness.drain()
            harness.check_outcomes()
            await settle()
            stats = pool.statistics()
            assert (stats.idle, stats.busy, stats.waiting, stats.connecting) == (
                stats.size,
                0,
                0,
                0,
            ), stats
            assert config.lowest <= stats.size <= config.size
            assert pool._lender.leases_out == 0
            assert stats.checkouts == sum(1 for c in harness.clients if c.served_seq is not None)
            # Closing may wait (grace periods, bounded cleanups): let time run from here on.
            clock.autojump_threshold = 0
        assert driver.live == []
        assert all(c.closed for c in driver.connections)
        assert pool.statistics().size == 0
        # No task left behind: actors, supervisor, queue poll and clients are all gone.
        assert trio.lowlevel.current_statistics().tasks_living == tasks_before


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(config=CONFIGS, ops=st.lists(OPS, min_size=20, max_size=80))
def test_random_operations_keep_the_pool_consistent(
    config: Config, ops: list[tuple[Any, ...]]
) -> None:
    trio.run(run_example, config, ops, clock=trio.testing.MockClock())


def test_a_known_busy_sequence() -> None:
    """A fixed, dense sequence (always run, whatever Hypothesis draws)."""
    ops: list[tuple[Any, ...]] = [
        ("checkout",),
        ("checkout",),
        ("checkout",),
        ("checkout",),
        ("block", 0),
        ("query", 1),
        ("cancel", 0),
        ("advance", 0.3),
        ("lost", 0),
        ("checkout",),
        ("tx", 0),
        ("raise", 0),
        ("advance", 2.5),
        ("checkout",),
        ("kill", 0),
        ("query", 0),
        ("advance", 1.0),
        ("ping_fail",),
        ("advance", 2.5),
        ("disconnect_all", 1.5),
        ("checkout",),
        ("checkout",),
        ("cancel", 1),
        ("return", 0),
        ("advance", 2.5),
        ("return", 0),
    ]
    for config in (
        Config(size=1, hold_timeout=None, max_lifetime=None, checkout_timeout=None),
        Config(size=2, hold_timeout=3.0, max_lifetime=4.0, checkout_timeout=0.5),
        Config(size=3, hold_timeout=3.0, max_lifetime=None, checkout_timeout=None),
        Config(size=3, hold_timeout=None, max_lifetime=4.0, checkout_timeout=None, min_size=0),
        Config(size=2, hold_timeout=3.0, max_lifetime=None, checkout_timeout=0.5, min_size=1),
    ):
        trio.run(run_example, config, ops, clock=trio.testing.MockClock())
