"""Soak: random network faults from the chaos proxy and driver faults from the fault driver,
under the demo's bank-transfer load on the real server, with the same invariants as every row
of the fault matrix: every client gets a result or a PoolError in bounded time, money is
neither created nor lost, every committed transfer is in the ledger exactly once, nothing
rolled back is visible.

About 60 s by default (``--soak-minutes``, e.g. ``--soak-minutes 30`` for a long run). It prints
how many faults of each kind were survived.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import trio

from supervisor.cli.bank import DemoConfig, Workload, run_demo
from supervisor.testing import open_chaos_proxy

pytestmark = [pytest.mark.postgresql, pytest.mark.slow]

NETWORK_FAULTS = ("reset_peer", "latency", "slicer", "bandwidth", "blackhole", "limit_data")


async def test_random_faults_under_a_transfer_load_lose_nothing(
    server: Any, request: pytest.FixtureRequest
) -> None:
    minutes = float(request.config.getoption("--soak-minutes"))
    duration = max(5.0, minutes * 60.0 - 5.0)  # setup and the final check take a few seconds
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    survived: Counter[str] = Counter()
    host, port = server.host, server.port
    async with open_chaos_proxy(host, port, seed=seed) as proxy:

        async def monitor(work: Workload) -> None:
            try:
                while True:
                    await trio.sleep(rng.uniform(0.3, 1.5))
                    fault = rng.choice(NETWORK_FAULTS)
                    if fault == "reset_peer":
                        proxy.reset_peer()
                    elif fault == "latency":
                        proxy.latency(rng.uniform(5, 80), jitter=20)
                    elif fault == "slicer":
                        proxy.slicer(rng.randint(16, 64), size_variation=8, delay_us=200)
                    elif fault == "bandwidth":
                        proxy.bandwidth(rng.uniform(20, 200))
                    elif fault == "blackhole":
                        proxy.timeout(rng.uniform(200, 800))  # hold the bytes, then close
                    else:
                        proxy.limit_data(rng.randint(2_000, 50_000), direction="downstream")
                    survived[fault] += 1
                    await trio.sleep(rng.uniform(0.2, 1.0))
                    proxy.clear()
            finally:
                proxy.clear()

        config = DemoConfig(
            duration=duration,
            clients=8,
            size=4,
            seed=seed,
            faults="heavy",
            dsn=proxy.rewrite(server.dsn),
            progress="off",
        )
        with trio.fail_after(duration + 120):  # no task may hang
            result = await run_demo(config, monitor)
    stats = proxy.statistics()
    print(
        f"\nsoak seed={seed} {result.elapsed:.0f}s: network faults survived "
        f"{dict(sorted(survived.items()))}; driver faults {dict(sorted(result.injected.items()))};"
        f" links={stats.links_accepted} resets={stats.resets}; outcomes "
        f"{dict(sorted(result.stats.outcomes.items()))}"
    )
    assert result.check.ok, result.check.problems
    assert sum(survived.values()) > 0
    assert result.stats.outcomes.get("committed", 0) > 0
