"""A scripted driver for tests (DBConnection's TestConnection idea). Public.

Every driver operation takes its next result from a per-operation script: a plain value (the
result), an exception instance or class (raised), or an async callable taking the :class:`Call`
(awaited: it may block on an event, assert mid-call, or return the result). With nothing
scripted an operation succeeds with a neutral default, so an unscripted :class:`ScriptedDriver`
is a no-op database, which is what the pool's own tests and benchmarks use.

Every call is recorded in order in :attr:`ScriptedDriver.calls`, so a test can assert the exact
protocol a pool produced (for example that no ``commit`` is ever sent after a nested failure)::

    driver = ScriptedDriver()
    driver.script("commit", DatabaseError("deferred constraint", kind="integrity"))
    async with open_pool(driver, size=1) as pool:
        ...
    assert driver.ops(exclude={"ping"}) == ["connect", "begin", "execute", "commit", ...]

The optional protocol methods are there too: ``execute_many`` and ``reset_session`` are recorded
(and scriptable) operations; ``columns()`` gives the names in :attr:`ScriptedDriver.columns_for`
for the last query (default ``c0``, ``c1``... for the width of its first row), and
``leaves_session_state(query)`` is :attr:`ScriptedDriver.leaves_state` (default: the query
starts with ``SET``, ``RESET``, ``LISTEN``, ``PRAGMA``, ``CREATE TEMP``...). Neither does I/O
and neither is recorded.

The connection tracks a transaction status like a real one (``begin`` -> ``"transaction"``,
``commit`` / ``rollback`` / ``reset`` -> ``"idle"``), honours the kill-safety rule (``close()``
from another task makes an in-flight call raise :class:`ConnectionLost`) and the cancellation
rule (a call cancelled midway leaves status ``"unknown"`` until ``reset()``).
"""

from __future__ import annotations

import inspect
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from actors.driver import (
    ConnectionLost,
    DatabaseError,
    Params,
    Row,
    Status,
    TransactionOptions,
)

__all__ = [
    "Call",
    "ScriptedConnection",
    "ScriptedCursor",
    "ScriptedDriver",
    "Step",
    "blocking",
    "starts_session_state",
]

Step = Any
"""A script entry: a value, an exception (instance or class), or ``async fn(call) -> value``."""

OPERATIONS = frozenset(
    {
        "connect",
        "close",
        "ping",
        "begin",
        "commit",
        "rollback",
        "savepoint",
        "release",
        "rollback_to",
        "execute",
        "execute_many",
        "fetch",
        "open_cursor",
        "prepare",
        "cancel",
        "reset",
        "reset_session",
    }
)

_SESSION_STATE = re.compile(
    r"\s*(?:set|reset|listen|unlisten|prepare|deallocate|discard|load|pragma|attach|detach"
    r"|create\s+temp(?:orary)?)\b",
    re.IGNORECASE,
)


def starts_session_state(query: str) -> bool:
    """The scripted driver's default ``leaves_session_state``: the statement starts with a
    session-changing keyword (``SET``, ``RESET``, ``LISTEN``, ``PREPARE``, ``DISCARD``,
    ``PRAGMA``, ``ATTACH``, ``CREATE TEMP``...)."""
    return _SESSION_STATE.match(query) is not None


def _names(
    columns_for: Mapping[str, Sequence[str]], query: str | None, rows: list[Row]
) -> list[str]:
    if query is not None and query in columns_for:
        return list(columns_for[query])
    return [f"c{i}" for i in range(len(rows[0]))] if rows else []


@dataclass(frozen=True, slots=True)
class Call:
    """One recorded driver call: which connection (``conn``, numbered from 1 in connect order;
    0 for a connect attempt), the operation name and its arguments."""

    conn: int
    op: str
    args: tuple[Any, ...] = ()


class ScriptedDriver:
    """A driver whose every answer comes from a script. See the module docstring.

    ``record=False`` keeps no call log (for benchmarks). ``options`` are the connect options
    handed to ``configure``; a ``password`` key there is treated as a secret. ``columns`` maps
    a query text to the column names its results report (:attr:`columns_for`);
    ``leaves_state`` decides ``leaves_session_state`` (default :func:`starts_session_state`).
    """

    name = "scripted"

    def __init__(
        self,
        script: Mapping[str, Iterable[Step]] | None = None,
        *,
        options: Mapping[str, Any] | None = None,
        record: bool = True,
        columns: Mapping[str, Sequence[str]] | None = None,
        leaves_state: Callable[[str], bool] = starts_session_state,
    ) -> None:
        self._script: dict[str, deque[Step]] = {}
        self.columns_for: dict[str, list[str]] = {q: list(n) for q, n in (columns or {}).items()}
        """Column names by query text, for ``columns()`` (shared by the connections, unless a
        connection is given its own ``columns_for``)."""
        self.leaves_state = leaves_state
        """What ``leaves_session_state(query)`` answers on every connection."""
        self._options = dict(options or {})
        self.record = record
        self.calls: list[Call] = []
        self.connections: list[ScriptedConnection] = []
        self.connect_options: list[Mapping[str, Any]] = []
        for op, steps in (script or {}).items():
            self.script(op, *steps)

    def __repr__(self) -> str:
        return f"<ScriptedDriver connections={len(self.connections)} calls={len(self.calls)}>"

    @property
    def options(self) -> Mapping[str, Any]:
        """Default connect options (a copy is passed to every connect)."""
        return self._options

    def secrets(self, options: Mapping[str, Any]) -> list[str]:
        """The ``password`` option, if any."""
        password = options.get("password")
        return [str(password)] if password else []

    def script(self, op: str, *steps: Step) -> None:
        """Append steps to ``op``'s script; each call of ``op`` consumes one."""
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}; known: {', '.join(sorted(OPERATIONS))}")
        self._script.setdefault(op, deque()).extend(steps)

    def pending(self, op: str) -> int:
        """How many scripted steps of ``op`` are still unused."""
        return len(self._script.get(op, ()))

    def ops(self, conn: int | None = None, *, exclude: Iterable[str] = ()) -> list[str]:
        """The recorded operation names in order, for one connection or all."""
        skip = set(exclude)
        return [
            c.op for c in self.calls if (conn is None or c.conn == conn) and c.op not in skip
        ]

    @property
    def live(self) -> list[ScriptedConnection]:
        """Connections not closed yet."""
        return [c for c in self.connections if not c.closed]

    async def _step(self, call: Call, default: Any) -> Any:
        if self.record:
            self.calls.append(call)
        steps = self._script.get(call.op)
        if not steps:
            await trio.lowlevel.checkpoint()
            return default
        step = steps.popleft()
        if isinstance(step, BaseException):
            await trio.lowlevel.checkpoint()
            raise step
        if isinstance(step, type) and issubclass(step, BaseException):
            await trio.lowlevel.checkpoint()
            raise step()
        if callable(step):
            result = step(call)
            if inspect.isawaitable(result):
                return await result
            await trio.lowlevel.checkpoint()
            return result
        await trio.lowlevel.checkpoint()
        return step

    async def connect(self, options: Mapping[str, Any]) -> ScriptedConnection:
        """Open a scripted connection (a scripted exception makes the attempt fail)."""
        self.connect_options.append(dict(options))
        await self._step(Call(0, "connect", ()), None)
        conn = ScriptedConnection(self, len(self.connections) + 1)
        self.connections.append(conn)
        return conn


class ScriptedCursor:
    """A cursor over scripted rows, handed out in batches."""

    def __init__(
        self, conn: ScriptedConnection, rows: list[Row], batch_size: int, query: str | None = None
    ) -> None:
        self._conn = conn
        self._rows = rows
        self._pos = 0
        self._batch = batch_size
        self._query = query
        self.closed = False

    def columns(self) -> list[str]:
        """The names of this result: the connection's ``columns_for[query]``, else ``c0``,
        ``c1``... for the width of its first row (no I/O, not recorded)."""
        return _names(self._conn.columns_for, self._query, self._rows)

    async def fetch_batch(self) -> list[Row]:
        """The next ``batch_size`` rows."""
        self._conn._check()
        await trio.lowlevel.checkpoint()
        batch = self._rows[self._pos : self._pos + self._batch]
        self._pos += len(batch)
        return batch

    async def close(self) -> None:
        """Close the cursor."""
        self.closed = True
        await trio.lowlevel.checkpoint()


class ScriptedConnection:
    """A connection of a :class:`ScriptedDriver`; ``id`` numbers connections from 1."""

    def __init__(self, driver: ScriptedDriver, id: int) -> None:
        self.driver = driver
        self.id = id
        self.closed = False
        self._status: Status = "idle"
        self._scope: trio.CancelScope | None = None
        self.forced_status: Status | None = None
        self.columns_for: dict[str, list[str]] = driver.columns_for
        """Column names by query text for this connection (the driver's, unless replaced)."""
        self._last: tuple[str, list[Row]] | None = None  # the last fetch, for columns()

    def __repr__(self) -> str:
        return f"<ScriptedConnection #{self.id} {self.status()}{' closed' if self.closed else ''}>"

    def status(self) -> Status:
        """The tracked transaction status (``forced_status`` overrides it, for tests)."""
        return self.forced_status or self._status

    def _check(self) -> None:
        if self.closed:
            raise ConnectionLost(f"scripted connection #{self.id} is closed")

    async def _run(
        self, op: str, args: tuple[Any, ...], default: Any, after: Status | None = None
    ) -> Any:
        self._check()
        driver = self.driver
        before = self._status
        if not driver._script.get(op):
            # Nothing scripted: a plain checkpoint, no cancel scope needed (hot path).
            if driver.record:
                driver.calls.append(Call(self.id, op, args))
            await trio.lowlevel.checkpoint()
            self._check()
            self._status = before if after is None else after
            return default
        immediate = _is_exception(driver._script[op][0])
        self._status = "unknown"
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                result = await driver._step(Call(self.id, op, args), default)
            except DatabaseError:
                self._status = "error" if before in ("transaction", "error") else before
                raise
            except Exception as exc:
                # A scripted exception is raised before any I/O: the connection is untouched
                # (a real driver refusing bad arguments). From an async step it stays unknown.
                if immediate and not isinstance(exc, ConnectionLost):
                    self._status = before
                raise
            finally:
                self._scope = None
        if scope.cancelled_caught or self.closed:
            raise ConnectionLost(f"scripted connection #{self.id} was closed during {op}")
        self._status = before if after is None else after
        return result

    async def ping(self) -> None:
        """Scripted ``ping``."""
        await self._run("ping", (), None)

    async def execute(self, query: str, params: Params = None) -> int:
        """Scripted ``execute``: default result 0 rows affected."""
        result: int = await self._run("execute", (query, params), 0)
        return result

    async def fetch(self, query: str, params: Params = None) -> list[Row]:
        """Scripted ``fetch``: default result no rows."""
        result: list[Row] = await self._run("fetch", (query, params), [])
        self._last = (query, result)
        return result

    def columns(self) -> list[str]:
        """The names of the last ``fetch``'s result: ``columns_for[query]``, else ``c0``,
        ``c1``... for the width of its first row; ``[]`` before any (no I/O, not recorded)."""
        if self._last is None:
            return []
        return _names(self.columns_for, *self._last)

    def leaves_session_state(self, query: str) -> bool:
        """The driver's :attr:`~ScriptedDriver.leaves_state` (no I/O, not recorded)."""
        return self.driver.leaves_state(query)

    async def execute_many(self, query: str, params_seq: list[Params]) -> int:
        """Scripted ``execute_many``, one recorded call: default result 0 rows affected."""
        result: int = await self._run("execute_many", (query, list(params_seq)), 0)
        return result

    async def reset_session(self) -> None:
        """Scripted ``reset_session`` (the actor's, on an idle connection)."""
        await self._run("reset_session", (), None)

    async def open_cursor(self, query: str, params: Params, batch_size: int) -> ScriptedCursor:
        """Scripted ``open_cursor``: the step's value is the full list of rows."""
        rows: list[Row] = await self._run("open_cursor", (query, params, batch_size), [])
        return ScriptedCursor(self, list(rows), batch_size, query)

    async def prepare(self, query: str) -> None:
        """Scripted ``prepare``."""
        await self._run("prepare", (query,), None)

    async def begin(self, options: TransactionOptions) -> None:
        """Scripted ``begin``."""
        await self._run("begin", (options,), None, after="transaction")

    async def commit(self) -> None:
        """Scripted ``commit``; a scripted failure still ends the transaction (as on
        PostgreSQL, a failed COMMIT rolls back)."""
        try:
            await self._run("commit", (), None, after="idle")
        except DatabaseError:
            self._status = "idle"
            raise

    async def rollback(self) -> None:
        """Scripted ``rollback``."""
        await self._run("rollback", (), None, after="idle")

    async def savepoint(self, name: str) -> None:
        """Scripted ``savepoint``."""
        await self._run("savepoint", (name,), None)

    async def release(self, name: str) -> None:
        """Scripted ``release``."""
        await self._run("release", (name,), None)

    async def rollback_to(self, name: str) -> None:
        """Scripted ``rollback_to``: leaves the transaction usable."""
        await self._run("rollback_to", (name,), None, after="transaction")

    async def cancel(self) -> None:
        """Scripted ``cancel`` (works on a busy connection; never fails unless scripted)."""
        await self.driver._step(Call(self.id, "cancel", ()), None)

    async def reset(self) -> None:
        """Scripted ``reset``: back to idle."""
        self._check()
        await self.driver._step(Call(self.id, "reset", ()), None)
        self._check()
        self._status = "idle"

    async def close(self) -> None:
        """Close; an in-flight call fails with ConnectionLost. Idempotent."""
        if self.closed:
            await trio.lowlevel.checkpoint()
            return
        self.closed = True
        if self._scope is not None:
            self._scope.cancel()
        if self.driver.record:
            self.driver.calls.append(Call(self.id, "close", ()))
        await trio.lowlevel.checkpoint()


def _is_exception(step: Step) -> bool:
    return isinstance(step, BaseException) or (
        isinstance(step, type) and issubclass(step, BaseException)
    )


def blocking(event: trio.Event, result: Any = None) -> Callable[[Call], Awaitable[Any]]:
    """A step that blocks until ``event`` is set, then returns ``result``."""

    async def step(call: Call) -> Any:
        await event.wait()
        return result

    return step
