"""PostgreSQL servers for tests: a throwaway cluster, or an existing server, and an admin link.

Why: a pool's promises are only worth what they were tested against, and the real test is a
real server. Starting one should take one line and leave nothing behind.

* :class:`PostgresServer` is a server to test against, given by a DSN (an existing server):
  where to connect (:attr:`~PostgresServer.dsn`, :attr:`~PostgresServer.host`,
  :attr:`~PostgresServer.port`, user, password, database) and how to reach it as an
  administrator (:attr:`~PostgresServer.admin_dsn`, :meth:`~PostgresServer.admin`).
* :class:`PostgresCluster` is a :class:`PostgresServer` this process owns: ``initdb`` into a
  temporary directory, the server on a free TCP port of 127.0.0.1 (password authentication,
  SCRAM) and a unix socket in that directory (trust, for the superuser, owner-only), tuned for
  tests (``fsync=off``), with a password-authenticated role owning its own database. It can
  :meth:`~PostgresCluster.stop`, :meth:`~PostgresCluster.start` again on the same port, and
  :meth:`~PostgresCluster.destroy` itself. When the current user is root the server runs as the
  unprivileged ``postgres`` OS user (PostgreSQL refuses to run as root).
* :func:`throwaway_cluster` is the usual way in: a started cluster for a ``with`` block, every
  file deleted on exit.
* :class:`PostgresAdmin` is a separate, plain synchronous psycopg connection for out-of-band
  checks (``pg_stat_activity``) and fault injection (``pg_terminate_backend``).

The pytest plugin (:mod:`supervisor.testing.plugin`) builds its ``postgres_server`` fixture on
these. Outside pytest (a demo, a benchmark)::

    from supervisor.testing.cluster import throwaway_cluster

    with throwaway_cluster() as server:
        trio.run(main, server.dsn)

Everything here is blocking (subprocesses, a synchronous connection): call it outside Trio, or
through ``trio.to_thread.run_sync``. Needs psycopg (the ``testing`` or ``postgresql`` extra) and,
for a cluster, the server binaries (``initdb`` and ``pg_ctl``; see :data:`INSTALL_HINT`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import psycopg
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

__all__ = [
    "DSN_ENV",
    "INSTALL_HINT",
    "PostgresAdmin",
    "PostgresCluster",
    "PostgresServer",
    "find_bindir",
    "free_port",
    "throwaway_cluster",
]

DSN_ENV = "TCS_POSTGRES_DSN"
"""The environment variable naming an existing server to test against (instead of a cluster)."""

INSTALL_HINT = (
    "testing against PostgreSQL needs a PostgreSQL server: install the server binaries "
    "(Debian/Ubuntu: `apt-get install postgresql`, which provides "
    "/usr/lib/postgresql/<version>/bin/initdb and pg_ctl; or put initdb/pg_ctl on PATH, or set "
    "PG_BINDIR), or name an existing server with --postgres-dsn or TCS_POSTGRES_DSN, e.g. "
    "TCS_POSTGRES_DSN=postgresql://user:password@127.0.0.1:5432/dbname"
)
"""What to do when no server binaries are found (the message tests fail with)."""

StopMode = Literal["smart", "fast", "immediate"]

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``: ``$PG_BINDIR``, then ``PATH``, then
    Debian's ``/usr/lib/postgresql/<version>/bin`` (newest version first); None if none has
    both."""
    candidates: list[Path] = []
    if env := os.environ.get("PG_BINDIR"):
        candidates.append(Path(env))
    if found := shutil.which("pg_ctl"):
        candidates.append(Path(found).resolve().parent)

    def version(path: str) -> int:
        name = Path(path).parent.name
        return int(name) if name.isdigit() else 0

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version,
                                           reverse=True)]
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def free_port() -> int:
    """A TCP port of 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """A PostgreSQL server to test against, named by ``dsn`` (a URL or a conninfo string).

    ``admin_dsn`` reaches it as a role allowed to read ``pg_stat_activity`` and terminate the
    test role's backends (default: ``dsn`` itself). The parts of ``dsn`` are attributes:
    :attr:`host` (None when the DSN names none: libpq's default unix socket), :attr:`port`
    (5432 by default), :attr:`user`, :attr:`password`, :attr:`database` (None when absent).
    """

    def __init__(self, dsn: str, *, admin_dsn: str | None = None) -> None:
        if not isinstance(dsn, str) or not dsn:
            raise ValueError(f"dsn must be a non-empty string, not {dsn!r}")
        self._dsn = dsn
        self._admin_dsn = admin_dsn or dsn
        parts = conninfo_to_dict(dsn)
        self._host: str | None = _text(parts.get("host"))
        port = _text(parts.get("port"))
        self._port = int(port) if port else 5432
        self._user: str | None = _text(parts.get("user"))
        self._password: str | None = _text(parts.get("password"))
        self._database: str | None = _text(parts.get("dbname"))

    def __repr__(self) -> str:  # never the password
        return (
            f"<{type(self).__name__} host={self.host!r} port={self.port} user={self.user!r} "
            f"database={self.database!r}>"
        )

    @property
    def dsn(self) -> str:
        """Where the code under test connects (includes the password)."""
        return self._dsn

    @property
    def admin_dsn(self) -> str:
        """Where :meth:`admin` connects."""
        return self._admin_dsn

    @property
    def host(self) -> str | None:
        """The server's host (an address, a name, or a unix socket directory)."""
        return self._host

    @property
    def port(self) -> int:
        """The server's port."""
        return self._port

    @property
    def user(self) -> str | None:
        """The role :attr:`dsn` logs in as."""
        return self._user

    @property
    def password(self) -> str | None:
        """That role's password, when the DSN carries one (to check it never leaks)."""
        return self._password

    @property
    def database(self) -> str | None:
        """The database :attr:`dsn` connects to."""
        return self._database

    def admin(self) -> PostgresAdmin:
        """A new :class:`PostgresAdmin` connection (close it, or use it as a ``with`` block)."""
        return PostgresAdmin(self.admin_dsn)


class PostgresCluster(PostgresServer):
    """A throwaway PostgreSQL cluster in a temporary directory, owned by this process.

    The constructor only makes the directory; :meth:`init`, :meth:`start` and
    :meth:`setup_roles` make it usable (:func:`throwaway_cluster` does all three), and
    :meth:`destroy` removes every trace. ``bindir`` holds ``initdb`` and ``pg_ctl`` (default:
    :func:`find_bindir`); ``port`` defaults to a free one; ``user`` (with a random ``password``
    unless given) owns ``database``. ``settings`` are added to ``postgresql.conf`` (values as
    they are written there: ``{"max_connections": "50", "log_statement": "'all'"}``).
    """

    def __init__(
        self,
        bindir: Path | None = None,
        *,
        port: int | None = None,
        user: str = "tcs_user",
        password: str | None = None,
        database: str = "tcs_test",
        settings: Mapping[str, str] | None = None,
    ) -> None:
        for name, value in (("user", user), ("database", database)):
            if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
                raise ValueError(f"{name} must be a lower-case SQL identifier, not {value!r}")
        found = bindir or find_bindir()
        if found is None:
            raise RuntimeError(INSTALL_HINT)
        run_as = "postgres" if os.geteuid() == 0 else None
        if run_as is not None:
            try:
                entry = pwd.getpwnam(run_as)
            except KeyError:
                raise RuntimeError(
                    "PostgreSQL refuses to run as root, and there is no unprivileged "
                    f"{run_as!r} OS user to run it as: create one (the Debian postgresql "
                    "package does), or run the tests as an ordinary user"
                ) from None
        self.bindir: Path = found
        """The directory of ``initdb`` and ``pg_ctl``."""
        self.base: Path = Path(tempfile.mkdtemp(prefix="tcs-pg-"))
        """The temporary directory holding everything (deleted by :meth:`destroy`)."""
        self.datadir: Path = self.base / "data"
        """The cluster's data directory."""
        self.sockdir: Path = self.base  # short: unix socket paths are limited to ~100 bytes
        """The directory of the server's unix socket."""
        self.logfile: Path = self.base / "server.log"
        """The server's log (see :meth:`log_tail`)."""
        self.settings: dict[str, str] = dict(settings or {})
        self.running = False
        """Whether :meth:`start` ran and :meth:`stop` did not since."""
        self._run_as = run_as
        if run_as is not None:
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        os.chmod(self.base, 0o755)
        the_port = port or free_port()
        the_password = password or secrets.token_hex(16)
        super().__init__(
            f"postgresql://{user}:{quote(the_password, safe='')}@127.0.0.1:{the_port}/{database}",
            admin_dsn=f"host={self.sockdir} port={the_port} user=postgres dbname=postgres",
        )

    def __enter__(self) -> PostgresCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # -- lifecycle

    def _cmd(self, args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._run_as is not None:
            command = ["runuser", "-u", self._run_as, "--", *command]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"},
            cwd=str(self.base),
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n"
                f"{result.stderr}\n{self.log_tail(3000)}"
            )
        return result

    def init(self) -> None:
        """``initdb`` and configuration: TCP on 127.0.0.1 only, the unix socket in the
        temporary directory (owner only), ``fsync`` off, 200 connections, then
        :attr:`settings`."""
        self._cmd(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        settings = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.sockdir}'",
            "unix_socket_permissions": "0700",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "password_encryption": "'scram-sha-256'",
            "log_min_messages": "warning",
            "lc_messages": "'C'",
            **self.settings,
        }
        with open(self.datadir / "postgresql.conf", "a") as fh:
            fh.write("\n# trio-connection-supervisor throwaway cluster\n")
            for key, value in settings.items():
                fh.write(f"{key} = {value}\n")

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it accepts TCP connections (same port every time)."""
        self._cmd(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-w",
                "-t",
                str(max(1, int(timeout))),
                "start",
            ]
        )
        self.running = True
        deadline = time.monotonic() + timeout
        while True:  # pg_ctl -w waits already; make sure TCP is up too
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, mode: StopMode = "fast") -> None:
        """``pg_ctl stop -m <mode>``: ``smart`` waits for clients, ``fast`` disconnects them,
        ``immediate`` kills the server without a shutdown checkpoint. No-op when stopped."""
        if not self.running:
            return
        self._cmd(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"],
            check=False,
        )
        self.running = False

    def restart(self, mode: StopMode = "fast") -> None:
        """:meth:`stop`, then :meth:`start` on the same port."""
        self.stop(mode)
        self.start()

    def setup_roles(self) -> None:
        """Create the password-authenticated role and its database; the role may signal
        (``pg_terminate_backend``) other backends of its own."""
        assert self.user is not None and self.database is not None
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(self.user), sql.Literal(self.password)
                )
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(self.database), sql.Identifier(self.user)
                )
            )
            conn.execute(
                sql.SQL("GRANT pg_signal_backend TO {}").format(sql.Identifier(self.user))
            )

    def destroy(self) -> None:
        """Stop the server (immediately) and delete every file. Safe to call twice."""
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, size: int = 4000) -> str:
        """The last ``size`` characters of the server log (for failure messages)."""
        try:
            return self.logfile.read_text(errors="replace")[-size:]
        except OSError:
            return ""


@contextlib.contextmanager
def throwaway_cluster(
    bindir: Path | None = None,
    *,
    settings: Mapping[str, str] | None = None,
) -> Iterator[PostgresCluster]:
    """A started :class:`PostgresCluster` with its role and database, deleted on exit."""
    cluster = PostgresCluster(bindir, settings=settings)
    try:
        cluster.init()
        cluster.start()
        cluster.setup_roles()
        yield cluster
    finally:
        cluster.destroy()


class PostgresAdmin:
    """A separate synchronous psycopg connection (autocommit) for checks and fault injection.

    The plain methods block the calling thread for a round trip (a local one is short enough
    to call from a Trio test); the ``a*`` methods and :meth:`wait_state` run in a worker
    thread. Reconnects by itself when its connection was closed. A ``with`` block closes it.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(dsn, autocommit=True)

    def __enter__(self) -> PostgresAdmin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the admin connection."""
        self._conn.close()

    def query(self, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run ``query`` (``%s`` placeholders) and return its rows ([] for a statement)."""
        if self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True)
        cur = self._conn.execute(query, params)
        return cur.fetchall() if cur.description is not None else []

    def value(self, query: str, params: Sequence[Any] | None = None) -> Any:
        """The first column of the first row, or None."""
        rows = self.query(query, params)
        return rows[0][0] if rows else None

    async def aquery(
        self, query: str, params: Sequence[Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """:meth:`query` in a worker thread."""
        return await trio.to_thread.run_sync(self.query, query, params)

    def state(self, pid: int) -> str | None:
        """``pg_stat_activity.state`` of a backend (None if there is no such backend)."""
        state = self.value("select state from pg_stat_activity where pid = %s", [pid])
        return None if state is None else str(state)

    def terminate(self, pid: int) -> bool:
        """``pg_terminate_backend(pid)``: whether the backend was signalled."""
        return bool(self.value("select pg_terminate_backend(%s)", [pid]))

    def backends(self, application_name: str | None = None) -> list[tuple[int, str | None]]:
        """(pid, state) of every client backend but this connection's, optionally only those
        with ``application_name``."""
        query = (
            "select pid, state from pg_stat_activity where backend_type = 'client backend'"
            " and pid <> pg_backend_pid()"
        )
        params: list[Any] = []
        if application_name is not None:
            query += " and application_name = %s"
            params.append(application_name)
        return [(int(pid), state) for pid, state in self.query(query, params)]

    async def wait_state(
        self, pid: int, states: Sequence[str | None], timeout: float = 5.0
    ) -> float:
        """Poll until backend ``pid``'s state is one of ``states`` (None: gone); return the
        time it took (Trio's clock).

        It polls a real external state with short sleeps, bounded by ``timeout``; then it
        raises ``AssertionError`` naming the last state seen.
        """
        start = trio.current_time()
        state = None
        while trio.current_time() - start < timeout:
            state = await trio.to_thread.run_sync(self.state, pid)
            if state in states:
                return trio.current_time() - start
            await trio.sleep(0.005)
        raise AssertionError(
            f"backend {pid} did not reach {list(states)} within {timeout}s (last: {state!r})"
        )


def _text(value: object) -> str | None:
    return None if value is None or value == "" else str(value)
