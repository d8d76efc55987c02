"""Test-only names for the PostgreSQL suite; the cluster code is the library's.

The throwaway cluster, the admin connection and their helpers live in
:mod:`supervisor.testing.cluster` (public), and the session's server comes from the pytest
plugin's ``postgres_server`` fixture (:mod:`supervisor.testing.plugin`). This module keeps the
names the suite, ``measure_io`` and the benchmarks import (``Admin``, ``running_cluster``, ...)
and :class:`ServerInfo`, the shape of the suite's ``pg_server`` fixture.
"""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.testing.cluster import (
    INSTALL_HINT,
    PostgresAdmin,
    PostgresCluster,
    PostgresServer,
    find_bindir,
    free_port,
    throwaway_cluster,
)

__all__ = [
    "INSTALL_HINT",
    "Admin",
    "PostgresCluster",
    "ServerInfo",
    "find_bindir",
    "free_port",
    "running_cluster",
]

Admin = PostgresAdmin
running_cluster = throwaway_cluster


@dataclass(frozen=True)
class ServerInfo:
    """Where the tests connect: ``dsn`` (the test role, password over TCP), ``admin_dsn``
    (a role allowed to read pg_stat_activity and terminate the test role's backends), and the
    cluster when the session started one (None with --postgres-dsn / TCS_POSTGRES_DSN)."""

    dsn: str
    admin_dsn: str
    cluster: PostgresCluster | None
    password: str | None

    @classmethod
    def of(cls, server: PostgresServer) -> ServerInfo:
        """The plugin's ``postgres_server`` in this shape."""
        cluster = server if isinstance(server, PostgresCluster) else None
        return cls(server.dsn, server.admin_dsn, cluster, server.password)
