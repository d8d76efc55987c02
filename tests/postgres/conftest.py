"""Fixtures for the real-server PostgreSQL suite, thin wrappers over the pytest plugin's.

The server is the plugin's session-scoped ``postgres_server`` (:mod:`supervisor.testing.plugin`):
``--postgres-dsn`` or ``TCS_POSTGRES_DSN`` names an existing server, else a throwaway cluster
(:mod:`supervisor.testing.cluster`) is started once. Without server binaries and without a DSN
every test of this package FAILS (CI installs the server; a silently skipped suite would hide a
broken driver).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from supervisor.testing.cluster import (
    DSN_ENV,
    INSTALL_HINT,
    PostgresAdmin,
    PostgresCluster,
    PostgresServer,
    find_bindir,
    throwaway_cluster,
)

from .cluster import ServerInfo

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test in tests/postgres/ gets the ``postgresql`` marker."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.postgresql)


@pytest.fixture(scope="session")
def pg_server(postgres_server: PostgresServer) -> ServerInfo:
    """The server the suite talks to (the plugin's ``postgres_server``)."""
    return ServerInfo.of(postgres_server)


@pytest.fixture
def pg_dsn(pg_server: ServerInfo) -> str:
    """DSN of the password-authenticated test role."""
    return pg_server.dsn


@pytest.fixture
def pg_admin(pg_server: ServerInfo) -> Iterator[PostgresAdmin]:
    """A separate plain psycopg connection for pg_stat_activity / pg_terminate_backend."""
    with PostgresAdmin(pg_server.admin_dsn) as admin:
        yield admin


@pytest.fixture
def pg_private_cluster(request: pytest.FixtureRequest) -> Iterator[PostgresCluster]:
    """A dedicated cluster for one test that stops and restarts the server.

    Needs the server binaries (skipped only when an existing server is used instead of them).
    """
    bindir = find_bindir()
    if bindir is None:
        if request.config.getoption("tcs_postgres_dsn") or os.environ.get(DSN_ENV):
            pytest.skip("needs local server binaries to stop and restart a server")
        pytest.fail(INSTALL_HINT, pytrace=False)
    with throwaway_cluster(bindir) as cluster:
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
