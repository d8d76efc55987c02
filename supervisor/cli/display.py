"""What ``python -m supervisor demo`` shows: the live progress while the workload runs and
the summary after the integrity check.

Kept apart from :mod:`supervisor.cli.bank` so that the bank stays an application that prints
nothing: a rich table on a terminal (when ``rich`` is installed), plain lines otherwise, or
nothing at all (``--progress off``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, TextIO

import trio

from supervisor.cli.bank import GOOD_OUTCOMES, DemoResult, Stats, Workload

__all__ = [
    "OUTCOMES",
    "Progress",
    "failures",
    "outcome_counts",
    "percentile",
    "print_summary",
    "rich_installed",
    "summary_rows",
    "wants_rich",
]

OUTCOMES = ("committed", "rolled back", "insufficient funds", "failed")
"""How the live table and the summary both count transfers: ``rolled back`` on purpose (an
audit veto), ``insufficient funds`` (the overdraft rule), and ``failed`` (every other end: see
:func:`failures`)."""


def outcome_counts(stats: Stats) -> dict[str, int]:
    """Transfers per :data:`OUTCOMES` category."""
    counts = {name: stats.outcomes[name] for name in OUTCOMES if name != "failed"}
    counts["failed"] = sum(failures(stats).values())
    return counts


def failures(stats: Stats) -> dict[str, int]:
    """The ``failed`` transfers by how they ended (cancelled, killed, revoked, ...), most first."""
    bad = [(k, n) for k, n in stats.outcomes.items() if k not in GOOD_OUTCOMES and n]
    return dict(sorted(bad, key=lambda kv: -kv[1]))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by the nearest-rank method; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def wants_rich(mode: str, out: TextIO) -> bool:
    """Whether ``--progress mode`` means rich output on ``out``: ``rich``, or ``auto`` on a
    terminal, and only if rich is installed."""
    return (mode == "rich" or (mode == "auto" and out.isatty())) and rich_installed()


def rich_installed() -> bool:
    """Whether the ``rich`` package can be imported (the ``demo`` extra)."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """Live progress: a rich table on a terminal, plain lines otherwise (or nothing)."""

    def __init__(self, work: Workload, out: TextIO, mode: str) -> None:
        self.work = work
        self.out = out
        self.mode = "off" if mode == "off" else "rich" if wants_rich(mode, out) else "plain"
        self.started = time.perf_counter()

    def snapshot(self) -> dict[str, str]:
        """The numbers shown, formatted."""
        work = self.work
        stats = work.stats
        now = time.perf_counter()
        while stats.window and stats.window[0][0] < now - 2.0:
            stats.window.popleft()
        recent = [lat for _, lat in stats.window]
        elapsed = now - self.started
        pool = work.pool.statistics()
        counts = outcome_counts(stats)
        committed = counts["committed"]
        return {
            "elapsed": f"{elapsed:.1f}s",
            **{name: str(n) for name, n in counts.items()},
            "tps": f"{committed / elapsed:.0f}" if elapsed > 0 else "-",
            "p50": f"{percentile(recent, 0.50) * 1e3:.1f}ms" if recent else "-",
            "p99": f"{percentile(recent, 0.99) * 1e3:.1f}ms" if recent else "-",
            "retries": str(stats.retries),
            "pool": f"{pool.busy} busy/{pool.idle} idle/{pool.connecting} conn/{pool.size}",
            "waiting": str(pool.waiting),
            "connects": str(pool.connects),
            "restarts": str(pool.restarts),
            "dropped": str(pool.dropped),
            "revoked": str(pool.revoked),
            "faults": str(work.faults.count()),
        }

    def line(self) -> str:
        """One plain progress line."""
        return " ".join(f"{k}={v}" for k, v in self.snapshot().items())

    def table(self) -> Any:
        """The rich renderable: workload numbers on the left, pool numbers on the right."""
        from rich.table import Table

        snap = self.snapshot()
        left = ["elapsed", *OUTCOMES, "tps", "p50", "p99", "retries"]
        right = [key for key in snap if key not in left]
        table = Table(title="trio-connection-supervisor demo (2 s latency window)")
        table.add_column("workload")
        table.add_column("", justify="right")
        table.add_column("pool")
        table.add_column("", justify="right")
        for i in range(max(len(left), len(right))):
            lk = left[i] if i < len(left) else ""
            rk = right[i] if i < len(right) else ""
            table.add_row(lk, snap.get(lk, ""), rk, snap.get(rk, ""))
        return table

    async def run(self) -> None:
        """Refresh until cancelled."""
        if self.mode == "off":
            return
        if self.mode == "plain":
            while True:
                await trio.sleep(1.0)
                print(self.line(), file=self.out, flush=True)
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.out)
        live = Live(self.table(), console=console, refresh_per_second=4, transient=False)
        live.start()
        try:
            while True:
                await trio.sleep(0.25)
                live.update(self.table())
        finally:
            live.stop()  # cursor shown again, terminal restored, whatever ended the run


def summary_rows(result: DemoResult) -> list[tuple[str, str]]:
    """The summary as (what, value) rows, the integrity check last."""
    stats, check = result.stats, result.check
    lat = stats.latencies
    rows = [
        ("database", "PostgreSQL" if result.config.dsn else "SQLite"),
        ("faults / seed", f"{result.config.faults} / {result.seed}"),
        ("duration", f"{result.elapsed:.2f}s"),
        ("clients / pool size", f"{result.config.clients} / {result.config.size}"),
        ("transfers attempted", str(len(stats.attempted))),
    ]
    detail = ", ".join(f"{k}={v}" for k, v in failures(stats).items())
    for name, n in outcome_counts(stats).items():
        rows.append((f"  {name}", f"{n} ({detail})" if name == "failed" and detail else str(n)))
    rows += [
        ("throughput", f"{stats.outcomes['committed'] / max(result.elapsed, 1e-9):.0f} commits/s"),
        (
            "latency p50 / p99",
            f"{percentile(lat, 0.5) * 1e3:.1f} / {percentile(lat, 0.99) * 1e3:.1f} ms"
            if lat
            else "-",
        ),
        ("serialization retries", str(stats.retries)),
        ("errors seen by clients", ", ".join(f"{k}={v}" for k, v in stats.errors.items()) or "-"),
        ("chaos actions", ", ".join(f"{k}={v}" for k, v in stats.chaos.items()) or "-"),
        ("injected faults", ", ".join(f"{k}={v}" for k, v in result.injected.items()) or "-"),
    ]
    if result.pool is not None:
        p = result.pool
        rows.append(
            (
                "pool",
                f"checkouts={p.checkouts} connects={p.connects} disconnects={p.disconnects} "
                f"restarts={p.restarts} revoked={p.revoked} dropped={p.dropped} "
                f"timeouts={p.timeouts}",
            )
        )
    rows += [
        ("total balance", f"{check.actual_total} (expected {check.expected_total})"),
        ("ledger rows", str(check.ledger_rows)),
        (
            "uncertain outcomes",
            f"{check.uncertain} (of which {check.uncertain_committed} had in fact committed)",
        ),
        ("integrity check", "PASSED" if check.ok else "FAILED: " + "; ".join(check.problems)),
    ]
    return rows


def print_summary(result: DemoResult, out: TextIO, rich_output: bool) -> None:
    """The final table: a rich table on a terminal, aligned plain text otherwise."""
    rows = summary_rows(result)
    if rich_output:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="demo summary", show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value")
        for key, value in rows:
            style = None
            if key == "integrity check":
                style = "green" if result.check.ok else "red"
            table.add_row(key, value, style=style)
        Console(file=out).print(table)
        return
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=out)
