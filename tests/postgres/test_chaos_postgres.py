"""The pool and the psycopg driver through the chaos proxy, against the suite's real server.

The public API only: ``open_pool`` on ``proxy.rewrite(pg_dsn)``. The proxy cuts, resets or
stalls the very socket psycopg talks over; the checks are DESIGN section 3's: a link cut by a
toxic surfaces as ``ConnectionLost`` (or, stalled, as a bounded ``QueryTimeout``), and the pool
recovers by itself once the network does. Every wait is bounded with ``fail_after``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from psycopg.conninfo import conninfo_to_dict

from supervisor import Backoff, ConnectionLost, Pool, QueryTimeout, SafetyLimits, open_pool
from supervisor.testing import ChaosProxy, open_chaos_proxy

BOUND = 30.0  # seconds: no test may take longer
FAST = Backoff(kind="exp", min=0.05, max=0.5)  # reconnect at once, not after the default 1 s


def _server(dsn: str) -> tuple[str, int]:
    """The server's TCP address in ``dsn``."""
    info = conninfo_to_dict(dsn)
    host = str(info.get("host") or "")
    if not host or host.startswith("/") or "," in host:
        pytest.skip(f"the chaos proxy needs one TCP server, not host={host!r}")
    return host, int(info.get("port") or 5432)


@asynccontextmanager
async def _through_proxy(
    dsn: str, **options: object
) -> AsyncIterator[tuple[ChaosProxy, Pool]]:
    with trio.fail_after(BOUND):
        async with open_chaos_proxy(*_server(dsn), seed=1) as proxy, open_pool(
            proxy.rewrite(dsn), backoff=FAST, **options  # type: ignore[arg-type]
        ) as pool:
            yield proxy, pool


async def test_a_pool_through_the_proxy_runs_queries(pg_dsn: str) -> None:
    async with _through_proxy(pg_dsn, size=2, name="chaos-pass") as (proxy, pool):
        assert await pool.fetch_val("select 1") == 1
        async with pool.transaction() as tx:
            assert await tx.fetch_all("select g from generate_series(1, 3) g") == [
                (1,), (2,), (3,)
            ]
        stats = proxy.statistics()
        assert stats.links_accepted >= 1
        assert stats.bytes_upstream > 0 and stats.bytes_downstream > 0


async def test_reset_peer_under_a_held_connection_is_connection_lost_then_the_pool_recovers(
    pg_dsn: str,
) -> None:
    async with _through_proxy(pg_dsn, size=1, name="chaos-reset") as (proxy, pool):
        async with pool.run() as conn:
            before = await conn.fetch_val("select pg_backend_pid()")
            proxy.reset_peer()
            with pytest.raises(ConnectionLost):
                await conn.fetch_val("select 1")
        assert proxy.statistics().resets >= 1
        after = await pool.fetch_val("select pg_backend_pid()")  # a fresh connection
        assert after != before
        assert await pool.fetch_val("select 2") == 2


async def test_a_stalled_link_is_a_bounded_query_timeout_and_the_pool_recovers_after_clear(
    pg_dsn: str,
) -> None:
    query_timeout = 0.5
    limits = SafetyLimits(query_timeout=query_timeout, connect_timeout=2.0, cleanup_timeout=1.0)
    async with _through_proxy(pg_dsn, size=1, limits=limits, name="chaos-stall") as (
        proxy,
        pool,
    ):
        assert await pool.fetch_val("select 1") == 1
        proxy.timeout(0)  # the network stalls: nothing goes through, no link is closed
        start = trio.current_time()
        with pytest.raises(QueryTimeout):
            await pool.fetch_val("select 1")
        elapsed = trio.current_time() - start
        assert query_timeout <= elapsed < query_timeout + 5
        proxy.clear()
        assert await pool.fetch_val("select 3") == 3
        assert await pool.fetch_val("select 4") == 4
