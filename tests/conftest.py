"""pytest configuration shared by every test under tests/.

Nothing here imports psycopg until a PostgreSQL fixture is used, so the SQLite and
scripted-driver tests run without it. Fixtures shared by several test modules belong here (a
fixture used by one module stays in it): the real-server fixtures of the PostgreSQL suite
(``tests/postgres/``) and the fault matrix (``tests/faults/``). They are thin wrappers over the
pytest plugin's session-scoped ``postgres_server`` (:mod:`supervisor.testing.plugin`):
``--postgres-dsn`` or ``TCS_POSTGRES_DSN`` names an existing server, else a throwaway cluster
(:mod:`supervisor.testing.cluster`) is started once, the first time a test asks for it.

Helper *functions* do not live here: a ``conftest.py`` is loaded by pytest, not meant to be
imported by name (its module name depends on the layout and the import mode). They live in
plain modules next to this file and are imported by name:

* ``tests/helpers.py``: ``settle()``, scripted-driver steps (``hang``, ``gate_step``), holding
  a connection in another task (``hold_until``, ``held``), the protocol operations (``ops``,
  ``QUIET``);
* ``tests/sqlite_helpers.py``: synchronising with real SQLite worker threads, ground-truth counts.

``from helpers import settle`` works because tests/ has no ``__init__.py``: with pytest's default
``prepend`` import mode, loading this file (and any test module here) puts tests/ on
``sys.path``. Under ``--import-mode=importlib`` such helper modules would not be importable.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # psycopg is imported by the PostgreSQL fixtures only, when a test asks
    from postgres.cluster import ServerInfo

    from supervisor.testing.cluster import PostgresAdmin, PostgresCluster, PostgresServer


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--soak-minutes N``: how long tests/faults/test_soak.py runs (default 1: about 60 s,
    which is what CI runs)."""
    parser.addoption(
        "--soak-minutes",
        type=float,
        default=1.0,
        help="minutes the fault soak (tests/faults/test_soak.py) runs; default 1",
    )


@pytest.fixture(scope="session")
def pg_server(postgres_server: PostgresServer) -> ServerInfo:
    """The server the suite talks to (the plugin's ``postgres_server``)."""
    from postgres.cluster import ServerInfo

    return ServerInfo.of(postgres_server)


@pytest.fixture
def pg_dsn(pg_server: ServerInfo) -> str:
    """DSN of the password-authenticated test role."""
    return pg_server.dsn


@pytest.fixture
def pg_admin(pg_server: ServerInfo) -> Iterator[PostgresAdmin]:
    """A separate plain psycopg connection for pg_stat_activity / pg_terminate_backend."""
    from supervisor.testing.cluster import PostgresAdmin

    with PostgresAdmin(pg_server.admin_dsn) as admin:
        yield admin


@pytest.fixture
def pg_private_cluster(request: pytest.FixtureRequest) -> Iterator[PostgresCluster]:
    """A dedicated cluster for one test that stops and restarts the server.

    Needs the server binaries (skipped only when an existing server is used instead of them).
    """
    from supervisor.testing.cluster import DSN_ENV, INSTALL_HINT, find_bindir, throwaway_cluster

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
    import psycopg

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
