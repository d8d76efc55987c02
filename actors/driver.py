"""The contract between a database adapter and the actor that owns its connections.

Drivers know nothing of pools. A :class:`Driver` is a factory that turns a mapping of connect
options into a live :class:`Connection`; the actor owns that connection for its whole life and
lends it to one client at a time. The client task performs the I/O itself (DBConnection's
"holder" idea), so every method below is called from the *client's* task, except ``close``,
``cancel`` and ``reset``, which the actor may call from its own task.

Three kinds of failure matter to the pool and are told apart by type:

* :class:`ConnectionLost`: this connection is dead (socket closed, server gone, protocol out of
  sync). The actor throws the connection away and connects a new one (crystal-db's rule).
* :class:`DatabaseError`: the database refused this statement (syntax, constraint,
  serialization). The connection stays usable.
* :class:`Misconfigured` (raised by :meth:`Driver.connect` only): the connect options can never
  work (an invalid port number or ``sslmode``, an unknown option, a database file whose
  directory does not exist). Retrying cannot help: the pool fails at once with the reason.

Any other exception escaping a driver call, with :meth:`Connection.status` ``"unknown"`` after
it, is treated as a driver bug: the client gets the pool's ``ConnectionLost`` (the exception as
its cause), the connection is closed, and its actor crashes, for the supervisor to restart and
count against the restart intensity. With a known status (the driver was between messages:
typically the caller's own parameter adapter raised before the statement was sent) the
exception is the caller's, raised as itself; the connection stays usable.

Checkpoint rule: every ``async`` method is a Trio checkpoint (it checks for cancellation and
yields to the scheduler), as every async function in Trio is; the pool relies on it and does not
add its own scheduling point before a driver call. The check comes first: a caller whose scope
is already cancelled gets ``Cancelled`` before anything is sent to the database.

Cancellation rule: a Trio cancellation may interrupt any ``await`` of a client-side call. The
driver must let the cancelled caller go at once (no blocking cleanup in the caller's task); the
connection may then be mid-protocol. The actor later calls :meth:`Connection.cancel` (stop what
the server is doing) and :meth:`Connection.reset` (drain, roll back, return to idle) from its own
task, under a time bound, and discards the connection if they fail.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "Connection",
    "ConnectionLost",
    "Cursor",
    "DatabaseError",
    "Driver",
    "ErrorKind",
    "Misconfigured",
    "Params",
    "Row",
    "Status",
    "TransactionOptions",
    "redact",
]

Row = tuple[Any, ...]
"""One result row, as a plain tuple."""

Params = Sequence[Any] | Mapping[str, Any] | None
"""Query parameters: a sequence for positional placeholders, a mapping for named ones."""

Status = Literal["idle", "transaction", "error", "unknown"]
"""What the database last reported: outside a transaction, inside one, inside a failed one.
``"unknown"`` means the driver cannot tell (for example mid-protocol after a cancellation)."""

ErrorKind = Literal["integrity", "serialization", "other"]
"""How the pool classifies a :class:`DatabaseError` (which exception the client sees)."""


class ConnectionLost(Exception):
    """This connection is dead; the actor must replace it.

    Raised by a driver for a closed socket, a terminated backend, a protocol error, or any call on
    a connection that was closed. ``supervisor.ConnectionLost`` subclasses it, so code that only
    knows drivers can still catch both.
    """


class DatabaseError(Exception):
    """The database reported an error for one statement; the connection stays usable.

    Drivers raise it ``from`` the database library's own exception, which the pool keeps as the
    ``__cause__`` of the ``QueryError`` the client sees.
    """

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        kind: ErrorKind = "other",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.kind: ErrorKind = kind


class Misconfigured(Exception):
    """The connect options can never work: retrying cannot help.

    Raised by :meth:`Driver.connect` for options the database library rejects before any I/O
    (an invalid port number, an invalid ``sslmode``, an unknown connection option) or a database
    that cannot exist (an SQLite file in a directory that does not exist). The actor does not
    retry: the pool fails at once with this message. A server that is not up yet (connection
    refused) is :class:`ConnectionLost`, not this.
    """


@dataclass(frozen=True, slots=True)
class TransactionOptions:
    """What ``BEGIN`` should ask for.

    ``isolation`` is a level name such as ``"serializable"`` or ``"repeatable read"`` (drivers
    reject names they do not support with :class:`ValueError`); ``mode`` is a driver-specific
    begin mode (SQLite's ``"deferred"``, ``"immediate"``, ``"exclusive"``).
    """

    isolation: str | None = None
    read_only: bool = False
    mode: str | None = None


@runtime_checkable
class Cursor(Protocol):
    """A streaming result: rows arrive in batches so memory stays bounded."""

    async def fetch_batch(self) -> list[Row]:
        """Return the next batch of rows; an empty list means the result is exhausted."""
        ...

    async def close(self) -> None:
        """Release the cursor (server-side resources included). Safe to call twice."""
        ...


@runtime_checkable
class Connection(Protocol):
    """One live database connection, owned by one actor, lent to one client at a time.

    Optional methods (the pool looks them up with ``getattr`` and does without them):

    * ``columns() -> list[str]`` (no I/O): the column names of the last result this
      connection returned (``fetch``), as the database reported them; ``[]`` when it had
      none. Cursors from :meth:`open_cursor` may have their own ``columns()``. Without it,
      rows can only be tuples (``row_factory`` other than ``tuple_row`` raises).
    * ``async execute_many(query, params_seq: list[Params]) -> int``: run one statement per
      parameter set, total rows affected; pipelined where the database allows. Without it the
      pool runs ``execute`` once per set (always inside one transaction).
    * ``leaves_session_state(query) -> bool`` (no I/O): whether running ``query`` may leave
      session state behind for the next lease (``SET``, temporary tables, ``LISTEN``,
      advisory locks, ``PREPARE``, ``WITH HOLD`` cursors, SQLite pragmas and ``ATTACH``...);
      err on the side of True. Used by ``reset="auto"``.
    * ``async reset_session()``: drop every piece of session state a lease may have left
      (PostgreSQL: ``DISCARD ALL``, and forget the driver's own prepared statements, which it
      drops; SQLite: temporary tables, attached databases, changed pragmas). Called by the
      actor only, on an idle connection; raise :class:`ConnectionLost` if it cannot be done.
    """

    def status(self) -> Status:
        """The transaction status the database last reported; no I/O."""
        ...

    async def ping(self) -> None:
        """Prove the connection is alive with a round trip; raise ConnectionLost if not."""
        ...

    async def execute(self, query: str, params: Params = None) -> int:
        """Run a statement; return the number of rows affected (-1 when unknown)."""
        ...

    async def fetch(self, query: str, params: Params = None) -> list[Row]:
        """Run a query and return every row."""
        ...

    async def open_cursor(self, query: str, params: Params, batch_size: int) -> Cursor:
        """Start a streaming query whose rows are fetched ``batch_size`` at a time."""
        ...

    async def prepare(self, query: str) -> None:
        """Prepare ``query`` on this connection so later executions of the same text reuse it.

        A driver without explicit preparation may do nothing (SQLite caches statements).
        """
        ...

    async def begin(self, options: TransactionOptions) -> None:
        """Open a transaction."""
        ...

    async def commit(self) -> None:
        """Commit the open transaction."""
        ...

    async def rollback(self) -> None:
        """Roll back the open transaction."""
        ...

    async def savepoint(self, name: str) -> None:
        """Create a savepoint (``name`` is a plain identifier chosen by the pool)."""
        ...

    async def release(self, name: str) -> None:
        """Release a savepoint, keeping its work."""
        ...

    async def rollback_to(self, name: str) -> None:
        """Roll back to a savepoint, keeping the savepoint and the outer transaction."""
        ...

    async def cancel(self) -> None:
        """Ask the server to stop the statement in flight, out of band.

        Called by the actor after a client was cancelled mid-call. Must not wait for the
        interrupted call to finish; must not raise when nothing is running.
        """
        ...

    async def reset(self) -> None:
        """Bring the connection back to a clean idle state, from any state.

        Finish or drain an interrupted call, close open cursors, roll back an open transaction.
        Raise :class:`ConnectionLost` if that cannot be done.
        """
        ...

    async def close(self) -> None:
        """Close the connection. Idempotent, never raises.

        May be called from the actor's task while a client call is in flight: that call must then
        fail promptly with :class:`ConnectionLost` (kill-safety).
        """
        ...


@runtime_checkable
class Driver(Protocol):
    """A factory of connections to one database.

    ``options`` are the default connect options; the pool may pass a modified copy to
    :meth:`connect` (``configure=`` hook, for credential rotation). ``repr()`` of a driver never
    shows a password.
    """

    name: str
    """Short driver name used in messages, e.g. ``"sqlite"`` or ``"postgresql"``."""

    @property
    def options(self) -> Mapping[str, Any]:
        """Default connect options (may contain secrets: never log them)."""
        ...

    async def connect(self, options: Mapping[str, Any]) -> Connection:
        """Open a new connection. Raise :class:`ConnectionLost` when the database cannot be
        reached (the actor retries with backoff), :class:`DatabaseError` for a refusal it
        reports (bad credentials, unknown database) and :class:`Misconfigured` for options that
        can never work (the pool fails at once, without retrying)."""
        ...

    def secrets(self, options: Mapping[str, Any]) -> list[str]:
        """The secret strings in ``options`` (passwords), so messages can be scrubbed."""
        ...

    # Optional: ``close()`` (sync or async) releasing resources shared by all connections (for
    # example SQLite's shared in-memory database). ``open_pool`` calls it when the pool closes,
    # for a driver it built from a URL; a driver object passed in stays the caller's to close.


def redact(text: str, secrets: Sequence[str]) -> str:
    """Replace every occurrence of each secret in ``text`` with ``***``.

    Used on every message the pool builds from driver errors: database libraries sometimes echo
    the connection string back in their error messages.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text

