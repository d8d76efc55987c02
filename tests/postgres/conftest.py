"""Fixtures for the real-server PostgreSQL suite.

A session-scoped throwaway cluster (see :mod:`tests.postgres.cluster`) is started once, unless
``TCS_POSTGRES_DSN`` names an existing server. Without server binaries and without that
variable every test of this package FAILS (CI installs the server; a silently skipped suite
would hide a broken driver).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from .cluster import (
    INSTALL_HINT,
    Admin,
    PostgresCluster,
    ServerInfo,
    find_bindir,
    running_cluster,
)

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test in tests/postgres/ gets the ``postgresql`` marker."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.postgresql)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[ServerInfo]:
    """The server the suite talks to: TCS_POSTGRES_DSN, else a cluster started here."""
    dsn = os.environ.get("TCS_POSTGRES_DSN")
    if dsn:
        password = conninfo_to_dict(dsn).get("password")
        yield ServerInfo(
            dsn=dsn, admin_dsn=dsn, cluster=None, password=str(password) if password else None
        )
        return
    bindir = find_bindir()
    if bindir is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    with running_cluster(bindir) as cluster:
        yield cluster.info()


@pytest.fixture
def pg_dsn(pg_server: ServerInfo) -> str:
    """DSN of the password-authenticated test role."""
    return pg_server.dsn


@pytest.fixture
def pg_admin(pg_server: ServerInfo) -> Iterator[Admin]:
    """A separate plain psycopg connection for pg_stat_activity / pg_terminate_backend."""
    admin = Admin(pg_server.admin_dsn)
    try:
        yield admin
    finally:
        admin.close()


@pytest.fixture
def pg_private_cluster() -> Iterator[PostgresCluster]:
    """A dedicated cluster for one test that stops and restarts the server.

    Needs the server binaries (skipped only when TCS_POSTGRES_DSN is used instead of them).
    """
    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("TCS_POSTGRES_DSN"):
            pytest.skip("needs local server binaries to stop and restart a server")
        pytest.fail(INSTALL_HINT, pytrace=False)
    with running_cluster(bindir) as cluster:
        yield cluster


@pytest.fixture
def make_table(pg_dsn: str) -> Iterator[Callable[[str], str]]:
    """Create uniquely named tables (dropped at teardown): ``make_table("id int primary key")``."""
    names: list[str] = []

    def make(columns: str) -> str:
        name = f"tcs_t_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            c.execute(f"create table {name} ({columns})")
        names.append(name)
        return name

    yield make
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        for name in names:
            c.execute(f"drop table if exists {name}")
