"""The pytest plugin: fixtures to test code that uses a pool, on pytest-trio.

Installed with the package (entry point ``pytest11``, name ``trio_connection_supervisor``), so
a project needs no conftest: ``pip install 'trio-connection-supervisor[testing]'`` and, in its
pytest configuration, ``trio_mode = true`` (or mark the tests ``@pytest.mark.trio``)::

    from supervisor import open_pool

    @pytest.mark.db_pool(size=2)
    async def test_signup(db_pool):
        await db_pool.execute("insert into users (name) values (%s)", ["ada"])  # rolled back

    async def test_lost_link(postgres_server, chaos_proxy):
        async with open_pool(chaos_proxy.rewrite(postgres_server.dsn)) as pool:
            chaos_proxy.reset_peer()
            ...

The fixtures:

* ``postgres_server`` (session scope): a :class:`~supervisor.testing.cluster.PostgresServer`
  (``.dsn``, ``.host``, ``.port``, ``.admin()``). The server named by ``--postgres-dsn``, else
  by the ``TCS_POSTGRES_DSN`` environment variable, else a throwaway cluster
  (:func:`~supervisor.testing.cluster.throwaway_cluster`) started on first use and deleted at
  the end of the session. Without server binaries and without a DSN, the tests using it fail
  with installation instructions (a silently skipped database suite hides a broken driver).
* ``db_pool``: an open :class:`~supervisor.Pool` on ``postgres_server``, inside a
  :func:`~supervisor.testing.sandbox.sandbox` opened with ``shared=True`` (every task of the
  test's Trio run is admitted; everything done through the pool is rolled back at the end).
  Options for ``open_pool`` come from ``@pytest.mark.db_pool(**options)`` (on the test, its
  class or its module; the closest wins, option by option).
* ``chaos_proxy``: an open :class:`~supervisor.testing.chaos.ChaosProxy` in front of
  ``postgres_server`` (``chaos_proxy.rewrite(postgres_server.dsn)`` is the DSN through it).
* ``scripted_driver``: a fresh :class:`actors.scripted.ScriptedDriver` (a no-op database
  until scripted), accepted by ``open_pool``.

The plugin starts and imports nothing until a fixture is requested: projects that do not use
PostgreSQL, or do not have psycopg or pytest-trio installed, are not affected. Disable it with
``-p no:trio_connection_supervisor``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from actors.scripted import ScriptedDriver
    from supervisor.pool import Pool
    from supervisor.testing.chaos import ChaosProxy
    from supervisor.testing.cluster import PostgresServer

__all__ = [
    "chaos_proxy",
    "db_pool",
    "postgres_server",
    "pytest_addoption",
    "pytest_configure",
    "scripted_driver",
]

_DSN_ENV = "TCS_POSTGRES_DSN"  # supervisor.testing.cluster.DSN_ENV, without importing psycopg
_EXTRA_HINT = (
    "pip install 'trio-connection-supervisor[testing]' (pytest, pytest-trio and psycopg)"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--postgres-dsn``: the server ``postgres_server`` names instead of a throwaway one."""
    group = parser.getgroup("trio-connection-supervisor", "trio-connection-supervisor fixtures")
    group.addoption(
        "--postgres-dsn",
        dest="tcs_postgres_dsn",
        default=None,
        metavar="DSN",
        help=(
            "an existing PostgreSQL server for the postgres_server fixture (a URL or conninfo "
            f"string; default: ${_DSN_ENV}, else a throwaway cluster started for the session)"
        ),
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``db_pool`` marker."""
    config.addinivalue_line(
        "markers",
        "db_pool(**options): open_pool options for the db_pool fixture "
        "(e.g. @pytest.mark.db_pool(size=2, limits=SafetyLimits(checkout_timeout=1.0)))",
    )


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    """The PostgreSQL server of the session: ``--postgres-dsn``, else ``$TCS_POSTGRES_DSN``,
    else a throwaway cluster started now and deleted at the end of the session."""
    try:
        from supervisor.testing.cluster import (
            INSTALL_HINT,
            PostgresServer,
            find_bindir,
            throwaway_cluster,
        )
    except ImportError as exc:  # psycopg is missing
        pytest.fail(f"postgres_server needs psycopg ({exc}): {_EXTRA_HINT}", pytrace=False)
    dsn = request.config.getoption("tcs_postgres_dsn") or os.environ.get(_DSN_ENV)
    if dsn:
        yield PostgresServer(str(dsn))
        return
    bindir = find_bindir()
    if bindir is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    # Starting a cluster is blocking subprocess work (initdb, pg_ctl): a sync session fixture,
    # since Trio fixtures must be function-scoped.
    with throwaway_cluster(bindir) as cluster:
        yield cluster


@pytest.fixture
def scripted_driver() -> ScriptedDriver:
    """A fresh :class:`actors.scripted.ScriptedDriver`, accepted by ``open_pool``."""
    from actors.scripted import ScriptedDriver

    return ScriptedDriver()


@pytest.fixture
async def chaos_proxy(postgres_server: PostgresServer) -> AsyncIterator[ChaosProxy]:
    """An open :class:`~supervisor.testing.chaos.ChaosProxy` forwarding to ``postgres_server``
    over TCP; ``chaos_proxy.rewrite(postgres_server.dsn)`` is the DSN through it."""
    from supervisor.testing.chaos import open_chaos_proxy

    host = postgres_server.host or ""
    if not host or host.startswith("/") or "," in host:
        pytest.fail(
            f"chaos_proxy needs a PostgreSQL server on one TCP host, not host={host!r} "
            f"(a unix socket or several hosts): {postgres_server!r}",
            pytrace=False,
        )
    async with open_chaos_proxy(host, postgres_server.port) as proxy:
        yield proxy


@pytest.fixture
async def db_pool(
    request: pytest.FixtureRequest, postgres_server: PostgresServer
) -> AsyncIterator[Pool]:
    """An open pool on ``postgres_server``, sandboxed: what the test does is rolled back.

    ``open_pool`` options come from ``@pytest.mark.db_pool(**options)``.
    """
    from supervisor import open_pool
    from supervisor.testing.sandbox import sandbox

    options = _marker_options(request.node)
    # shared=True: pytest-trio runs each fixture and the test in sibling tasks, so the task
    # opening the sandbox here is not the test's. The whole Trio run is one test: every task
    # of it (the test, its children, other fixtures' tasks such as an app server) is admitted.
    async with open_pool(postgres_server.dsn, **options) as pool, sandbox(pool, shared=True):
        yield pool


def _marker_options(node: pytest.Item | pytest.Collector) -> dict[str, Any]:
    """The keyword arguments of every ``db_pool`` marker on ``node`` and its parents, the
    closest one winning option by option."""
    options: dict[str, Any] = {}
    for marker in reversed(list(node.iter_markers("db_pool"))):  # farthest first
        if marker.args:
            pytest.fail(
                f"@pytest.mark.db_pool takes open_pool options by keyword only, "
                f"not {marker.args!r}",
                pytrace=False,
            )
        options.update(marker.kwargs)
    return options
