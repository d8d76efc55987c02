"""The fault matrix: one row per fault, on the real server (through the chaos proxy where the
fault is on the network), each checked with the same invariants (:mod:`matrix`).

Rows here: connect refused, authentication failure, connect hangs, after_connect raises and
hangs, ping fails, backend terminated while idle / busy / in a transaction / during COMMIT (a
real ``pg_terminate_backend`` while the server runs COMMIT), the COMMIT reply lost after it
committed, server restart under load, reset storm, blackhole under load (bytes held, then the
links cut), latency spike, bandwidth collapse, sliced packets, client cancelled
mid-transaction (random deadlines; every await point, one by one, is in
``test_cancel_points.py``), client raises inside run and transaction, lease held past
hold_timeout, the driver raises an unexpected exception (``ConnectionLost`` for the client, an
actor crash, a supervisor restart), restart intensity exceeded, overload at twice capacity.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import trio
from matrix import Outcomes, check, load, make_tables, target, told, transfer

from supervisor import Backoff, PoolError, QueueDropped, SafetyLimits, open_pool
from supervisor.testing import open_chaos_proxy

pytestmark = pytest.mark.postgresql

FAST = Backoff("exp", 0.02, 0.2)
LIMITS = SafetyLimits(checkout_timeout=10, connect_timeout=2, cleanup_timeout=2, shutdown_grace=2)


def _backends(dsn: str, app: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(
            "select pid from pg_stat_activity where application_name = %s", (app,)
        ).fetchall()
    return [int(r[0]) for r in rows]


def _terminate(dsn: str, pids: list[int]) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for pid in pids:
            c.execute("select pg_terminate_backend(%s)", (pid,))


@pytest.fixture
def dsn(pg_dsn: str) -> str:
    return pg_dsn


async def test_row_no_fault_baseline(dsn: str) -> None:
    table = make_tables(dsn)
    async with open_pool(target(dsn, table), size=3, backoff=FAST, limits=LIMITS) as pool:
        out = await load(pool, table)
        assert len(out.committed) == 6 * 20
        await check(dsn, pool, table, out)


async def test_row_connect_refused_then_the_server_comes_back(
    dsn: str, server: Any
) -> None:
    table = make_tables(dsn)
    async with open_chaos_proxy(server.host, server.port) as proxy:
        proxy.down()
        limits = SafetyLimits(checkout_timeout=1, connect_timeout=1)
        async with open_pool(target(proxy.rewrite(dsn), table), size=2, backoff=FAST,
                             limits=limits) as pool:
            out = Outcomes()
            with trio.fail_after(5):
                await transfer(pool, table, 1, 0, out)
            assert out.failed == {1}  # told within its limits, nothing written
            proxy.up()
            await pool.wait(timeout=10)
            out2 = await load(pool, table, clients=2, count=5)
            out2.merge(out)
            await check(dsn, pool, table, out2)


async def test_row_authentication_failure_is_reported_and_nothing_is_written(dsn: str) -> None:
    table = make_tables(dsn)
    bad = psycopg.conninfo.make_conninfo(target(dsn, table), password="wrong-secret-123")
    limits = SafetyLimits(checkout_timeout=1, connect_timeout=1)
    async with open_pool(bad, size=1, backoff=FAST, limits=limits) as pool:
        with trio.fail_after(5), pytest.raises(PoolError) as info:
            await pool.fetch_val("select 1")
        assert "wrong-secret-123" not in str(info.value)
        assert "password authentication failed" in str(info.value)


async def test_row_connect_hangs_and_connect_timeout_bounds_it(
    dsn: str, server: Any
) -> None:
    table = make_tables(dsn)
    async with open_chaos_proxy(server.host, server.port) as proxy:
        proxy.timeout(0)  # new links: accepted, nothing forwarded
        limits = SafetyLimits(checkout_timeout=1.5, connect_timeout=0.3)
        async with open_pool(target(proxy.rewrite(dsn), table), size=1, backoff=FAST,
                             limits=limits) as pool:
            start = trio.current_time()
            with pytest.raises(PoolError):
                await pool.fetch_val("select 1")
            assert trio.current_time() - start < 3
            proxy.clear()
            await pool.wait(timeout=10)
            out = await load(pool, table, clients=1, count=3)
            await check(dsn, pool, table, out)


@pytest.mark.parametrize("how", ["raises", "hangs"])
async def test_row_after_connect_raises_or_hangs(dsn: str, how: str) -> None:
    table = make_tables(dsn)
    calls = 0

    async def hook(conn: Any) -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            if how == "raises":
                raise RuntimeError("after_connect failed")
            await trio.sleep_forever()
        await conn.execute("set statement_timeout = '5s'")

    limits = SafetyLimits(checkout_timeout=10, connect_timeout=0.3)
    async with open_pool(target(dsn, table), size=1, backoff=FAST, limits=limits,
                         after_connect=hook) as pool:
        out = await load(pool, table, clients=2, count=5)
        assert calls >= 3
        assert len(out.committed) == 10
        await check(dsn, pool, table, out)


@pytest.mark.parametrize("when", ["idle", "busy", "in transaction"])
async def test_row_backend_terminated(dsn: str, when: str) -> None:
    table = make_tables(dsn)
    async with open_pool(target(dsn, table), size=2, backoff=FAST, limits=LIMITS,
                         idle_interval=60) as pool:
        await pool.wait()
        if when == "idle":
            _terminate(dsn, _backends(dsn, table))
            out = await load(pool, table, clients=2, count=5)
        else:
            inside = trio.Event()

            async def killer() -> None:
                await inside.wait()
                _terminate(dsn, _backends(dsn, table))

            out = Outcomes()

            async def victim() -> None:
                with told(out, 999):
                    async with pool.transaction() as tx:
                        await tx.execute(f"insert into {table}_ledger values (%s, 0)", (999,))
                        await tx.execute(f"update {table}_count set n = n + 1")
                        inside.set()
                        if when == "busy":
                            await tx.execute("select pg_sleep(5)")
                        else:
                            await trio.sleep(0.5)
                            await tx.execute("select 1")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(killer)
                nursery.start_soon(victim)
            assert out.failed == {999}
            more = await load(pool, table, clients=2, count=5)
            more.merge(out)
            out = more
        await check(dsn, pool, table, out)


@pytest.mark.parametrize(
    "fault",
    [
        "reset storm", "blackhole", "blackhole dropping bytes", "latency spike",
        "bandwidth collapse", "sliced packets",
    ],
)
async def test_row_network_fault_under_load(dsn: str, server: Any, fault: str) -> None:
    table = make_tables(dsn)
    async with open_chaos_proxy(server.host, server.port, seed=7) as proxy:
        limits = SafetyLimits(checkout_timeout=10, connect_timeout=2, query_timeout=1.0,
                              cleanup_timeout=1, shutdown_grace=2)

        async def inject() -> None:
            for _ in range(3):
                await trio.sleep(0.15)
                if fault == "reset storm":
                    proxy.reset_peer()
                elif fault == "blackhole":
                    proxy.timeout(300)  # hold the bytes, then cut the links
                elif fault == "blackhole dropping bytes":
                    proxy.limit_data(0, direction="downstream")  # replies dropped, link cut
                elif fault == "latency spike":
                    proxy.latency(150, jitter=50)
                elif fault == "bandwidth collapse":
                    proxy.bandwidth(5)
                else:
                    proxy.slicer(3, size_variation=2, delay_us=100)
                await trio.sleep(0.4)
                proxy.clear()

        async with open_pool(target(proxy.rewrite(dsn), table), size=3, backoff=FAST,
                             limits=limits) as pool:
            with trio.fail_after(60):
                out = await load(pool, table, clients=4, count=10, pause=0.02, fault=inject)
            proxy.clear()
            assert out.committed, "the load made progress"
            await check(dsn, pool, table, out)


async def test_row_client_cancelled_mid_transaction(dsn: str) -> None:
    table = make_tables(dsn)
    async with open_pool(target(dsn, table), size=2, backoff=FAST, limits=LIMITS) as pool:
        out = Outcomes()
        for n in range(1, 21):
            with trio.move_on_after(0.002 * (n % 7)):
                await transfer(pool, table, n, 0, out)
        await check(dsn, pool, table, out)  # cancelled ones are neither committed nor visible


async def test_row_client_raises_inside_run_and_transaction(dsn: str) -> None:
    table = make_tables(dsn)
    async with open_pool(target(dsn, table), size=1, backoff=FAST, limits=LIMITS) as pool:
        with pytest.raises(ZeroDivisionError):
            async with pool.transaction() as tx:
                await tx.execute(f"insert into {table}_ledger values (1, 0)")
                1 / 0  # noqa: B018
        with pytest.raises(ZeroDivisionError):
            async with pool.run() as conn:
                await conn.execute("select 1")
                1 / 0  # noqa: B018
        out = Outcomes(failed={1})
        await check(dsn, pool, table, out)


async def test_row_lease_held_past_hold_timeout(dsn: str) -> None:
    table = make_tables(dsn)
    limits = SafetyLimits(checkout_timeout=10, hold_timeout=0.3, cleanup_timeout=1)
    async with open_pool(target(dsn, table), size=1, backoff=FAST, limits=limits) as pool:
        out = Outcomes()
        with told(out, 1):
            async with pool.transaction() as tx:
                await tx.execute(f"insert into {table}_ledger values (1, 0)")
                await trio.sleep(1)
                await tx.execute("select 1")
        assert out.failed == {1} and out.errors == {"ConnectionLost": 1}
        assert pool.statistics().revoked == 1
        await check(dsn, pool, table, out)


async def test_row_overload_at_twice_capacity_keeps_the_wait_of_those_served_bounded(
    dsn: str,
) -> None:
    table = make_tables(dsn)
    waits: list[float] = []
    async with open_pool(target(dsn, table), size=2, backoff=FAST, limits=LIMITS) as pool:
        await pool.wait()
        out = Outcomes()

        async def client(index: int) -> None:
            for _ in range(15):
                start = trio.current_time()
                try:
                    async with pool.run() as conn:
                        waits.append(trio.current_time() - start)
                        await conn.execute("select pg_sleep(0.02)")
                except QueueDropped as exc:
                    out.note(exc)

        async with trio.open_nursery() as nursery:
            for index in range(4):  # 4 clients, 2 connections
                nursery.start_soon(client, index)
        waits.sort()
        assert waits[len(waits) * 9 // 10] < 0.5  # p90 of those served stays bounded
        await check(dsn, pool, table, out)


async def test_row_ping_fails_on_an_idle_connection(dsn: str) -> None:
    table = make_tables(dsn)
    from actors.faults import FaultDriver
    from actors.psycopg import PsycopgDriver

    faults = FaultDriver(PsycopgDriver(target(dsn, table)))
    replaced = trio.Event()

    def log(entry: Any) -> None:
        if entry.call == "connect" and pool_ref and pool_ref[0].statistics().connects >= 3:
            replaced.set()

    pool_ref: list[Any] = []
    async with open_pool(faults, size=2, backoff=FAST, limits=LIMITS, idle_interval=0.1,
                         log=log) as pool:
        pool_ref.append(pool)
        await pool.wait()
        faults.fail_next("ping")
        with trio.fail_after(10):
            await replaced.wait()  # the dead one replaced by its actor
        out = await load(pool, table, clients=2, count=5)
        await check(dsn, pool, table, out)


async def test_row_backend_terminated_during_commit(dsn: str) -> None:
    """A real ``pg_terminate_backend`` while the server runs COMMIT: a deferred constraint
    trigger makes COMMIT take 0.5 s on the server (it runs before the commit record is
    written), and the backend is terminated while pg_stat_activity shows it in COMMIT. The
    client is told ``ConnectionLost`` (outcome unknown to it), and nothing is visible."""
    table = make_tables(dsn)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"create function {table}_slow() returns trigger language plpgsql as"
                  " $$ begin perform pg_sleep(0.5); return null; end $$")
        c.execute(f"create constraint trigger {table}_slow after insert on {table}_ledger"
                  " deferrable initially deferred for each row"
                  f" execute function {table}_slow()")

    def in_commit() -> list[int]:
        with psycopg.connect(dsn, autocommit=True) as c:
            rows = c.execute(
                "select pid from pg_stat_activity where application_name = %s"
                " and state = 'active' and lower(query) like 'commit%%'", (table,)
            ).fetchall()
        return [int(r[0]) for r in rows]

    async with open_pool(target(dsn, table), size=2, backoff=FAST, limits=LIMITS) as pool:
        await pool.wait()
        out = Outcomes()
        victims: list[int] = []

        async def killer() -> None:
            with trio.fail_after(5):
                while not victims:  # polls the server's view, bounded by the deadline
                    victims.extend(await trio.to_thread.run_sync(in_commit))
                    await trio.sleep(0.01)
            _terminate(dsn, victims)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(killer)
                await transfer(pool, table, 7, 0, out)
        assert len(victims) == 1
        assert out.uncertain == {7} and out.errors == {"ConnectionLost": 1}
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(f"drop trigger {table}_slow on {table}_ledger")
            gone = c.execute(f"select count(*) from {table}_ledger").fetchone()
        assert gone == (0,)  # terminated before the commit record: rolled back
        more = await load(pool, table, clients=2, count=5)
        more.merge(out)
        await check(dsn, pool, table, more)


async def test_row_commit_reply_lost_after_it_committed(dsn: str) -> None:
    table = make_tables(dsn)
    from actors.faults import Fault, FaultDriver, FaultPlan
    from actors.psycopg import PsycopgDriver

    plan = FaultPlan(ops={"commit": Fault(lost_after=0.3)})
    faults = FaultDriver(PsycopgDriver(target(dsn, table)), plan, seed=3)
    async with open_pool(faults, size=2, backoff=FAST, limits=LIMITS) as pool:
        out = await load(pool, table, clients=3, count=10)
        faults.enabled = False
        assert out.uncertain, "some COMMIT replies were lost"
        await check(dsn, pool, table, out)  # exactly once, whatever the client was told


async def test_row_driver_raises_an_unexpected_exception_and_the_actor_restarts(
    dsn: str,
) -> None:
    table = make_tables(dsn)
    from actors.faults import FaultDriver
    from actors.psycopg import PsycopgDriver

    faults = FaultDriver(PsycopgDriver(target(dsn, table)))
    entries: list[Any] = []
    async with open_pool(faults, size=2, backoff=FAST, limits=LIMITS,
                         log=entries.append) as pool:
        await pool.wait()
        # a bug in the driver, in the middle of the protocol (the connection's status becomes
        # unknown): at a transaction's INSERT, and at a COMMIT
        faults.fail_next("execute", RuntimeError("a driver bug in execute"))
        faults.fail_next("commit", KeyError("a driver bug in commit"))
        out = await load(pool, table, clients=2, count=10)
        assert faults.count("forced") == 2
        await check(dsn, pool, table, out)
        stats = pool.statistics()
    assert out.errors == {"ConnectionLost": 2}  # the clients were told, as ConnectionLost
    assert stats.restarts == 2  # each crash was the actor's: restarted by the supervisor
    crashes = [str(e.error) for e in entries if e.call == "crash"]
    assert len(crashes) == 2 and "a driver bug in execute" in crashes[0] + crashes[1]


async def test_row_restart_intensity_exceeded_fails_the_pool_with_one_error(dsn: str) -> None:
    from supervisor import PoolClosed

    def configure(options: Any, index: int) -> Any:
        raise RuntimeError("always broken")

    with trio.fail_after(10), pytest.raises(PoolClosed, match="max_restarts=2"):
        async with open_pool(dsn, size=1, backoff=Backoff("exp", 0.01, 0.01), max_restarts=2,
                             configure=configure) as pool:
            await pool.fetch_val("select 1")


async def test_row_server_restart_under_load(pg_private_cluster: Any) -> None:
    dsn = pg_private_cluster.dsn
    table = make_tables(dsn)

    async def restart() -> None:
        await trio.sleep(0.3)
        await trio.to_thread.run_sync(pg_private_cluster.restart)

    limits = SafetyLimits(checkout_timeout=20, connect_timeout=2, cleanup_timeout=2,
                          shutdown_grace=2)
    async with open_pool(target(dsn, table), size=3, backoff=FAST, limits=limits,
                         queue_target=5, queue_interval=10) as pool:
        with trio.fail_after(60):
            out = await load(pool, table, clients=3, count=40, pause=0.01, fault=restart)
        stats = pool.statistics()
        assert out.committed
        assert stats.connects > 3  # every connection was replaced after the restart
        # (clients may see nothing at all: a transaction that meets a dead connection at
        # BEGIN restarts on a fresh one, counted here)
        assert len(out.failed | out.uncertain) + stats.transaction_restarts > 0
        await check(dsn, pool, table, out)
