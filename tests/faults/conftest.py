"""The fault matrix and the soak run on the suite's PostgreSQL server (the ``pg_*`` fixtures of
``tests/conftest.py``); ``server`` gives its address for the chaos proxy to stand in front of.
Every test here needs the server and gets the ``postgresql`` marker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from psycopg.conninfo import conninfo_to_dict

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test in tests/faults/ gets the ``postgresql`` marker."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.postgresql)


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
