"""PostgreSQL through psycopg 3, with Trio-native I/O.

:class:`PsycopgDriver` implements the :mod:`actors.driver` protocol on top of psycopg 3.3.

I/O modes (``io=``):

``"trio"`` (default)
    A subclass of :class:`psycopg.AsyncConnection` whose :meth:`~psycopg.AsyncConnection.wait`
    drives psycopg's non-blocking protocol generators with
    :func:`trio.lowlevel.wait_readable` / :func:`trio.lowlevel.wait_writable` on the libpq
    socket, so every query runs in the calling Trio task with no thread and no asyncio loop.
    Connecting is Trio-native too: the driver splits the connection attempts itself, resolves
    host names with :func:`trio.socket.getaddrinfo` (unix sockets and IP literals need no
    resolution) and polls libpq's non-blocking connect with the same waits. The server-side
    cancel uses libpq's non-blocking cancel connection (``PQcancelStart``/``PQcancelPoll``,
    libpq >= 17) driven the same way.

``"thread"``
    A plain synchronous :class:`psycopg.Connection`; every call runs in a worker thread
    (:class:`actors.threads.ThreadEngine`, abandoned at once when the caller is cancelled). Slower
    (one thread hop per call) but independent of psycopg's internals: the fallback if a psycopg
    release moves the seam the ``"trio"`` mode relies on.

Both modes behave the same, and both put the connection in autocommit mode: the pool sends
``BEGIN`` / ``COMMIT`` / ``ROLLBACK`` / ``SAVEPOINT`` itself through the protocol methods.

Internal seams of psycopg used by the ``"trio"`` mode (pinned by ``psycopg>=3.3,<3.4`` and
checked by ``tests/postgres/test_psycopg_seam.py``): the ``wait(gen, interval, timeout)`` method
every query of :class:`~psycopg.AsyncConnection` goes through; the generator protocol (yield a
``psycopg.waiting.Wait``, receive a ``psycopg.waiting.Ready``); the ``lock`` attribute (an
:class:`asyncio.Lock` that psycopg takes around every operation, replaced by a lock that never
touches asyncio, see :class:`actors.psycopg.seam._ExclusiveLock`);
``psycopg._conninfo_utils.split_attempts`` / ``get_param`` / ``is_ip_address`` (multi-host
connection strings); ``psycopg.errors._WaitTimeout`` (the exception ``wait`` raises on its
``timeout``); and libpq calls through ``psycopg.pq`` objects. All of them are in one module,
:mod:`actors.psycopg.seam`, whose docstring is the complete list.

Cancellation: a client cancelled mid-query is released at once; the connection is left
mid-protocol (libpq transaction status ``ACTIVE``, :meth:`PsycopgConnection.status` reports
``"unknown"``). The actor then calls :meth:`PsycopgConnection.cancel` (server-side cancel,
bounded) and :meth:`PsycopgConnection.reset` (drain the pending results, roll back, back to
``"idle"``) from its own task.

Layout (each module says why it exists and its rules): :mod:`actors.psycopg.seam` (everything
that relies on psycopg internals), :mod:`actors.psycopg.backends` (the ``"trio"`` and
``"thread"`` backends), :mod:`actors.psycopg.connection` (:class:`PsycopgConnection`,
:class:`PsycopgCursor`, error classification) and :mod:`actors.psycopg.driver`
(:class:`PsycopgDriver`, :func:`from_url`). Only the names below are public.
"""

from typing import TypeAlias

import actors.psycopg.backends as _backends
from actors.psycopg.connection import PsycopgConnection, PsycopgCursor
from actors.psycopg.driver import PsycopgDriver, from_url
from actors.psycopg.seam import TrioAsyncConnection

IoMode: TypeAlias = _backends.IoMode
"""How a connection does its I/O: Trio-native (``"trio"``) or in worker threads (``"thread"``)."""

__all__ = [
    "IoMode",
    "PsycopgConnection",
    "PsycopgCursor",
    "PsycopgDriver",
    "TrioAsyncConnection",
    "from_url",
]
