"""The SQLite driver: paths and URLs, the shared in-memory database, opening connections.

Why: this is all of the :class:`actors.driver.Driver` side. It fixes the ``sqlite3.connect``
options the pool relies on, keeps ``:memory:`` databases shared and alive while the driver
lives, gives each database one in-process write gate, and opens connections in a worker thread
that its caller may abandon.

Rules: the only blocking call here is the open in :meth:`SqliteDriver.connect`, which goes
through :func:`actors.threads.call_in_thread`: a connection that lands after its caller left is
closed. Everything else runs without I/O.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import uuid
import weakref
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import unquote

import trio

from actors.driver import Misconfigured
from actors.sqlite.connection import SqliteConnection
from actors.sqlite.errors import (
    BUSY_SLICE,
    SQLITE_CANTOPEN,
    STATEMENT_ERRORS,
    classify,
    primary_code,
)
from actors.threads import call_in_thread

__all__ = ["SqliteDriver", "from_url"]

# Options the driver sets itself: the pool relies on them.
_RESERVED_KWARGS: Final = frozenset({"isolation_level", "check_same_thread", "database"})

_memory_names = itertools.count()


def _is_memory(path: str, uri: bool) -> bool:
    """Whether ``path`` names an in-memory database (so WAL does not apply)."""
    if path == ":memory:" or path == "":
        return True
    return uri and ("mode=memory" in path or "vfs=memdb" in path)


def _memdb_available() -> bool:
    """The shareable ``memdb`` VFS exists from SQLite 3.36 on."""
    return sqlite3.sqlite_version_info >= (3, 36, 0)


def _shared_memory_uri() -> str:
    """A process-unique URI for a shared in-memory database."""
    tag = f"trio-supervisor-{os.getpid()}-{next(_memory_names)}-{uuid.uuid4().hex[:12]}"
    if _memdb_available():
        # A name starting with "/" is shared by all connections of the process using it.
        return f"file:/{tag}?vfs=memdb"
    return f"file:{tag}?mode=memory&cache=shared"  # pragma: no cover - old SQLite only


_gates: weakref.WeakValueDictionary[tuple[trio.lowlevel.TrioToken, str], trio.Semaphore] = (
    weakref.WeakValueDictionary()
)


def _write_gate(path: str, uri: bool) -> trio.Semaphore:
    """The write gate shared by every connection of this Trio run to the database ``path``
    (see :meth:`SqliteConnection._acquire_gate`); it lives as long as a connection uses it."""
    name = path if uri or _is_memory(path, uri) else os.path.realpath(path)
    key = (trio.lowlevel.current_trio_token(), name)
    gate = _gates.get(key)
    if gate is None:
        gate = trio.Semaphore(1, max_value=1)
        _gates[key] = gate
    return gate


class SqliteDriver:
    """Connections to one SQLite database; implements :class:`actors.driver.Driver`.

    ``path`` is a file name, ``":memory:"`` (a database shared by all connections of this
    driver, see the module docstring) or, with ``uri=True``, an SQLite URI. ``timeout`` is the
    busy timeout in seconds: how long a statement waits for another connection's lock before
    failing with a ``kind="serialization"`` error. ``wal`` switches file databases to WAL
    journaling. ``setup``, if given, is called with each new ``sqlite3.Connection`` in the worker
    thread before first use (register functions, collations, extra pragmas). Other keyword
    arguments go to :func:`sqlite3.connect` (``isolation_level`` and ``check_same_thread`` are
    fixed by the driver).
    """

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 5.0,
        wal: bool = True,
        setup: Callable[[sqlite3.Connection], None] | None = None,
        **connect_kwargs: Any,
    ) -> None:
        bad = _RESERVED_KWARGS & connect_kwargs.keys()
        if bad:
            raise ValueError(
                f"SqliteDriver: {', '.join(sorted(bad))} cannot be set: the driver opens "
                "connections in autocommit mode for use from worker threads"
            )
        if not timeout >= 0:
            raise ValueError(f"SqliteDriver: timeout must be >= 0 seconds, got {timeout!r}")
        text = os.fspath(path)
        uri = bool(connect_kwargs.pop("uri", False))
        self._display = text
        self._anchor: sqlite3.Connection | None = None
        self._finalizer: weakref.finalize[[], SqliteDriver] | None = None
        if text in (":memory:", ""):
            text, uri = _shared_memory_uri(), True
            anchor = sqlite3.connect(text, uri=True, check_same_thread=False)
            self._anchor = anchor
            # Keep the shared database alive exactly as long as the driver.
            self._finalizer = weakref.finalize(self, anchor.close)
        self._setup = setup
        self._options: dict[str, Any] = {
            "path": text,
            "timeout": float(timeout),
            "wal": bool(wal),
            "uri": uri,
            **connect_kwargs,
        }

    def __repr__(self) -> str:
        extra = " shared" if self._anchor is not None else ""
        return (
            f"SqliteDriver({self._display!r}{extra}, timeout={self._options['timeout']}, "
            f"wal={self._options['wal']})"
        )

    @property
    def options(self) -> Mapping[str, Any]:
        """Default connect options: ``path``, ``timeout``, ``wal``, ``uri`` and any extra
        ``sqlite3.connect`` keyword arguments (read-only view)."""
        return MappingProxyType(self._options)

    @property
    def path(self) -> str:
        """The database as given (``":memory:"`` for the shared in-memory database)."""
        return self._display

    @property
    def is_memory(self) -> bool:
        """True for an in-memory database (no WAL, gone when the driver is closed)."""
        return _is_memory(str(self._options["path"]), bool(self._options["uri"]))

    def secrets(self, options: Mapping[str, Any]) -> list[str]:
        """SQLite has no credentials."""
        return []

    def close(self) -> None:
        """Release the shared in-memory database's anchor (the database is dropped once the
        last connection closes). Not needed for files; also done when the driver is collected."""
        if self._finalizer is not None:
            self._finalizer()

    async def connect(self, options: Mapping[str, Any]) -> SqliteConnection:
        """Open a connection in a worker thread and apply the pragmas.

        A file whose directory does not exist, or a path that is a directory, is
        :class:`~actors.driver.Misconfigured` (the pool fails at once, naming the resolved
        path); another file that cannot be opened is :class:`ConnectionLost` (the actor retries
        with backoff); other refusals, such as a file that is not a database, are mapped by
        :func:`classify`. If the caller is cancelled the thread closes what it opened.
        """
        opts = dict(options)
        path = str(opts.pop("path"))
        timeout = float(opts.pop("timeout", 5.0))
        wal = bool(opts.pop("wal", True))
        uri = bool(opts.pop("uri", False))
        for key in _RESERVED_KWARGS:
            opts.pop(key, None)
        memory = _is_memory(path, uri)
        label = repr(self._display if path == self._options["path"] else path)
        setup = self._setup

        def open_() -> sqlite3.Connection:
            try:
                raw: sqlite3.Connection = sqlite3.connect(
                    path,
                    timeout=min(timeout, BUSY_SLICE),
                    uri=uri,
                    check_same_thread=False,
                    isolation_level=None,
                    **opts,
                )
            except sqlite3.Error as exc:
                if not (uri or memory):
                    _diagnose_open_failure(exc, path)
                raise
            try:
                raw.execute("PRAGMA foreign_keys = ON")
                if wal and not memory:
                    raw.execute("PRAGMA journal_mode = WAL").fetchall()
                if setup is not None:
                    setup(raw)
            except BaseException:
                raw.close()
                raise
            return raw

        try:
            # Opened just as we were cancelled: nobody will ever use it, close it.
            raw = await call_in_thread(open_, late=lambda orphan: orphan.close())
        except STATEMENT_ERRORS as exc:
            raise classify(exc) from exc
        return SqliteConnection(raw, label, busy_timeout=timeout, gate=_write_gate(path, uri))


def _diagnose_open_failure(exc: sqlite3.Error, path: str) -> None:
    """Raise :class:`Misconfigured` when SQLite could not open the file ``path`` for a reason
    retrying cannot fix: ``path`` is a directory, or its directory does not exist. The message
    names the resolved absolute path. Runs in the worker thread (it stats the file system)."""
    if primary_code(exc) != SQLITE_CANTOPEN:
        return
    resolved = os.path.abspath(path)
    parent = os.path.dirname(resolved)
    if os.path.isdir(resolved):
        why = "that path is a directory"
    elif not os.path.isdir(parent):
        why = f"directory {parent!r} does not exist"
    else:
        return
    raise Misconfigured(f"sqlite: cannot open database file {resolved!r}: {why}") from exc


def from_url(url: str) -> SqliteDriver:
    """Build a driver from a URL: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``
    or ``sqlite://:memory:`` (shared in-memory database).

    A query string may set ``timeout`` (seconds) and ``wal`` (``on``/``off``), e.g.
    ``sqlite:///app.db?timeout=1&wal=off``. The path is percent-decoded. Raises ValueError for
    anything else.
    """
    hint = "expected sqlite:///relative.db, sqlite:////absolute/path.db or sqlite://:memory:"
    prefix = "sqlite://"
    if not url.lower().startswith(prefix):
        raise ValueError(f"not an SQLite URL ({hint})")
    rest = url[len(prefix) :]
    rest, _, query = rest.partition("?")
    kwargs: dict[str, Any] = {}
    if query:
        for item in query.split("&"):
            key, sep, value = item.partition("=")
            if not sep or not value:
                raise ValueError(f"SQLite URL: malformed query parameter {item!r}")
            if key == "timeout":
                try:
                    kwargs["timeout"] = float(value)
                except ValueError:
                    raise ValueError(
                        f"SQLite URL: timeout must be a number of seconds, got {value!r}"
                    ) from None
            elif key == "wal":
                flag = value.lower()
                if flag not in ("on", "off", "1", "0", "true", "false", "yes", "no"):
                    raise ValueError(f"SQLite URL: wal must be on or off, got {value!r}")
                kwargs["wal"] = flag in ("on", "1", "true", "yes")
            else:
                raise ValueError(f"SQLite URL: unknown parameter {key!r} (known: timeout, wal)")
    if rest in (":memory:", "/:memory:"):
        return SqliteDriver(":memory:", **kwargs)
    if not rest.startswith("/"):
        raise ValueError(f"SQLite URL has a host part or no path ({hint})")
    path = unquote(rest[1:])
    if not path or path.endswith("/"):
        raise ValueError(f"SQLite URL names no database file ({hint})")
    return SqliteDriver(path, **kwargs)
