"""Round-trip cost of the psycopg driver's I/O modes (a measurement script, not a test).

    .venv/bin/python -m tests.postgres.measure_io            # starts a throwaway cluster
    TCS_POSTGRES_DSN=postgresql://... .venv/bin/python -m tests.postgres.measure_io

Prints microseconds per ``select 1`` round trip for: plain synchronous psycopg (the baseline),
the driver with ``io="trio"``, the driver with ``io="thread"``, and psycopg's own
AsyncConnection under asyncio (reference).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import psycopg
import trio

from actors.psycopg import PsycopgDriver

from .cluster import running_cluster

N = 3000
ROUNDS = 7


def _sync_round(dsn: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(100):
            conn.execute("select 1").fetchall()
        start = time.perf_counter()
        for _ in range(N):
            conn.execute("select 1").fetchall()
        return (time.perf_counter() - start) / N * 1e6


def _driver_round(dsn: str, io: str) -> float:
    async def run() -> float:
        driver = PsycopgDriver(dsn, io=io)  # type: ignore[arg-type]
        c = await driver.connect(driver.options)
        try:
            for _ in range(100):
                await c.fetch("select 1")
            start = time.perf_counter()
            for _ in range(N):
                await c.fetch("select 1")
            return (time.perf_counter() - start) / N * 1e6
        finally:
            await c.close()

    return trio.run(run)


def _asyncio_round(dsn: str) -> float:
    async def run() -> float:
        aconn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        try:
            for _ in range(100):
                await (await aconn.execute("select 1")).fetchall()
            start = time.perf_counter()
            for _ in range(N):
                await (await aconn.execute("select 1")).fetchall()
            return (time.perf_counter() - start) / N * 1e6
        finally:
            await aconn.close()

    return asyncio.run(run())


def measure(dsn: str) -> dict[str, float]:
    """Best (minimum) µs per round trip over interleaved rounds, per mode (noise-robust)."""
    modes: dict[str, Callable[[], float]] = {
        "sync psycopg": lambda: _sync_round(dsn),
        "driver io=trio": lambda: _driver_round(dsn, "trio"),
        "driver io=thread": lambda: _driver_round(dsn, "thread"),
        "psycopg asyncio (reference)": lambda: _asyncio_round(dsn),
    }
    samples: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(ROUNDS):
        for name, fn in modes.items():
            samples[name].append(fn())
    return {name: min(values) for name, values in samples.items()}


def main() -> None:
    """Run the measurement against TCS_POSTGRES_DSN or a throwaway cluster and print it."""
    dsn = os.environ.get("TCS_POSTGRES_DSN")
    if dsn:
        results = measure(dsn)
    else:
        with running_cluster() as cluster:
            results = measure(cluster.dsn)
    base = results["sync psycopg"]
    for name, us in results.items():
        print(f"{name:30s} {us:8.1f} us/round trip  ({us / base:.2f}x sync)")


if __name__ == "__main__":
    main()
