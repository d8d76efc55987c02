"""``python -m supervisor``: what a new user meets on the first day, command by command.

Ctrl-C, bad flags, bad databases and missing extras end in one line on stderr and a documented
exit status, never a traceback; ``check`` waits the time it is given and never creates a file;
the demo's live table and summary count the same things.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import trio

from actors.driver import ConnectionLost
from actors.scripted import ScriptedDriver
from supervisor import CheckoutTimeout, QueryError, __version__, open_pool
from supervisor.cli import interrupted, main
from supervisor.cli.bank import (
    INITIAL,
    LEVELS,
    CrashingConfigure,
    DemoConfig,
    Workload,
    run_demo,
)
from supervisor.cli.check import check, target_for
from supervisor.cli.demo import config_from_args
from supervisor.cli.display import OUTCOMES, Progress, summary_rows

ROOT = Path(__file__).resolve().parent.parent
POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="signals are POSIX here")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _default_sigint() -> None:
    # A child inherits an ignored SIGINT (a test run started in the background by a shell);
    # Python then installs no KeyboardInterrupt handler. Give the child the default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _lines(text: str) -> list[str]:
    return text.strip().splitlines()


# -- A1: Ctrl-C --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raised",
    [KeyboardInterrupt(), BaseExceptionGroup("from a nursery", [KeyboardInterrupt()])],
    ids=["bare", "in-a-group"],
)
def test_ctrl_c_in_a_command_exits_130_with_one_line_and_no_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], raised: BaseException
) -> None:
    def interrupted_run(n: int, rounds: int) -> int:
        raise raised

    monkeypatch.setattr("supervisor.cli.bench.run", interrupted_run)
    assert main(["bench"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted\n"
    assert captured.out == ""


def test_an_error_that_is_not_ctrl_c_is_not_reported_as_an_interrupt() -> None:
    assert interrupted(BaseExceptionGroup("g", [ValueError("x"), KeyboardInterrupt()]))
    assert not interrupted(ExceptionGroup("g", [ValueError("x")]))
    assert not interrupted(RuntimeError("x"))


@POSIX_ONLY
def test_ctrl_c_during_a_demo_exits_130_and_removes_its_temporary_database(
    tmp_path: Path,
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "demo", "--duration", "60", "--progress", "plain"],
        cwd=tmp_path,
        env=_env(TMPDIR=str(tmp)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the first progress line: the workload is running
        assert first.startswith("elapsed="), first
        assert any(tmp.iterdir())  # its temporary database exists now
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert err == "interrupted\n"
    assert "integrity check" not in out  # no summary of a run that did not finish
    assert list(tmp.iterdir()) == []


@POSIX_ONLY
def test_ctrl_c_under_the_rich_display_gives_the_terminal_its_cursor_back(
    tmp_path: Path,
) -> None:
    hide, show = b"\x1b[?25l", b"\x1b[?25h"
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "demo", "--duration", "60", "--progress", "rich"],
        cwd=tmp_path,
        # rich draws its live display (hiding the cursor) only on a terminal: pretend.
        env=_env(FORCE_COLOR="1", TTY_INTERACTIVE="1", COLUMNS="100"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_default_sigint,
    )
    try:
        assert proc.stdout is not None
        shown = b""
        while b"latency window" not in shown:  # the live table's title: it is on screen
            chunk = os.read(proc.stdout.fileno(), 4096)  # what is there, without waiting for more
            assert chunk, shown
            shown += chunk
        assert hide in shown
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    shown += out
    assert proc.returncode == 130, err
    assert err == b"interrupted\n"
    assert shown.rfind(show) > shown.rfind(hide)


# -- A2: a bad --dsn or --db --------------------------------------------------------------------


def test_a_demo_on_an_unreachable_server_fails_in_one_line_without_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("psycopg")
    monkeypatch.setattr("supervisor.cli.bank.SETUP_WAIT", 0.5)
    dsn = f"postgresql://demo:hunter2@127.0.0.1:{_free_port()}/bank"
    assert main(["demo", "--dsn", dsn, "--progress", "off"]) == 1
    err = capsys.readouterr().err
    assert len(_lines(err)) == 1, err
    assert err.startswith("failed: ") and "Connection refused" in err
    assert "hunter2" not in err and "Traceback" not in err


def test_a_demo_on_a_malformed_dsn_fails_in_one_line_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("psycopg")
    assert main(["demo", "--dsn", "postgresql://demo:hunter2@[::1/bank"]) == 1
    err = capsys.readouterr().err
    assert len(_lines(err)) == 1 and err.startswith("failed: --dsn: "), err
    assert "hunter2" not in err


def test_a_demo_on_a_file_that_is_not_a_database_fails_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr("supervisor.cli.bank.SETUP_WAIT", 0.5)
    junk = tmp_path / "notes.txt"
    junk.write_text("not a database, " * 100)
    assert main(["demo", "--db", str(junk), "--progress", "off"]) == 1
    err = capsys.readouterr().err
    assert len(_lines(err)) == 1 and err.startswith("failed: "), err
    assert "not a database" in err


@pytest.mark.parametrize(
    ("db", "says"),
    [("missing-dir/bank.db", "does not exist"), (".", "is a directory")],
)
def test_a_demo_on_a_db_path_that_cannot_be_a_file_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    db: str,
    says: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--db", db]) == 2
    err = capsys.readouterr().err
    assert "argument --db: " in err and says in err
    assert list(tmp_path.iterdir()) == []


# -- A4: help and version -----------------------------------------------------------------------


def test_demo_help_has_no_unfilled_placeholders_or_markup(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for raw in ("%(", ")s", "{}", "``", ":class:", ":mod:", ":func:", "INITIAL"):
        assert raw not in out, raw
    assert re.search(r"\{\w*\}", out) is None  # a str.format field left raw
    assert f"{INITIAL:,}" in out
    assert "--accounts accounts" in out and "--clients tasks" in out


def test_version_names_the_program_and_the_package_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert __version__ and __version__[0].isdigit()
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"python -m supervisor {__version__}\n"


# -- A5, A6: check ------------------------------------------------------------------------------


def test_check_fails_on_a_missing_sqlite_file_and_does_not_create_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["check", "sqlite:///nonexistent.db"]) == 1
    err = capsys.readouterr().err
    assert _lines(err) == [
        "failed: SQLite database 'nonexistent.db' does not exist (check never creates one)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_check_opens_an_existing_sqlite_file_read_only(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as raw:
        raw.execute("CREATE TABLE t (x INTEGER)")
    raw.close()
    before = db.read_bytes()
    target = target_for(f"sqlite:///{db}")

    async def use() -> str:
        async with open_pool(target, size=1) as pool:
            assert await pool.fetch_val("SELECT count(*) FROM t") == 0
            with pytest.raises(QueryError, match="readonly"):
                await pool.execute("INSERT INTO t VALUES (1)")
        return await check(target, 5.0)

    assert trio.run(use).startswith("ok: sqlite answered 'select 1' -> 1")
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_check_on_an_existing_sqlite_file_prints_ok(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "app.db"
    sqlite3.connect(db).close()
    assert main(["check", f"sqlite:///{db}"]) == 0
    assert capsys.readouterr().out.startswith("ok: sqlite answered")


async def test_check_waits_the_whole_timeout_while_the_database_is_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = ScriptedDriver()
    driver.script("connect", *[ConnectionLost("server is down")] * 1000)
    start = trio.current_time()
    with pytest.raises(CheckoutTimeout, match="server is down"):
        await check(driver, 10.0)
    # Not shed by the queue after about 1 s (the defaults' CoDel): the whole 10 s.
    assert trio.current_time() - start >= 10.0
    assert driver.ops().count("connect") > 1  # it kept trying meanwhile


def test_check_on_an_unreachable_server_takes_its_timeout_and_prints_one_line() -> None:
    pytest.importorskip("psycopg")
    url = f"postgresql://app:hunter2@127.0.0.1:{_free_port()}/app"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor", "check", url, "--timeout", "2"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert 2.0 <= elapsed < 10.0
    assert len(_lines(proc.stderr)) == 1 and proc.stderr.startswith("failed: ")
    assert "within 2s" in proc.stderr and "hunter2" not in proc.stderr


# -- A7: --progress rich without rich -----------------------------------------------------------


def test_progress_rich_without_rich_installed_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)  # `import rich` raises ImportError
    assert main(["demo", "--progress", "rich"]) == 2
    captured = capsys.readouterr()
    assert len(_lines(captured.err)) == 1, captured.err
    assert "--progress rich needs the rich package" in captured.err
    assert captured.out == ""  # nothing ran


# -- A8: the live table and the summary ---------------------------------------------------------


async def test_the_live_table_and_the_summary_count_the_same_outcomes() -> None:
    seen: list[Progress] = []

    async def monitor(work: Workload) -> None:
        seen.append(Progress(work, io.StringIO(), "plain"))

    result = await run_demo(
        DemoConfig(duration=0.2, clients=2, size=2, faults="none", seed=5, progress="off"),
        monitor,
    )
    (progress,) = seen
    result.stats.outcomes = Counter(
        {"committed": 7, "rolled back": 2, "insufficient funds": 3, "cancelled": 4, "killed": 1}
    )
    live = progress.snapshot()
    summary = dict(summary_rows(result))
    expected = {"committed": 7, "rolled back": 2, "insufficient funds": 3, "failed": 5}
    for name in OUTCOMES:
        assert int(live[name]) == expected[name]
        assert int(summary[f"  {name}"].split()[0]) == expected[name]
    assert summary["  failed"] == "5 (cancelled=4, killed=1)"


# -- A9: actor crashes in the heavy level -------------------------------------------------------


def test_the_crashing_configure_hook_spares_the_first_connections_then_fails_on_schedule() -> None:
    hook = CrashingConfigure(every=3, spare=2)
    outcomes = []
    for index in range(8):
        try:
            hook({"path": "x"}, index)
            outcomes.append("ok")
        except RuntimeError:
            outcomes.append("crash")
    assert outcomes == ["ok", "ok", "crash", "ok", "ok", "crash", "ok", "ok"]
    assert hook.crashes == 2
    assert LEVELS["heavy"].crash_every is not None
    assert LEVELS["some"].crash_every is None and LEVELS["none"].crash_every is None


# -- A10: every flag is validated, naming it ----------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["bench", "-n", "0"], "-n"),
        (["bench", "--rounds", "0"], "--rounds"),
        (["bench", "--rounds", "two"], "--rounds"),
        (["check", "sqlite://:memory:", "--timeout", "0"], "--timeout"),
        (["check", "sqlite://:memory:", "--timeout", "inf"], "--timeout"),
        (["demo", "--duration", "0"], "--duration"),
        (["demo", "--duration", "nan"], "--duration"),
        (["demo", "--clients", "0"], "--clients"),
        (["demo", "--size", "-1"], "--size"),
        (["demo", "--accounts", "1"], "--accounts"),
        (["demo", "--seed", "x"], "--seed"),
        (["demo", "--dsn", "mysql://root:hunter2@db/bank"], "--dsn"),
    ],
)
def test_every_flag_is_checked_with_a_message_naming_it(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    usage, error = _lines(captured.err)  # exactly one usage line and one error line
    assert usage.startswith("usage: python -m supervisor ")
    assert f"error: argument {flag}: " in error
    assert "hunter2" not in captured.err
    assert captured.out == ""


def test_accounts_has_one_rule_whatever_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    messages = []
    for value in ("0", "1"):
        assert main(["demo", "--accounts", value]) == 2
        messages.append(_lines(capsys.readouterr().err)[-1].rsplit(", got ", 1)[0])
    assert messages[0] == messages[1]
    assert messages[0].endswith("must be an integer of at least 2 (a transfer needs two accounts)")


def test_a_namespace_built_by_code_gets_the_same_rules_as_the_command_line() -> None:
    args = argparse.Namespace(
        duration=1.0,
        clients=2,
        size=2,
        accounts=1,
        seed=None,
        faults="none",
        db=None,
        dsn=None,
        progress="off",
    )
    with pytest.raises(ValueError, match=r"^--accounts must be an integer of at least 2"):
        config_from_args(args)
    args.accounts, args.duration = 10, 0.0
    with pytest.raises(ValueError, match=r"^--duration must be a positive number of seconds"):
        config_from_args(args)
    args.duration = 1.0
    assert config_from_args(args).accounts == 10
