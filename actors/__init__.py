"""The connection side: drivers and the actor task that owns one live connection.

``actors`` never imports ``supervisor``: drivers and actors know nothing of pools.
"""

from actors.driver import (
    Connection,
    ConnectionLost,
    Cursor,
    DatabaseError,
    Driver,
    Misconfigured,
    TransactionOptions,
)

__all__ = [
    "Connection",
    "ConnectionLost",
    "Cursor",
    "DatabaseError",
    "Driver",
    "Misconfigured",
    "TransactionOptions",
]
