"""The fault matrix and the soak run on the suite's PostgreSQL server (tests/postgres/conftest.py);
``server`` gives its address for the chaos proxy to stand in front of."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
from psycopg.conninfo import conninfo_to_dict


@dataclass(frozen=True)
class Server:
    """Where the server listens (TCP) and the DSN of the test role."""

    dsn: str
    host: str
    port: int


@pytest.fixture
def server(pg_dsn: str) -> Server:
    if "://" in pg_dsn:
        parts = urlsplit(pg_dsn)
        host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    else:
        params = conninfo_to_dict(pg_dsn)
        host, port = str(params.get("host", "127.0.0.1")), int(params.get("port", 5432))
    if host.startswith("/"):
        pytest.skip("the chaos proxy needs a TCP server, not a unix socket")
    return Server(pg_dsn, host, port)
