"""The demo on PostgreSQL (``--dsn``): it must pass its own integrity check under faults, and
never print the password of the DSN it was given."""

from __future__ import annotations

import pytest

from supervisor.cli import main


@pytest.mark.parametrize("faults", ["none", "heavy"])
def test_demo_on_postgresql_keeps_integrity(
    pg_dsn: str, faults: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--dsn", pg_dsn, "--duration", "2", "--faults", faults, "--seed", "5"]
    status = main([*argv, "--clients", "8", "--size", "4", "--progress", "plain"])
    out, err = capsys.readouterr()
    assert status == 0, out + err
    assert "PostgreSQL" in out and "integrity check" in out and "PASSED" in out
    from psycopg.conninfo import conninfo_to_dict

    password = conninfo_to_dict(pg_dsn).get("password")
    if password:
        assert str(password) not in out + err
