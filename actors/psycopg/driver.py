"""The PostgreSQL driver: options, URLs, secrets, and turning a failed connect into an error.

Why: this is all of the :class:`actors.driver.Driver` side. It validates the options once,
keeps the password out of every repr and message, and opens a backend of the chosen I/O mode
(:func:`actors.psycopg.backends.open_backend`) wrapped in a
:class:`~actors.psycopg.PsycopgConnection`.

Rules: nothing here does I/O except :meth:`PsycopgDriver.connect`. Messages go through
:func:`actors.driver.redact` with every secret known (the options, ``PGPASSWORD``, or the
passwords guessed from a connection string that failed to parse). A connect failure is
:class:`~actors.driver.ConnectionLost` (retry later) unless the server refused, which is a
:class:`~actors.driver.DatabaseError`, or libpq rejected the options themselves (an invalid port
number or ``sslmode``, an unknown option), which is :class:`~actors.driver.Misconfigured`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from actors.driver import ConnectionLost, DatabaseError, Misconfigured, redact
from actors.psycopg.backends import IoMode, open_backend
from actors.psycopg.connection import PsycopgConnection

__all__ = ["PsycopgDriver", "from_url"]

_FALLBACK_APPLICATION_NAME = "trio-connection-supervisor"
_SECRET_KEYS = ("password", "sslpassword")

# Connection failures come from libpq as text only (libpq exposes no SQLSTATE for them): these
# server messages are refusals that retrying cannot fix, reported as DatabaseError.
_CONNECT_REFUSALS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"password authentication failed|no password supplied", re.I), "28P01"),
    (re.compile(r'database ".*" does not exist', re.I), "3D000"),
    (re.compile(r'role ".*" does not exist', re.I), "28000"),
    (re.compile(r"no pg_hba\.conf entry|authentication failed", re.I), "28000"),
    (re.compile(r"permission denied for database", re.I), "42501"),
)


# libpq's (and psycopg's) rejections of the connect options themselves, before any I/O: no
# server state can make them work, so they are Misconfigured (the pool fails at once). psycopg
# 3.3 raises them as OperationalError or ProgrammingError depending on the I/O path.
_INVALID_OPTIONS = re.compile(
    r"invalid connection option|invalid port number|invalid \w+ value"
    r"|invalid integer value .* for connection option|bad value for \w+",
    re.I,
)


def _connect_failure(exc: BaseException, secrets: Sequence[str]) -> Exception:
    """Turn a failed connect into ConnectionLost (retry later), DatabaseError (refused) or
    Misconfigured (the options can never work)."""
    message = redact(str(exc) or type(exc).__name__, secrets).strip()
    if isinstance(exc, psycopg.Error) and _INVALID_OPTIONS.search(message):
        return Misconfigured(f"postgresql: invalid connect options: {message}")
    for pattern, sqlstate in _CONNECT_REFUSALS:
        if pattern.search(message):
            return DatabaseError(message, sqlstate=sqlstate, kind="other")
    return ConnectionLost(f"postgresql: cannot connect: {message}")


def _guess_secrets(conninfo: str) -> list[str]:
    """Passwords in a connection string that failed to parse (to scrub the parse error)."""
    found: list[str] = []
    if "://" in conninfo:
        try:
            password = urlsplit(conninfo).password
        except ValueError:
            password = None
        if password:
            found.append(password)
    for match in re.finditer(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", conninfo):
        value = match.group(1)
        found.append(value)
        found.append(value.strip("'"))
    return found


class PsycopgDriver:
    """The PostgreSQL driver: a factory of :class:`PsycopgConnection` (``actors.driver.Driver``).

    ``conninfo`` is a libpq connection string or URL; ``kwargs`` are libpq parameters that
    override it (``host=``, ``password=``...). ``io`` picks Trio-native I/O or the thread
    fallback (see the module documentation); ``prepare_threshold`` is psycopg's automatic
    preparation threshold (``None`` disables prepared statements, for PgBouncer in transaction
    mode); ``connect_timeout`` bounds each connection attempt in seconds (default: libpq's
    ``connect_timeout`` parameter, else psycopg's 130 s; the pool bounds connects too).
    The repr never shows the password.
    """

    name = "postgresql"

    def __init__(
        self,
        conninfo: str = "",
        *,
        io: IoMode = "trio",
        prepare_threshold: int | None = 5,
        connect_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        if io not in ("trio", "thread"):
            raise ValueError(f"io must be 'trio' or 'thread', got {io!r}")
        if prepare_threshold is not None and (
            isinstance(prepare_threshold, bool)
            or not isinstance(prepare_threshold, int)
            or prepare_threshold < 0
        ):
            raise ValueError(
                f"prepare_threshold must be None or an int >= 0, got {prepare_threshold!r}"
            )
        if connect_timeout is not None and not (
            isinstance(connect_timeout, int | float)
            and not isinstance(connect_timeout, bool)
            and connect_timeout > 0
        ):
            raise ValueError(f"connect_timeout must be > 0 or None, got {connect_timeout!r}")
        try:
            options = conninfo_to_dict(conninfo, **kwargs)
        except psycopg.Error as exc:
            secrets = _guess_secrets(conninfo) + [
                str(kwargs[k]) for k in _SECRET_KEYS if kwargs.get(k)
            ]
            raise ValueError(
                f"invalid PostgreSQL connection string: {redact(str(exc), secrets)}"
            ) from None
        self._options: dict[str, Any] = dict(options)
        self.io: IoMode = io
        """``"trio"`` (native) or ``"thread"`` (fallback)."""
        self.prepare_threshold = prepare_threshold
        """psycopg's auto-prepare threshold for new connections (None: never prepare)."""
        self.connect_timeout = connect_timeout
        """Bound of each connection attempt in seconds (None: from the connection string)."""

    @property
    def options(self) -> dict[str, Any]:
        """The libpq connection parameters (a fresh copy; may contain the password)."""
        return dict(self._options)

    def secrets(self, options: Mapping[str, Any]) -> list[str]:
        """The password(s) in ``options`` (and ``PGPASSWORD``), to scrub from messages."""
        found = [str(options[key]) for key in _SECRET_KEYS if options.get(key)]
        env = os.environ.get("PGPASSWORD")
        if env and "password" not in options:
            found.append(env)
        return found

    def __repr__(self) -> str:
        shown = " ".join(
            f"{key}={'***' if key in _SECRET_KEYS else value}"
            for key, value in self._options.items()
        )
        return (
            f"PsycopgDriver({shown!r}, io={self.io!r}, "
            f"prepare_threshold={self.prepare_threshold!r})"
        )

    async def connect(self, options: Mapping[str, Any]) -> PsycopgConnection:
        """Open a connection with ``options`` (libpq parameters, e.g. ``self.options``).

        Raises ConnectionLost when the server cannot be reached (or is starting up, shutting
        down, out of connection slots) and DatabaseError with SQLSTATE 28P01 / 28000 / 3D000
        when it refuses (bad password, unknown role, unknown database). Options libpq rejects
        (invalid port number or ``sslmode``, an unknown option) raise Misconfigured. Messages
        never contain the password.
        """
        params = {k: v for k, v in options.items() if v is not None}
        if "application_name" not in params and "fallback_application_name" not in params:
            params["fallback_application_name"] = _FALLBACK_APPLICATION_NAME
        secrets = self.secrets(options)
        try:
            backend = await open_backend(
                self.io, params, self.connect_timeout, self.prepare_threshold
            )
        except psycopg.Error as exc:
            raise _connect_failure(exc, secrets) from None
        except OSError as exc:
            raise _connect_failure(exc, secrets) from None
        return PsycopgConnection(backend, secrets, self.io)


_DRIVER_QUERY_KEYS = ("io", "prepare_threshold")


def from_url(url: str, **kwargs: Any) -> PsycopgDriver:
    """A :class:`PsycopgDriver` for a ``postgresql://`` or ``postgres://`` URL.

    The URL is libpq's (user, password, hosts, port, database, query parameters). Two extra
    query parameters set driver options: ``io=trio|thread`` and
    ``prepare_threshold=<n>|none``. ``kwargs`` go to :class:`PsycopgDriver`. Raises ValueError
    (without echoing the URL, which may hold a password) for another scheme or a bad URL.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(
            f"not a PostgreSQL URL (scheme {scheme or '(none)'!r}); "
            "use postgresql:// or postgres://"
        )
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"invalid PostgreSQL URL: {exc}") from None
    query = parse_qsl(parts.query, keep_blank_values=True)
    extra = {k: v for k, v in query if k in _DRIVER_QUERY_KEYS}
    rest = [(k, v) for k, v in query if k not in _DRIVER_QUERY_KEYS]
    if extra:
        url = urlunsplit(parts._replace(query=urlencode(rest, quote_via=quote)))
    options: dict[str, Any] = dict(kwargs)
    if "io" in extra:
        options.setdefault("io", extra["io"])
    if "prepare_threshold" in extra:
        raw = extra["prepare_threshold"].strip().lower()
        if raw in ("none", "null", ""):
            options.setdefault("prepare_threshold", None)
        else:
            try:
                options.setdefault("prepare_threshold", int(raw))
            except ValueError:
                raise ValueError(
                    f"prepare_threshold must be an integer or 'none', got {raw!r}"
                ) from None
    return PsycopgDriver(url, **options)
