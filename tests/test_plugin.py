"""The pytest plugin (supervisor.testing.plugin), as a new project without a conftest sees it.

Each test writes a throwaway project with ``pytester`` and runs pytest on it in a subprocess
(so the plugin is found the way a user's run finds it: through its ``pytest11`` entry point).
The PostgreSQL ones point the inner run at this session's own server (``--postgres-dsn`` /
``TCS_POSTGRES_DSN``): no second initdb.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from supervisor.testing.cluster import PostgresServer

pytest_plugins = ["pytester"]

PLUGIN = "supervisor.testing.plugin"
NAME = "trio_connection_supervisor"


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A project with only ``trio_mode = true`` in its configuration, nothing else."""
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    monkeypatch.delenv("TCS_POSTGRES_DSN", raising=False)
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    return pytester


def test_found_through_its_entry_point(pytestconfig: pytest.Config) -> None:
    found = [ep for ep in entry_points(group="pytest11") if ep.value == PLUGIN]
    assert [ep.name for ep in found] == [NAME]
    assert found[0].load() is sys.modules[PLUGIN]
    # and this very run loaded it that way (no conftest names it)
    assert pytestconfig.pluginmanager.get_plugin(NAME) is sys.modules[PLUGIN]


def test_scripted_driver_without_postgresql(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A project that never asks for PostgreSQL: the fixtures start and import nothing."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))  # where a throwaway cluster would go
    project.makepyfile(
        test_app="""
        import sys

        from supervisor import open_pool

        async def test_a_pool_on_the_scripted_driver(scripted_driver):
            assert scripted_driver.calls == []
            async with open_pool(scripted_driver, size=1) as pool:
                assert await pool.execute("update t set x = 1") == 0
            assert "execute" in scripted_driver.ops()

        def test_each_test_gets_a_fresh_driver(scripted_driver):
            assert scripted_driver.calls == []

        def test_nothing_of_postgresql_was_imported(request):
            assert "supervisor.testing.cluster" not in sys.modules
            assert "psycopg" not in sys.modules
            assert request.config.getoption("tcs_postgres_dsn") is None
            assert any(m.startswith("db_pool(") for m in request.config.getini("markers"))
        """
    )
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert list(tmpdir.iterdir()) == []


def test_help_shows_the_option(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*--postgres-dsn=DSN*"])


@pytest.mark.postgresql
def test_postgres_fixtures_on_an_existing_server(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, postgres_server: PostgresServer
) -> None:
    """postgres_server from TCS_POSTGRES_DSN; db_pool with its marker and its sandbox;
    chaos_proxy in front of the server."""
    monkeypatch.setenv("TCS_POSTGRES_DSN", postgres_server.dsn)
    project.makepyfile(
        test_app=f"""
        import os
        import uuid

        import psycopg
        import pytest

        from supervisor import open_pool

        TABLE = "tcs_plugin_" + uuid.uuid4().hex[:10]

        def test_the_server_named_by_the_environment(postgres_server):
            assert postgres_server.dsn == os.environ["TCS_POSTGRES_DSN"]
            assert (postgres_server.host, postgres_server.port) == (
                {postgres_server.host!r}, {postgres_server.port!r})

        @pytest.mark.db_pool(size=2, name="plugin-test")
        async def test_db_pool_writes_in_its_sandbox(db_pool):
            assert db_pool.name == "plugin-test"
            assert db_pool.statistics().size == 2
            await db_pool.execute(f"create table {{TABLE}} (x int)")
            async with db_pool.transaction() as tx:
                await tx.execute(f"insert into {{TABLE}} values (1)")
            assert await db_pool.fetch_val(f"select count(*) from {{TABLE}}") == 1

        def test_the_sandbox_rolled_it_back(postgres_server):
            with psycopg.connect(postgres_server.dsn) as conn:
                found = conn.execute("select to_regclass(%s)", [TABLE]).fetchone()
            assert found == (None,)

        async def test_chaos_proxy_in_front_of_the_server(postgres_server, chaos_proxy):
            async with open_pool(chaos_proxy.rewrite(postgres_server.dsn), size=1) as pool:
                assert await pool.fetch_val("select 1") == 1
            assert chaos_proxy.statistics().links_accepted >= 1
        """
    )
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


@pytest.mark.postgresql
def test_the_option_wins_over_the_environment(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, postgres_server: PostgresServer
) -> None:
    monkeypatch.setenv("TCS_POSTGRES_DSN", "postgresql://nobody@127.0.0.1:1/nothing")
    project.makepyfile(
        test_app=f"""
        def test_dsn(postgres_server):
            assert postgres_server.dsn == {postgres_server.dsn!r}
            assert postgres_server.port == {postgres_server.port!r}
        """
    )
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--postgres-dsn",
                                          postgres_server.dsn)
    result.assert_outcomes(passed=1)

