"""``python -m supervisor demo``: short runs that must pass their own integrity check, and a
damaged database that must fail it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import open_pool
from supervisor.cli import main
from supervisor.cli.bank import INITIAL, DemoConfig, check_integrity, run_demo

ROOT = Path(__file__).resolve().parent.parent


def test_demo_in_process_with_faults(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    argv = ["demo", "--duration", "2", "--faults", "some", "--seed", "11", "--db", str(db)]
    status = main([*argv, "--clients", "6", "--size", "3", "--progress", "plain"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "integrity check" in out and "PASSED" in out
    assert "elapsed=" in out and "committed=" in out  # plain progress lines (not a terminal)
    assert "faults / seed" in out and "some / 11" in out
    # The database is left in place when --db is given, consistent with the check.
    with sqlite3.connect(db) as raw:
        total = raw.execute("SELECT sum(balance) FROM demo_accounts").fetchone()[0]
        ledger = raw.execute("SELECT count(*) FROM demo_ledger").fetchone()[0]
    raw.close()
    assert total == 50 * INITIAL
    assert ledger > 0


async def test_demo_heavy_faults_keep_integrity() -> None:
    result = await run_demo(
        DemoConfig(duration=1.5, clients=8, size=3, faults="heavy", seed=3, progress="off")
    )
    assert result.check.ok, result.check.problems
    assert result.exit_status == 0
    stats = result.stats
    assert stats.outcomes["committed"] > 0
    # Faults really happened, and clients really saw failures of several kinds.
    assert result.injected.get("lost", 0) + result.injected.get("lost_after", 0) > 0
    assert stats.errors["ConnectionLost"] > 0
    assert result.pool is not None and result.pool.connects > 3
    # Actors crashed (the heavy level's configure bug) and the supervisor restarted them.
    assert result.injected.get("crash", 0) > 0
    assert result.pool.restarts > 0
    # Every transfer ended in exactly one bucket.
    assert stats.acked.isdisjoint(stats.rolled_back | stats.uncertain)
    assert len(stats.acked | stats.rolled_back | stats.uncertain) == len(stats.attempted)


async def test_check_detects_a_damaged_database(tmp_path: Path) -> None:
    db = tmp_path / "damaged.db"
    result = await run_demo(
        DemoConfig(
            duration=0.5, clients=2, size=2, faults="none", seed=1, db=str(db), progress="off"
        )
    )
    assert result.check.ok and result.check.ledger_rows > 0
    # A committed transfer whose ledger row is missing (and a balance edited by hand).
    with sqlite3.connect(db) as raw:
        raw.execute("DELETE FROM demo_ledger WHERE rowid = (SELECT min(rowid) FROM demo_ledger)")
    raw.close()
    async with open_pool("sqlite:///" + str(db), size=1) as pool:
        check = await check_integrity(pool, 50, result.stats)
    assert not check.ok
    assert check.accounts_off >= 2  # both accounts of that transfer disagree with the ledger
    assert check.acked_missing == 1
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE demo_accounts SET balance = balance + 1 WHERE id = 1")
    raw.close()
    async with open_pool("sqlite:///" + str(db), size=1) as pool:
        check = await check_integrity(pool, 50)
    assert not check.ok
    assert any("total balance" in p for p in check.problems)


def test_usage_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--clients", "0"]) == 2
    assert "--clients" in capsys.readouterr().err
    assert main(["demo", "--faults", "apocalyptic"]) == 2
    assert main([]) == 2
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--duration", "--clients", "--size", "--seed", "--faults", "--db", "--dsn"):
        assert option in out


def test_demo_as_a_subprocess(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor", "demo", "--duration", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # the default temporary database was removed


async def test_a_seed_gives_each_client_the_same_transfers_whatever_the_timing() -> None:
    config = DemoConfig(duration=0.7, clients=4, size=2, faults="heavy", seed=21, progress="off")
    first, second = await run_demo(config), await run_demo(config)
    a, b = first.stats.attempted, second.stats.attempted
    common = a.keys() & b.keys()
    assert len(common) > 20
    # Both runs retried (the heavy level's serialization failures), at moments set by timing:
    assert first.stats.retries > 0 and second.stats.retries > 0
    assert {tid: a[tid] for tid in common} == {tid: b[tid] for tid in common}
