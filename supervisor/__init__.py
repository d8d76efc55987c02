"""A Trio connection supervisor: database connections owned by supervised actors.

The public API, and nothing else::

    async with open_pool("sqlite:///app.db", size=4) as pool:
        async with pool.transaction() as tx:
            await tx.execute("update t set x = x + 1")
"""

from importlib.metadata import PackageNotFoundError as _NotInstalled
from importlib.metadata import version as _version

from supervisor.backoff import Backoff
from supervisor.errors import (
    CardinalityError,
    CheckoutTimeout,
    ConfigError,
    ConnectionLost,
    IntegrityError,
    PoolClosed,
    PoolError,
    QueryError,
    QueryTimeout,
    QueueDropped,
    Rollback,
    SerializationFailure,
    TransactionFailed,
)
from supervisor.handles import Connection, PreparedStatement, Stream, Transaction
from supervisor.limits import SafetyLimits
from supervisor.log import LogEntry
from supervisor.pool import Pool, PoolContext, PoolStatistics, open_pool
from supervisor.statements import Statement

__all__ = [
    "Backoff",
    "CardinalityError",
    "CheckoutTimeout",
    "ConfigError",
    "Connection",
    "ConnectionLost",
    "IntegrityError",
    "LogEntry",
    "Pool",
    "PoolClosed",
    "PoolContext",
    "PoolError",
    "PoolStatistics",
    "PreparedStatement",
    "QueryError",
    "QueryTimeout",
    "QueueDropped",
    "Rollback",
    "SafetyLimits",
    "SerializationFailure",
    "Statement",
    "Stream",
    "Transaction",
    "TransactionFailed",
    "open_pool",
]

try:
    __version__: str = _version("trio-connection-supervisor")
    """The installed distribution's version (``0+unknown`` when run from a source tree that
    is not installed)."""
except _NotInstalled:  # pragma: no cover - only in an uninstalled checkout
    __version__ = "0+unknown"
del _NotInstalled, _version
