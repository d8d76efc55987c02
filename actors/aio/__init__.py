"""asyncio PostgreSQL drivers hosted through trio-asyncio: asyncpg and psycopg's AsyncConnection.

:class:`AsyncpgDriver` (placeholders ``$1``) and :class:`AsyncPsycopgDriver` (placeholders
``%s``) implement the :mod:`actors.driver` protocol, so ``open_pool(AsyncpgDriver(dsn))`` gives
the same handles, errors and guarantees as the Trio-native :class:`actors.psycopg.PsycopgDriver`
(which is faster: every call here crosses into asyncio and back). :func:`from_url` takes
``postgresql+asyncpg://`` URLs.

Which asyncio loop (the rule):

* If ``connect()`` runs inside ``trio_asyncio.open_loop()`` (open the pool inside it and its
  actor tasks inherit it), the connection lives on that running loop, which stays yours.
* Otherwise the driver runs its own trio-asyncio loop in a Trio system task, started by the
  first connect and stopped when its last connection closes: when a pool closes its
  connections, nothing of asyncio is left, whether you or ``open_pool`` own the driver.
  ``driver.close()`` (called by ``open_pool`` for a driver it built from a URL) closes any
  connection still open and waits for that loop to end. The loop belongs to one ``trio.run``.

Cancellation: a Trio task cancelled mid-call is released at once; the asyncio task under it is
cancelled, and the library sends the server-side cancel and drains by itself (asyncpg from a
separate connection, psycopg with libpq's cancel). Until :meth:`reset` has waited for that
task, ``status()`` is ``"unknown"``. ``close()`` under a call in flight fails it at once with
:class:`~actors.driver.ConnectionLost` and aborts the socket.

Errors: the server's errors are :class:`~actors.driver.DatabaseError` with ``.sqlstate`` and
``kind`` (``"integrity"`` for 23xxx, ``"serialization"`` for 40001 / 40P01), raised from the
library's exception; a dead or terminated session (class 08, 57P01-57P03, a closed socket) is
:class:`~actors.driver.ConnectionLost`. No exception group escapes.

Layout: :mod:`actors.aio.loop` (the loop host and the Trio-to-asyncio crossing),
:mod:`actors.aio.base` (the call discipline, recovery, close, SQL helpers),
:mod:`actors.aio.asyncpg`, :mod:`actors.aio.psycopg`. asyncpg and trio-asyncio are imported
only when a driver is used (``pip install trio-connection-supervisor[asyncpg]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actors.aio.asyncpg import AsyncpgConnection, AsyncpgCursor, AsyncpgDriver
    from actors.aio.psycopg import AsyncPsycopgConnection, AsyncPsycopgCursor, AsyncPsycopgDriver

__all__ = [
    "AsyncPsycopgConnection",
    "AsyncPsycopgCursor",
    "AsyncPsycopgDriver",
    "AsyncpgConnection",
    "AsyncpgCursor",
    "AsyncpgDriver",
    "from_url",
]

_ASYNCPG = ("AsyncpgConnection", "AsyncpgCursor", "AsyncpgDriver")
_PSYCOPG = ("AsyncPsycopgConnection", "AsyncPsycopgCursor", "AsyncPsycopgDriver")


def from_url(url: str, **options: Any) -> AsyncpgDriver:
    """An :class:`AsyncpgDriver` for a ``postgresql+asyncpg://`` URL (ValueError otherwise)."""
    from actors.aio.asyncpg import from_url as asyncpg_from_url

    return asyncpg_from_url(url, **options)


def __getattr__(name: str) -> Any:
    # Lazy: importing actors.aio must not require asyncpg when only psycopg is used.
    if name in _ASYNCPG:
        import actors.aio.asyncpg as module
    elif name in _PSYCOPG:
        import actors.aio.psycopg as module  # type: ignore[no-redef]
    else:
        raise AttributeError(f"module 'actors.aio' has no attribute {name!r}")
    return getattr(module, name)
