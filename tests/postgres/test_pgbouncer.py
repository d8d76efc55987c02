"""Through a real PgBouncer in transaction pooling mode (the Debian package, 1.18 here: no
protocol-level prepared statements): statements work, unprepared, with the driver's
``prepare_threshold=None``; transactions and one-shots keep their meaning.

The bouncer is a process this module starts on a free port of 127.0.0.1 in front of the
suite's server (as the ``postgres`` user when run as root: PgBouncer refuses root), and stops.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from actors.psycopg import PsycopgDriver
from supervisor import open_pool
from supervisor.rows import dict_row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary() -> str | None:
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )


@pytest.fixture(scope="module")
def bouncer_dsn(pg_server: object) -> Iterator[str]:
    binary = _binary()
    if binary is None:
        pytest.fail("pgbouncer is not installed: run tests/setup.sh", pytrace=False)
    dsn = str(pg_server.dsn)  # type: ignore[attr-defined]
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres") or parts.hostname is None:
        pytest.skip("needs a URL DSN with a TCP host for the bouncer to connect to")
    user, password = parts.username or "", parts.password or ""
    database = parts.path.lstrip("/")
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="tcs-pgbouncer-"))
    os.chmod(workdir, 0o755)
    (workdir / "users.txt").write_text(f'"{user}" "{password}"\n', encoding="utf-8")
    (workdir / "pgbouncer.ini").write_text(
        f"[databases]\n{database} = host={parts.hostname} port={parts.port} dbname={database}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {workdir}/users.txt\n"
        "pool_mode = transaction\nmax_client_conn = 50\ndefault_pool_size = 4\n"
        f"logfile = {workdir}/pgbouncer.log\npidfile = {workdir}/pgbouncer.pid\n",
        encoding="utf-8",
    )
    command = [binary, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        for child in workdir.iterdir():
            os.chown(child, entry.pw_uid, entry.pw_gid)
        os.chown(workdir, entry.pw_uid, entry.pw_gid)
        command[1:1] = ["-u", "postgres"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:  # bounded: until it accepts or 15 s
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = (workdir / "pgbouncer.log")
                    raise RuntimeError(
                        "pgbouncer did not start: "
                        + (log.read_text() if log.exists() else str(process.stderr))
                    ) from None
                time.sleep(0.05)
        yield f"postgresql://{quote(user)}:{quote(password)}@127.0.0.1:{port}/{database}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


async def test_statements_work_through_pgbouncer_unprepared(bouncer_dsn: str) -> None:
    driver = PsycopgDriver(bouncer_dsn, prepare_threshold=None)
    async with open_pool(driver, size=3, row_factory=dict_row, reset="never") as pool:
        stmt = pool.statement("select %s::int * 2 as doubled")
        for i in range(20):  # past psycopg's usual prepare threshold
            assert await stmt.fetch_one((i,)) == {"doubled": 2 * i}
        async with pool.transaction() as tx:
            assert await tx.fetch_val(stmt, (21,)) == 42
            assert await tx.fetch_val("select count(*) from pg_prepared_statements") == 0
        assert await pool.fetch_val("select 1") == 1


async def test_a_url_can_turn_preparing_off_for_the_bouncer(bouncer_dsn: str) -> None:
    url = bouncer_dsn + "?prepare_threshold="
    async with open_pool(url, size=2, reset="never") as pool:
        stmt = pool.statement("select %s::text")
        for i in range(10):
            assert await stmt.fetch_val((str(i),)) == str(i)
