"""A throwaway PostgreSQL cluster for tests, demos and benchmarks.

:class:`PostgresCluster` runs ``initdb`` into a temporary directory, starts the server on a free
TCP port of 127.0.0.1 (password authentication, SCRAM) plus a unix socket in the same directory
(trust, for the superuser), creates a password-authenticated role and its database, and can
stop, restart (same port) and delete it. When the current user is root the server runs as the
unprivileged ``postgres`` OS user (PostgreSQL refuses to run as root).

:class:`Admin` is a plain synchronous psycopg connection for out-of-band checks
(``pg_stat_activity``) and fault injection (``pg_terminate_backend``).

Reuse::

    from tests.postgres.cluster import running_cluster
    with running_cluster() as cluster:
        print(cluster.dsn)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import trio

__all__ = [
    "INSTALL_HINT",
    "Admin",
    "PostgresCluster",
    "ServerInfo",
    "find_bindir",
    "free_port",
    "running_cluster",
]

INSTALL_HINT = (
    "the PostgreSQL test suite needs a PostgreSQL server: install the server binaries "
    "(Debian/Ubuntu: `apt-get install postgresql`, which provides "
    "/usr/lib/postgresql/<version>/bin/initdb and pg_ctl; or put initdb/pg_ctl on PATH), "
    "or point TCS_POSTGRES_DSN at an existing server, e.g. "
    "TCS_POSTGRES_DSN=postgresql://user:password@127.0.0.1:5432/dbname"
)

TEST_USER = "tcs_user"
TEST_PASSWORD = "tcs-Secret-7f3a9c"
TEST_DATABASE = "tcs_test"


def find_bindir() -> Path | None:
    """Directory holding ``initdb`` and ``pg_ctl``: $PG_BINDIR, PATH, then Debian's layout."""
    candidates: list[Path] = []
    if env := os.environ.get("PG_BINDIR"):
        candidates.append(Path(env))
    if found := shutil.which("pg_ctl"):
        candidates.append(Path(found).resolve().parent)
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
        reverse=True,
    )
    candidates += [Path(p) for p in versions]
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def free_port() -> int:
    """A TCP port of 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ServerInfo:
    """Where the tests connect: ``dsn`` (the test role, password over TCP), ``admin_dsn``
    (a role allowed to read pg_stat_activity and terminate the test role's backends), and the
    cluster when the suite started one (None with TCS_POSTGRES_DSN)."""

    dsn: str
    admin_dsn: str
    cluster: PostgresCluster | None
    password: str | None


class PostgresCluster:
    """One PostgreSQL cluster in a temporary directory, owned by an unprivileged user."""

    def __init__(self, bindir: Path | None = None, *, port: int | None = None) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise RuntimeError(INSTALL_HINT)
        self.bindir = found
        self.port = port or free_port()
        self.base = Path(tempfile.mkdtemp(prefix="tcs-pg-"))
        self.datadir = self.base / "data"
        self.sockdir = self.base  # short path: unix socket paths are limited to ~100 bytes
        self.logfile = self.base / "server.log"
        self.user = TEST_USER
        self.password = TEST_PASSWORD
        self.database = TEST_DATABASE
        self._run_as: str | None = "postgres" if os.geteuid() == 0 else None
        self.running = False
        if self._run_as is not None:
            entry = pwd.getpwnam(self._run_as)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        os.chmod(self.base, 0o755)

    # -- addresses

    @property
    def dsn(self) -> str:
        """The test role over TCP with its password (a URL, as applications would use)."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    @property
    def admin_dsn(self) -> str:
        """The superuser over the unix socket (trust)."""
        return f"host={self.sockdir} port={self.port} user=postgres dbname=postgres"

    def info(self) -> ServerInfo:
        """This cluster as a :class:`ServerInfo`."""
        return ServerInfo(self.dsn, self.admin_dsn, self, self.password)

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
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n"
                f"{result.stderr}\n{log[-3000:]}"
            )
        return result

    def init(self) -> None:
        """``initdb`` and configuration (fsync off, TCP on 127.0.0.1, socket in the temp dir)."""
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
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "password_encryption": "'scram-sha-256'",
            "log_min_messages": "warning",
            "lc_messages": "'C'",
        }
        conf = self.datadir / "postgresql.conf"
        with open(conf, "a") as fh:
            fh.write("\n# trio-connection-supervisor test cluster\n")
            for key, value in settings.items():
                fh.write(f"{key} = {value}\n")

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it accepts connections (same port every time)."""
        self._cmd(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-w",
                "-t",
                str(int(timeout)),
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

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode>`` (smart, fast or immediate)."""
        if not self.running:
            return
        self._cmd(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"],
            check=False,
        )
        self.running = False

    def restart(self, mode: str = "fast") -> None:
        """Stop then start on the same port."""
        self.stop(mode)
        self.start()

    def setup_roles(self) -> None:
        """Create the password-authenticated test role and its database."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(
                f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'"  # test constant
            )
            conn.execute(f"CREATE DATABASE {self.database} OWNER {self.user}")
            conn.execute(f"GRANT pg_signal_backend TO {self.user}")

    def destroy(self) -> None:
        """Stop the server (immediately) and delete every file."""
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, size: int = 4000) -> str:
        """The end of the server log (for failure messages)."""
        try:
            return self.logfile.read_text()[-size:]
        except OSError:
            return ""


@contextlib.contextmanager
def running_cluster(bindir: Path | None = None) -> Iterator[PostgresCluster]:
    """A started cluster with the test role, deleted on exit."""
    cluster = PostgresCluster(bindir)
    try:
        cluster.init()
        cluster.start()
        cluster.setup_roles()
        yield cluster
    finally:
        cluster.destroy()


class Admin:
    """A separate synchronous psycopg connection for checks and fault injection.

    Sync calls block the Trio loop briefly (a local round trip); the ``a*`` variants run in a
    worker thread.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(dsn, autocommit=True)

    def close(self) -> None:
        """Close the admin connection."""
        self._conn.close()

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run ``sql`` and return its rows ([] for a statement)."""
        if self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True)
        cur = self._conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []

    def value(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        """First column of the first row, or None."""
        rows = self.query(sql, params)
        return rows[0][0] if rows else None

    async def aquery(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """:meth:`query` in a worker thread."""
        return await trio.to_thread.run_sync(self.query, sql, params)

    def state(self, pid: int) -> str | None:
        """``pg_stat_activity.state`` of a backend (None if it does not exist)."""
        return self.value("select state from pg_stat_activity where pid = %s", [pid])  # type: ignore[no-any-return]

    def terminate(self, pid: int) -> bool:
        """``pg_terminate_backend(pid)``."""
        return bool(self.value("select pg_terminate_backend(%s)", [pid]))

    def backends(self, application_name: str | None = None) -> list[tuple[int, str | None]]:
        """(pid, state) of the client backends of the test database, optionally filtered."""
        sql = (
            "select pid, state from pg_stat_activity where backend_type = 'client backend'"
            " and pid <> pg_backend_pid()"
        )
        params: list[Any] = []
        if application_name is not None:
            sql += " and application_name = %s"
            params.append(application_name)
        return [(int(pid), state) for pid, state in self.query(sql, params)]

    async def wait_state(
        self, pid: int, states: Sequence[str | None], timeout: float = 5.0
    ) -> float:
        """Poll until the backend's state is one of ``states``; return the time it took.

        Polls a real external state (the server), with short sleeps: bounded by ``timeout``,
        then AssertionError naming the last state seen.
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
