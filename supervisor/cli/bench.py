"""Microbenchmark of the bare checkout-and-return cycle (HikariCP's measure).

Runs, in one process and one Trio run, interleaved rounds of:

* ``await trio.lowlevel.checkpoint()``: the floor, one scheduler round trip;
* ``async with pool.run(): pass`` on a pool of a no-op driver (uncontended);
* ``async with pool.transaction(): pass`` (BEGIN/COMMIT through a no-op driver);
* ``await pool.fetch_all(q)``: a one-shot query (checkout, call, return).

and reports microseconds per operation and the ratio to the checkpoint, taking the median of
several rounds so a noisy neighbour does not decide the result. Not a test: it asserts nothing;
``python -m supervisor bench`` (or ``python tests/bench/bench_checkout.py``) prints the table.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Awaitable, Callable

import trio

from actors.scripted import ScriptedDriver
from supervisor import Pool, open_pool

Op = Callable[[], Awaitable[object]]


async def _time(op: Op, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await op()
    return (time.perf_counter() - start) / n * 1e6


async def _run_block(pool: Pool) -> None:
    async with pool.run():
        pass


async def _tx_block(pool: Pool) -> None:
    async with pool.transaction():
        pass


async def bench(n: int = 20000, rounds: int = 7) -> dict[str, float]:
    """Median microseconds per operation for each case, measured in one run."""
    driver = ScriptedDriver(record=False)
    results: dict[str, list[float]] = {}
    async with open_pool(driver, size=1, name="bench", idle_interval=3600) as pool:
        await pool.fetch_all("warm up")
        cases: dict[str, Op] = {
            "checkpoint": trio.lowlevel.checkpoint,
            "run() cycle": lambda: _run_block(pool),
            "transaction() cycle": lambda: _tx_block(pool),
            "one-shot fetch_all": lambda: pool.fetch_all("select 1"),
        }
        gc.collect()
        gc.disable()
        try:
            for _ in range(rounds):
                for name, op in cases.items():
                    results.setdefault(name, []).append(await _time(op, n))
        finally:
            gc.enable()
    return {name: statistics.median(values) for name, values in results.items()}


def report(medians: dict[str, float]) -> str:
    """A plain table: microseconds per operation and ratio to one checkpoint."""
    base = medians["checkpoint"]
    lines = [f"{'case':<24}{'us/op':>10}{'x checkpoint':>15}"]
    for name, value in medians.items():
        lines.append(f"{name:<24}{value:>10.2f}{value / base:>15.2f}")
    return "\n".join(lines)


def run(n: int = 20000, rounds: int = 7) -> int:
    """Run the benchmark and print the table; the exit status is 0."""
    print(report(trio.run(bench, n, rounds)))
    return 0
