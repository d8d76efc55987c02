"""The exception hierarchy. Every message names the pool it comes from.

Everything a client can see derives from :class:`PoolError`, except :class:`Rollback`, which is a
``BaseException`` so that ``except Exception`` in user code cannot swallow it on its way to the
transaction block that owns it.
"""

from __future__ import annotations

from typing import Any

from actors import driver as _driver

__all__ = [
    "CardinalityError",
    "CheckoutTimeout",
    "ConfigError",
    "ConnectionLost",
    "IntegrityError",
    "PoolClosed",
    "PoolError",
    "QueryError",
    "QueryTimeout",
    "QueueDropped",
    "Rollback",
    "SerializationFailure",
    "TransactionFailed",
]


class PoolError(Exception):
    """Base of every error raised by a pool or its handles; also raised for handle misuse
    (a handle used after its block ended, or by two tasks at once)."""

    def __init__(self, message: str, *, pool: str | None = None) -> None:
        if pool is not None and not message.startswith(f"pool {pool!r}"):
            message = f"pool {pool!r}: {message}"
        super().__init__(message)
        self.pool = pool


class ConfigError(PoolError, ValueError):
    """An option passed to ``open_pool`` (or a handle method) is invalid. Nothing was started."""


class PoolClosed(PoolError):
    """The pool is closing or closed, or failed after too many actor crashes."""


class CheckoutTimeout(PoolError, TimeoutError):
    """No connection became available within the checkout timeout."""


class QueueDropped(PoolError):
    """The request was shed by the queue: ``queue=False`` with no idle connection, the waiting
    queue was full (``max_waiting``), or the pool was overloaded (CoDel shedding)."""


class QueryTimeout(PoolError, TimeoutError):
    """A statement ran longer than ``SafetyLimits.query_timeout``; it was cancelled on the
    server and the connection recovered."""


class ConnectionLost(PoolError, _driver.ConnectionLost):
    """The connection died, or the lease was revoked (hold timeout, ``kill()``), mid-request.

    The actor replaces the connection; the work done in an open transaction is lost (never
    committed). Also an ``actors.driver.ConnectionLost``.
    """


class TransactionFailed(PoolError):
    """The transaction was marked failed (a nested block raised or rolled back, or the database
    put it in an error state); it can only be rolled back, and nothing of it was committed.
    When the transaction's connection is gone, :class:`ConnectionLost` is raised instead."""


class QueryError(PoolError):
    """The database reported an error for one statement; the connection stays usable.

    ``sqlstate`` is the SQLSTATE code when the database has one; ``query`` is the statement text
    (parameters are never included). The driver's own exception is the ``__cause__``.
    """

    def __init__(
        self,
        message: str,
        *,
        pool: str | None = None,
        sqlstate: str | None = None,
        query: str | None = None,
    ) -> None:
        super().__init__(message, pool=pool)
        self.sqlstate = sqlstate
        self.query = query


class IntegrityError(QueryError):
    """A constraint was violated (SQLSTATE class 23)."""


class SerializationFailure(QueryError):
    """A concurrent transaction won (SQLSTATE 40001 or 40P01, SQLite busy); retrying the whole
    transaction may succeed. ``Pool.run_transaction`` retries it."""


class CardinalityError(PoolError):
    """``fetch_one`` / ``fetch_val`` got a number of rows other than the one expected."""

    def __init__(
        self, message: str, *, pool: str | None = None, query: str, expected: str, actual: int
    ) -> None:
        super().__init__(message, pool=pool)
        self.query = query
        self.expected = expected
        self.actual = actual


class Rollback(BaseException):
    """Raised by ``Transaction.rollback()``; caught by the block that owns that transaction.

    A ``BaseException`` so that ``except Exception`` does not swallow it.
    """

    def __init__(self, reason: Any = None, *, target: object = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.target = target
