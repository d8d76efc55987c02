"""Hosted asyncio drivers against the native one: ``python tests/bench/bench_aio.py [--quick]``.

A benchmark, not a test (pytest does not collect ``tests/bench``). In one Trio run, against a
throwaway cluster it starts itself (``supervisor.testing.cluster``; or the server of
``TCS_POSTGRES_DSN``), over TCP on 127.0.0.1, sequential ``await pool.fetch_val("select 1")``
(one client, one query at a time, pool of 1) through:

* ``native``: :class:`actors.psycopg.PsycopgDriver` (Trio-native I/O, no asyncio);
* ``asyncpg``: :class:`actors.aio.AsyncpgDriver` (asyncpg on the driver's trio-asyncio loop);
* ``psycopg-async``: :class:`actors.aio.AsyncPsycopgDriver` (psycopg's AsyncConnection there);
* ``triopg``: ``triopg.create_pool(...).fetchval`` (asyncpg's pool behind trio-asyncio; the
  peer), if ``triopg`` imports; its row is skipped otherwise;

plus the cost of one bare crossing with nothing on the other side: ``trio_asyncio.aio_as_trio``
of an empty coroutine, and the crossing :class:`actors.aio.loop.Call` this package uses.

Method: every pool stays open for the whole run (``idle_interval`` long, so no ping lands in a
measurement); after a warm-up, rounds interleave the implementations (order rotated each
round), each a fixed number of queries; the table shows the median over rounds of µs per
query, and the ratio to ``native``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
import trio_asyncio  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from actors.aio import AsyncpgDriver, AsyncPsycopgDriver  # noqa: E402
from actors.aio.loop import Call  # noqa: E402
from actors.psycopg import PsycopgDriver  # noqa: E402
from supervisor import open_pool  # noqa: E402

Op = Callable[[], Awaitable[Any]]


async def _nop() -> None:
    return None


async def _time(op: Op, n: int) -> float:
    """µs per call of ``op`` over ``n`` sequential calls."""
    start = time.perf_counter()
    for _ in range(n):
        await op()
    return (time.perf_counter() - start) / n * 1e6


async def bench(dsn: str, *, rounds: int, per_round: int) -> None:
    options: dict[str, Any] = {"size": 1, "idle_interval": 3600.0, "name": "bench"}
    ops: dict[str, Op] = {}
    notes: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        native = await stack.enter_async_context(open_pool(PsycopgDriver(dsn), **options))
        ops["native (PsycopgDriver)"] = lambda: native.fetch_val("select 1")
        apg_driver = AsyncpgDriver(dsn)
        stack.push_async_callback(apg_driver.close)
        apg = await stack.enter_async_context(open_pool(apg_driver, **options))
        ops["asyncpg (AsyncpgDriver)"] = lambda: apg.fetch_val("select 1")
        psy_driver = AsyncPsycopgDriver(dsn)
        stack.push_async_callback(psy_driver.close)
        psy = await stack.enter_async_context(open_pool(psy_driver, **options))
        ops["psycopg-async (AsyncPsycopgDriver)"] = lambda: psy.fetch_val("select 1")

        loop = await stack.enter_async_context(trio_asyncio.open_loop())
        try:
            import triopg  # type: ignore[import-untyped]
        except Exception as exc:  # not installed, or its dependencies are missing
            notes.append(f"triopg skipped: {type(exc).__name__}: {exc}")
        else:
            tpool = await stack.enter_async_context(triopg.create_pool(dsn, min_size=1, max_size=1))
            ops["triopg (asyncpg pool)"] = lambda: tpool.fetchval("select 1")
        bare = trio_asyncio.aio_as_trio(_nop)
        ops["bare aio_as_trio crossing"] = lambda: bare()
        ops["bare actors.aio Call crossing"] = lambda: Call(loop, _nop()).wait()

        for op in ops.values():  # warm-up (statement caches, psycopg's prepare threshold)
            await _time(op, max(50, per_round // 10))
        samples: dict[str, list[float]] = {name: [] for name in ops}
        names = list(ops)
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                samples[name].append(await _time(ops[name], per_round))

    base = statistics.median(samples[names[0]])
    print(f"sequential select 1, pool of 1; {rounds} rounds x {per_round} queries, median")
    print(f"{'implementation':40} {'us/query':>10} {'x native':>9} {'min':>8} {'max':>8}")
    for name in names:
        values = samples[name]
        med = statistics.median(values)
        print(
            f"{name:40} {med:10.1f} {med / base:9.2f} {min(values):8.1f} {max(values):8.1f}"
        )
    for note in notes:
        print(note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and queries")
    args = parser.parse_args()
    rounds, per_round = (3, 300) if args.quick else (9, 2000)
    dsn = os.environ.get("TCS_POSTGRES_DSN")
    if dsn:
        trio.run(lambda: bench(dsn, rounds=rounds, per_round=per_round))
        return
    from tests.postgres.cluster import running_cluster

    with running_cluster() as cluster:
        print(f"server: throwaway cluster on 127.0.0.1:{cluster.port}")
        trio.run(lambda: bench(cluster.dsn, rounds=rounds, per_round=per_round))


if __name__ == "__main__":
    main()
