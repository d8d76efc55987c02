"""A wrapper driver that injects faults on purpose, for fault-injection test suites and the demo.

Pools are judged by what happens when things go wrong: a connection dying mid-transaction, a
COMMIT whose reply never arrives, a serialization failure, a slow statement that a client gives
up on. Real databases produce those rarely and never on cue. :class:`FaultDriver` wraps any
:class:`~actors.driver.Driver` and makes them happen, either at random according to a
:class:`FaultPlan` (reproducible with ``seed``) or exactly when a test asks
(:meth:`FaultDriver.fail_next`, :meth:`FaultDriver.break_all`).

What an injected fault looks like to the pool is exactly what a real one looks like:

* ``lost``: :class:`~actors.driver.ConnectionLost` *before* the call reaches the database. The
  wrapped connection is dead from then on (every later call raises ConnectionLost) and its inner
  connection is closed, so an open transaction is rolled back, as a server would.
* ``lost_after``: the call *runs*, then the connection dies before the reply arrives. On
  ``commit`` this is the classic "did it commit?" case: it did, but the client sees
  ConnectionLost. Integrity checks must count what is in the database, not what clients believe.
* ``error``: a :class:`~actors.driver.DatabaseError` of the plan's ``kind`` (``"serialization"``
  by default, so ``run_transaction`` retries) instead of running the call; the connection stays
  usable. On ``ping`` and ``reset``, whose contract allows only ConnectionLost, it becomes lost.
* ``latency``: ``await trio.sleep(latency)`` before the call, so that a cancellation or a hold
  timeout has something to hit.

``status``, ``cancel`` and ``close`` are never faulted: the first does no I/O and the protocol
says the other two never raise.

The optional protocol methods (``columns``, ``execute_many``, ``leaves_session_state``,
``reset_session``; see :class:`actors.driver.Connection`) exist on a wrapped connection exactly
when the inner connection has them, so the pool sees the wrapped driver's abilities.
``execute_many`` and ``reset_session`` are faultable like any call (``reset_session`` only ever
as ConnectionLost, as for ``reset``); ``columns`` and ``leaves_session_state`` do no I/O and are
passed through.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, TypeVar

import trio

from actors.driver import (
    Connection,
    ConnectionLost,
    Cursor,
    DatabaseError,
    Driver,
    ErrorKind,
    Params,
    Row,
    Status,
    TransactionOptions,
)

__all__ = ["OPERATIONS", "Fault", "FaultConnection", "FaultCursor", "FaultDriver", "FaultPlan"]

OPERATIONS: Final = frozenset(
    {
        "connect",
        "ping",
        "execute",
        "execute_many",
        "fetch",
        "open_cursor",
        "fetch_batch",
        "prepare",
        "begin",
        "commit",
        "rollback",
        "savepoint",
        "release",
        "rollback_to",
        "reset",
        "reset_session",
    }
)
"""The operation names a :class:`FaultPlan` or :meth:`FaultDriver.fail_next` may name."""

T = TypeVar("T")

_LOST_ONLY: Final = frozenset({"ping", "reset", "reset_session"})
# Optional protocol members passed through as they are (no I/O) / wrapped as faultable calls.
_PASSED: Final = frozenset({"columns", "leaves_session_state", "paramstyle"})
_FAULTED: Final = frozenset({"execute_many", "reset_session"})
_SQLSTATE: Final[Mapping[str, str | None]] = {
    "serialization": "40001",
    "integrity": "23000",
    "other": None,
}


def _check_op(op: str) -> None:
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r}; choose from {', '.join(sorted(OPERATIONS))}")


@dataclass(frozen=True, slots=True)
class Fault:
    """What may go wrong with one operation: probabilities per call, plus added latency.

    ``lost``, ``lost_after`` and ``error`` are probabilities (each call draws once, so at most
    one of them strikes); ``kind`` is the kind of the injected DatabaseError; ``latency`` is the
    number of seconds every call waits before it starts.
    """

    lost: float = 0.0
    lost_after: float = 0.0
    error: float = 0.0
    kind: ErrorKind = "serialization"
    latency: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lost", "lost_after", "error"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Fault.{name} must be a probability in [0, 1], got {value!r}")
        if self.lost + self.lost_after + self.error > 1.0 + 1e-9:
            raise ValueError("Fault: lost + lost_after + error must not exceed 1")
        if self.kind not in _SQLSTATE:
            raise ValueError(f"Fault.kind must be one of {sorted(_SQLSTATE)}, got {self.kind!r}")
        if not self.latency >= 0.0:
            raise ValueError(f"Fault.latency must be >= 0 seconds, got {self.latency!r}")

    @property
    def active(self) -> bool:
        """Whether this fault can do anything at all."""
        return bool(self.lost or self.lost_after or self.error or self.latency)


@dataclass(frozen=True)
class FaultPlan:
    """Which faults to inject: ``ops`` maps an operation name to its :class:`Fault`; operations
    not listed get ``default``. The empty plan injects nothing.

    ``FaultPlan(ops={"commit": Fault(lost_after=0.1)})`` loses one COMMIT reply in ten;
    ``FaultPlan.uniform(error=0.01)`` makes one call in a hundred a serialization failure.
    """

    ops: Mapping[str, Fault] = field(default_factory=dict)
    default: Fault = Fault()

    def __post_init__(self) -> None:
        for op in self.ops:
            _check_op(op)
        object.__setattr__(self, "ops", MappingProxyType(dict(self.ops)))

    def fault_for(self, op: str) -> Fault:
        """The fault that applies to ``op``."""
        return self.ops.get(op, self.default)

    @classmethod
    def uniform(
        cls,
        *,
        lost: float = 0.0,
        lost_after: float = 0.0,
        error: float = 0.0,
        kind: ErrorKind = "serialization",
        latency: float = 0.0,
    ) -> FaultPlan:
        """The same fault on every operation except ``connect`` (so the pool can always
        reconnect; give ``connect`` its own entry to test backoff)."""
        fault = Fault(lost=lost, lost_after=lost_after, error=error, kind=kind, latency=latency)
        return cls(ops={"connect": Fault()}, default=fault)


class FaultCursor:
    """Wraps a streaming cursor: ``fetch_batch`` is faulted like any other call."""

    def __init__(self, conn: FaultConnection, inner: Cursor) -> None:
        self._conn = conn
        self.inner = inner
        """The wrapped cursor."""

    async def fetch_batch(self) -> list[Row]:
        """The next batch from the inner cursor, unless a fault strikes first."""
        return await self._conn._call("fetch_batch", self.inner.fetch_batch)

    async def close(self) -> None:
        """Close the inner cursor; never faulted."""
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # ``columns`` exactly when the inner cursor has it (no I/O: passed through).
        if name == "columns":
            return getattr(self.inner, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class FaultConnection:
    """Wraps one live connection of a :class:`FaultDriver`; every I/O method may be faulted."""

    def __init__(self, driver: FaultDriver, inner: Connection) -> None:
        self._driver = driver
        self.inner = inner
        """The wrapped connection."""
        self.broken = False
        """True once a lost fault struck (or :meth:`break_` / ``break_all()`` was called): every
        later call raises ConnectionLost, as on a connection whose server went away."""
        self.corrupted = False
        """True once a forced exception that is not ConnectionLost, DatabaseError, ValueError or
        TypeError struck (a simulated driver bug, see :meth:`FaultDriver.fail_next`): the
        protocol state is lost, so :meth:`status` says ``"unknown"`` from then on."""
        self.closed = False
        """True once :meth:`close` was called."""

    def __repr__(self) -> str:
        state = "closed" if self.closed else "broken" if self.broken else "live"
        return f"<FaultConnection {state} {self.inner!r}>"

    def break_(self) -> None:
        """Kill this connection: its next call (including ping) raises ConnectionLost."""
        self.broken = True

    def __getattr__(self, name: str) -> Any:
        # The optional protocol methods, exactly when the inner connection has them (a missing
        # one raises AttributeError here, so getattr(conn, name, None) is None, as the pool
        # expects). Only reached for names the class does not define.
        if name in _PASSED:
            return getattr(self.inner, name)
        if name in _FAULTED:
            getattr(self.inner, name)
            return getattr(self, f"_{name}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    async def _execute_many(self, query: str, params_seq: list[Params]) -> int:
        """Faultable ``execute_many`` (the inner connection's)."""
        inner: Any = self.inner  # an optional method: not in the Connection protocol
        many: Callable[[str, list[Params]], Awaitable[int]] = inner.execute_many
        return await self._call("execute_many", many, query, params_seq)

    async def _reset_session(self) -> None:
        """Faultable ``reset_session`` (only ever as ConnectionLost, per the protocol)."""
        inner: Any = self.inner  # an optional method: not in the Connection protocol
        reset: Callable[[], Awaitable[None]] = inner.reset_session
        await self._call("reset_session", reset)

    async def _die(self, op: str, how: str) -> ConnectionLost:
        self.broken = True
        await self.inner.close()  # never raises; a server would drop the session too
        return ConnectionLost(f"injected fault: connection lost during {op} ({how})")

    async def _call(self, op: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` on the inner connection, with the driver's faults applied."""
        if self.broken:
            self._driver._record(op, "broken")
            raise await self._die(op, "connection broken")
        after = await self._driver._before(op, self)
        result = await fn(*args)
        if after:
            raise await self._die(op, "after the call ran")
        return result

    def status(self) -> Status:
        """The inner status; ``"unknown"`` once broken or corrupted."""
        return "unknown" if self.broken or self.corrupted else self.inner.status()

    async def ping(self) -> None:
        """Faultable ``ping``."""
        await self._call("ping", self.inner.ping)

    async def execute(self, query: str, params: Params = None) -> int:
        """Faultable ``execute``."""
        return await self._call("execute", self.inner.execute, query, params)

    async def fetch(self, query: str, params: Params = None) -> list[Row]:
        """Faultable ``fetch``."""
        return await self._call("fetch", self.inner.fetch, query, params)

    async def open_cursor(self, query: str, params: Params, batch_size: int) -> FaultCursor:
        """Faultable ``open_cursor``; the cursor's ``fetch_batch`` is faultable too."""
        inner = await self._call("open_cursor", self.inner.open_cursor, query, params, batch_size)
        return FaultCursor(self, inner)

    async def prepare(self, query: str) -> None:
        """Faultable ``prepare``."""
        await self._call("prepare", self.inner.prepare, query)

    async def begin(self, options: TransactionOptions) -> None:
        """Faultable ``begin``."""
        await self._call("begin", self.inner.begin, options)

    async def commit(self) -> None:
        """Faultable ``commit`` (``lost_after`` here means: committed, reply lost)."""
        await self._call("commit", self.inner.commit)

    async def rollback(self) -> None:
        """Faultable ``rollback``."""
        await self._call("rollback", self.inner.rollback)

    async def savepoint(self, name: str) -> None:
        """Faultable ``savepoint``."""
        await self._call("savepoint", self.inner.savepoint, name)

    async def release(self, name: str) -> None:
        """Faultable ``release``."""
        await self._call("release", self.inner.release, name)

    async def rollback_to(self, name: str) -> None:
        """Faultable ``rollback_to``."""
        await self._call("rollback_to", self.inner.rollback_to, name)

    async def cancel(self) -> None:
        """Passed through (never faulted, never raises)."""
        if self.broken:
            await trio.lowlevel.checkpoint()
            return
        await self.inner.cancel()

    async def reset(self) -> None:
        """Faultable ``reset`` (only ever as ConnectionLost, per the protocol)."""
        await self._call("reset", self.inner.reset)

    async def close(self) -> None:
        """Close the inner connection and forget this one; never faulted, never raises."""
        self.closed = True
        self._driver._live.pop(self, None)
        await self.inner.close()


class FaultDriver:
    """Wraps ``inner`` so that its connections fail on purpose.

    Random faults follow :attr:`plan` (assignable at any time; ``FaultPlan()`` stops them) and are
    reproducible for a given ``seed`` and call sequence. :meth:`fail_next` and :meth:`break_all`
    inject faults exactly when a test wants them. :attr:`injected` counts what was injected.
    ``name``, ``options`` and ``secrets`` are the inner driver's, so the pool treats the wrapper
    as the database it wraps.
    """

    def __init__(self, inner: Driver, plan: FaultPlan | None = None, *, seed: int | None = None):
        self.inner = inner
        """The wrapped driver."""
        self.plan = plan if plan is not None else FaultPlan()
        """The random-fault plan in force."""
        self.enabled = True
        """False suspends every injection (random and forced); broken connections stay broken."""
        self.name = inner.name
        self._rng = random.Random(seed)
        self._live: dict[FaultConnection, None] = {}
        self._forced: dict[str, deque[BaseException]] = {}
        self.injected: Counter[tuple[str, str]] = Counter()
        """How many faults were injected, keyed by ``(operation, what)`` where ``what`` is
        ``"lost"``, ``"lost_after"``, ``"error"``, ``"delayed"``, ``"forced"`` or ``"broken"``
        (a call refused because its connection was broken earlier)."""

    def __repr__(self) -> str:
        return f"FaultDriver({self.inner!r}, live={len(self._live)})"

    @property
    def options(self) -> Mapping[str, Any]:
        """The inner driver's options."""
        return self.inner.options

    def secrets(self, options: Mapping[str, Any]) -> list[str]:
        """The inner driver's secrets."""
        return self.inner.secrets(options)

    @property
    def connections(self) -> list[FaultConnection]:
        """The live (not yet closed) wrapped connections, oldest first."""
        return list(self._live)

    def fail_next(self, op: str, exc: BaseException | type[BaseException] | None = None) -> None:
        """Make the next ``op`` call (on any connection) raise ``exc`` instead of running.

        ``exc`` defaults to ConnectionLost; a ConnectionLost also kills the connection it strikes.
        Any other exception that is not a DatabaseError, a ValueError or a TypeError (those
        mean a refused argument): ``RuntimeError``, ``KeyError``... simulates a driver bug in
        the middle of the protocol: the connection it strikes reports status ``"unknown"``
        from then on (the pool then treats it as a driver crash). Calls queue:
        ``fail_next("commit")`` twice fails the next two commits.
        """
        _check_op(op)
        if exc is None:
            exc = ConnectionLost(f"injected fault: fail_next({op!r})")
        elif isinstance(exc, type):
            exc = exc(f"injected fault: fail_next({op!r})")
        self._forced.setdefault(op, deque()).append(exc)

    def break_all(self) -> int:
        """Kill every live connection, like a database server restart: each one's next call
        (ping included) raises ConnectionLost. Returns how many were broken."""
        victims = [c for c in self._live if not c.broken]
        for conn in victims:
            conn.break_()
        return len(victims)

    def count(self, what: str | None = None, op: str | None = None) -> int:
        """Total injected faults, optionally only of one ``what`` and/or one operation."""
        return sum(
            n
            for (o, w), n in self.injected.items()
            if (what is None or w == what) and (op is None or o == op)
        )

    def _record(self, op: str, what: str) -> None:
        self.injected[(op, what)] += 1

    async def _before(self, op: str, conn: FaultConnection | None) -> bool:
        """Apply forced and planned faults to one call; return True for ``lost_after``."""
        if not self.enabled:
            return False
        forced = self._forced.get(op)
        if forced:
            exc = forced.popleft()
            self._record(op, "forced")
            if isinstance(exc, ConnectionLost) and conn is not None:
                conn.broken = True
                await conn.inner.close()
            elif not isinstance(exc, DatabaseError | ValueError | TypeError) and conn is not None:
                conn.corrupted = True  # a driver bug mid-protocol (not a refused argument)
            raise exc
        fault = self.plan.fault_for(op)
        if not fault.active:
            return False
        if fault.latency:
            self._record(op, "delayed")
            await trio.sleep(fault.latency)
        draw = self._rng.random()
        if draw < fault.lost or (op in _LOST_ONLY and draw < fault.lost + fault.error):
            self._record(op, "lost")
            if conn is not None:
                raise await conn._die(op, "before the call ran")
            raise ConnectionLost(f"injected fault: cannot reach the database ({op})")
        draw -= fault.lost
        if draw < fault.lost_after and conn is not None:
            self._record(op, "lost_after")
            return True
        draw -= fault.lost_after
        if draw < fault.error:
            self._record(op, "error")
            raise DatabaseError(
                f"injected fault: {fault.kind} failure in {op}",
                sqlstate=_SQLSTATE[fault.kind],
                kind=fault.kind,
            )
        return False

    async def connect(self, options: Mapping[str, Any]) -> FaultConnection:
        """Connect through the inner driver (faultable: ``lost`` = unreachable, ``error`` =
        refused) and wrap the connection."""
        await self._before("connect", None)
        inner = await self.inner.connect(options)
        conn = FaultConnection(self, inner)
        self._live[conn] = None
        return conn
