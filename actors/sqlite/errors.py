"""SQLite's errors: result codes, and what each means for the pool.

Why: the connection (statements, the busy retry loop) and the driver (connect) map
:mod:`sqlite3` exceptions the same way, and :func:`classify` is public for other code that
hosts ``sqlite3``.

Rules: SQLite has no SQLSTATE, so ``sqlstate`` is always ``None``. The message carries SQLite's
error name, and the caller raises the result ``from`` the ``sqlite3`` exception.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from actors.driver import ConnectionLost, DatabaseError

__all__ = [
    "BUSY_CODES",
    "BUSY_SLICE",
    "BUSY_SNAPSHOT",
    "SQLITE_CANTOPEN",
    "STATEMENT_ERRORS",
    "classify",
    "primary_code",
]

# Primary result codes (the low byte of an extended code).
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6
_SQLITE_IOERR: Final = 10
_SQLITE_CORRUPT: Final = 11
SQLITE_CANTOPEN: Final = 14
"""SQLite's "unable to open database file" (the driver tells a missing directory apart)."""
_SQLITE_CONSTRAINT: Final = 19
_SQLITE_NOTADB: Final = 26
BUSY_SNAPSHOT: Final = _SQLITE_BUSY | (2 << 8)  # the extended code SQLITE_BUSY_SNAPSHOT
BUSY_SLICE: Final = 0.05
"""Longest SQLite itself waits for a lock per attempt (see SqliteConnection._retry_busy)."""
_LOST_CODES: Final = frozenset({_SQLITE_IOERR, _SQLITE_CORRUPT, SQLITE_CANTOPEN, _SQLITE_NOTADB})
BUSY_CODES: Final = frozenset({_SQLITE_BUSY, _SQLITE_LOCKED})

# Errors a statement can raise that leave the connection usable besides sqlite3's own: bad
# parameter types (OverflowError for huge ints, TypeError / ValueError for unsupported values).
STATEMENT_ERRORS: Final = (sqlite3.Error, sqlite3.Warning, OverflowError, TypeError, ValueError)


def _describe(exc: BaseException) -> str:
    """The exception's message with SQLite's error name appended when there is one."""
    text = str(exc) or type(exc).__name__
    name = getattr(exc, "sqlite_errorname", None)
    return f"{text} [{name}]" if name else text


def primary_code(exc: BaseException) -> int | None:
    """SQLite's primary result code of ``exc`` (the low byte of its extended code), if any."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def classify(exc: BaseException) -> ConnectionLost | DatabaseError:
    """Translate an exception raised by :mod:`sqlite3` into the driver protocol's errors.

    Public so that other code hosting ``sqlite3`` (and the tests) map errors the same way:
    constraint violations are ``kind="integrity"``; busy / locked is ``kind="serialization"`` (the
    pool retries the transaction); disk I/O failure, corruption, a file that cannot be opened or
    is not a database, and a closed connection are :class:`ConnectionLost`; anything else is a
    ``DatabaseError`` with ``kind="other"``. The caller raises the result ``from exc``.
    """
    message = _describe(exc)
    code = primary_code(exc)
    if isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc).lower():
        return ConnectionLost(f"sqlite: {message}")
    if isinstance(exc, sqlite3.IntegrityError) or code == _SQLITE_CONSTRAINT:
        return DatabaseError(message, kind="integrity")
    lowered = str(exc).lower()
    if code in BUSY_CODES or "database is locked" in lowered or "table is locked" in lowered:
        return DatabaseError(message, kind="serialization")
    if code in _LOST_CODES or isinstance(exc, sqlite3.InternalError):
        return ConnectionLost(f"sqlite: {message}")
    return DatabaseError(message, kind="other")
