"""The PostgreSQL suite's own hook: every test here gets the ``postgresql`` marker.

Its fixtures (``pg_server``, ``pg_dsn``, ``pg_admin``, ``pg_private_cluster``, ``make_table``)
are in ``tests/conftest.py``, shared with the fault matrix in ``tests/faults/``. Without server
binaries and without a DSN every test of this package FAILS (CI installs the server; a silently
skipped suite would hide a broken driver).
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test in tests/postgres/ gets the ``postgresql`` marker."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.postgresql)
