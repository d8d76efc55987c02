"""The chaos proxy (``supervisor.testing.open_chaos_proxy``) against a small Trio echo server.

Real sockets on 127.0.0.1 and the real clock (never the autojump clock with real sockets).
Synchronisation goes through events, channels, echoed bytes and ``proxy.wait_active``; the only
timed waits are bounds: "nothing arrives within 0.3 s" (``move_on_after``) and "the toxic cost at
least its delay" (``trio.current_time``, checked from below, with a loose upper bound). Every
test runs under ``fail_after``, and every loop is bounded in count.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import pytest
import trio

from supervisor.testing import ChaosProxy, open_chaos_proxy

BOUND = 10.0  # seconds: no test may take longer
QUIET = 0.3  # seconds: "nothing arrives" is checked over this long


@dataclass
class Echo:
    port: int
    received: trio.MemoryReceiveChannel[bytes]  # every chunk the server got, in order


@asynccontextmanager
async def echo_server() -> AsyncIterator[Echo]:
    """An echo server on 127.0.0.1 (port 0), reporting each chunk it receives."""
    send, receive = trio.open_memory_channel[bytes](math.inf)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                send.send_nowait(data)
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the proxy reset the link: the test checks what the client saw

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield Echo(listeners[0].socket.getsockname()[1], receive)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def proxied(seed: int | None = None) -> AsyncIterator[tuple[ChaosProxy, Echo]]:
    with trio.fail_after(BOUND):
        async with echo_server() as echo, open_chaos_proxy(
            "127.0.0.1", echo.port, seed=seed
        ) as proxy:
            yield proxy, echo


async def connect(proxy: ChaosProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream(proxy.host, proxy.port)


async def read_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    for _ in range(n):  # at least one byte per read
        if len(data) >= n:
            break
        chunk = await stream.receive_some(n - len(data))
        assert chunk, f"closed after {len(data)} of {n} bytes"
        data += chunk
    return data


async def read_to_end(stream: trio.SocketStream, limit: int = 1 << 20) -> tuple[bytes, bool]:
    """Everything until the peer closes: (bytes, whether it ended with a reset)."""
    data = b""
    while len(data) <= limit:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return data, True
        if not chunk:
            return data, False
        data += chunk
    raise AssertionError("more data than expected")


async def echo(stream: trio.SocketStream, data: bytes) -> bytes:
    """Send ``data`` and read its echo, concurrently (large payloads would fill the buffers)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, data)
        return await read_exactly(stream, len(data))


async def nothing_arrives(stream: trio.SocketStream) -> bool:
    with trio.move_on_after(QUIET):
        await stream.receive_some(65536)
        return False
    return True


async def is_cut(stream: trio.SocketStream) -> bool:
    """Whether the link was closed or reset (a read gives EOF or a reset)."""
    try:
        return await stream.receive_some(65536) == b""
    except trio.BrokenResourceError:
        return True


# -- forwarding --------------------------------------------------------------------------------


async def test_bytes_pass_through_unchanged_both_ways() -> None:
    data = os.urandom(300_000)
    async with proxied() as (proxy, _):
        client = await connect(proxy)
        assert await echo(client, data) == data
        assert proxy.host == "127.0.0.1" and proxy.port > 0


async def test_the_block_end_closes_every_link_and_leaves_no_group() -> None:
    async with echo_server() as server:
        with trio.fail_after(BOUND):
            with pytest.raises(ZeroDivisionError) as info:
                async with open_chaos_proxy("127.0.0.1", server.port) as proxy:
                    client = await connect(proxy)
                    assert await echo(client, b"hi") == b"hi"
                    raise ZeroDivisionError("the body's own error")
            assert str(info.value) == "the body's own error"
            assert await is_cut(client)


async def test_a_proxy_has_no_public_constructor() -> None:
    with pytest.raises(TypeError, match="open_chaos_proxy"):
        ChaosProxy(("127.0.0.1", 1), 1, None)


# -- toxics ------------------------------------------------------------------------------------


async def test_latency_delays_each_direction_by_at_least_its_delay() -> None:
    async with proxied() as (proxy, _):
        client = await connect(proxy)
        assert await echo(client, b"warm") == b"warm"
        proxy.latency(100)  # on a live link, both ways: one round trip pays it twice
        start = trio.current_time()
        assert await echo(client, b"ping") == b"ping"
        elapsed = trio.current_time() - start
        assert 0.2 <= elapsed < 5


async def test_bandwidth_bounds_the_rate() -> None:
    data = os.urandom(10_000)
    async with proxied() as (proxy, _):
        proxy.bandwidth(20, direction="downstream")  # 20 KB/s: 10 000 bytes take >= 0.5 s
        client = await connect(proxy)
        start = trio.current_time()
        assert await echo(client, data) == data
        elapsed = trio.current_time() - start
        assert 0.5 <= elapsed < 5


async def test_timeout_zero_holds_the_bytes_and_keeps_the_link_open() -> None:
    async with proxied() as (proxy, _):
        client = await connect(proxy)
        assert await echo(client, b"warm") == b"warm"
        proxy.timeout(0)
        await client.send_all(b"held")
        assert await nothing_arrives(client)
        assert proxy.statistics().links_active == 1
        proxy.clear()  # the network heals: what was held goes through
        assert await read_exactly(client, 4) == b"held"


async def test_timeout_closes_the_link_after_its_delay() -> None:
    async with proxied() as (proxy, _):
        client = await connect(proxy)
        assert await echo(client, b"warm") == b"warm"
        start = trio.current_time()
        proxy.timeout(100)
        await client.send_all(b"lost")
        assert await is_cut(client)
        assert trio.current_time() - start >= 0.1
        await proxy.wait_active(0)


async def test_reset_peer_resets_every_live_link_and_new_links_work() -> None:
    async with proxied() as (proxy, _):
        clients = [await connect(proxy) for _ in range(2)]
        for client in clients:
            assert await echo(client, b"x") == b"x"
        proxy.reset_peer()
        for client in clients:
            data, reset = await read_to_end(client)
            assert (data, reset) == (b"", True)
        await proxy.wait_active(0)
        assert proxy.statistics().resets == 2
        fresh = await connect(proxy)
        assert await echo(fresh, b"again") == b"again"


async def test_limit_data_closes_the_link_after_n_bytes() -> None:
    data = bytes(range(100))
    async with proxied() as (proxy, _):
        proxy.limit_data(10, direction="downstream")
        client = await connect(proxy)
        await client.send_all(data)
        got, _ = await read_to_end(client)
        assert got == data[:10]
        await proxy.wait_active(0)


async def test_slicer_delivers_every_byte_in_several_chunks() -> None:
    data = os.urandom(1000)
    async with proxied(seed=3) as (proxy, _):
        proxy.slicer(100, 20, delay_us=5000, direction="downstream")
        client = await connect(proxy)
        await client.send_all(data)
        chunks: list[bytes] = []
        for _ in range(len(data)):
            if sum(map(len, chunks)) >= len(data):
                break
            chunks.append(await client.receive_some(65536))
            assert chunks[-1]
        assert b"".join(chunks) == data
        assert len(chunks) >= 2


async def test_slow_close_delays_the_close_a_peer_made() -> None:
    async with proxied() as (proxy, _):
        proxy.slow_close(200, direction="downstream")
        client = await connect(proxy)
        assert await echo(client, b"x") == b"x"
        start = trio.current_time()
        await client.send_eof()  # the echo server then closes; its FIN comes late
        assert await read_to_end(client) == (b"", False)
        assert 0.2 <= trio.current_time() - start < 5


async def test_down_refuses_new_links_while_live_ones_keep_working() -> None:
    async with proxied() as (proxy, _):
        live = await connect(proxy)
        assert await echo(live, b"a") == b"a"
        proxy.down()
        refused = await connect(proxy)  # the TCP connect itself succeeds
        assert await is_cut(refused)
        assert await echo(live, b"b") == b"b"
        stats = proxy.statistics()
        assert (stats.links_refused, stats.links_accepted, stats.down) == (1, 1, True)
        proxy.up()
        again = await connect(proxy)
        assert await echo(again, b"c") == b"c"
        assert proxy.statistics().links_accepted == 2


async def test_direction_upstream_holds_only_client_to_server() -> None:
    async with proxied() as (proxy, server):
        proxy.timeout(0, direction="upstream")
        client = await connect(proxy)
        await client.send_all(b"up")
        with trio.move_on_after(QUIET) as quiet:
            await server.received.receive()
        assert quiet.cancelled_caught  # the server got nothing
        proxy.clear()
        assert await server.received.receive() == b"up"
        assert await read_exactly(client, 2) == b"up"


async def test_direction_downstream_holds_only_server_to_client() -> None:
    async with proxied() as (proxy, server):
        proxy.timeout(0, direction="downstream")
        client = await connect(proxy)
        await client.send_all(b"down")
        assert await server.received.receive() == b"down"  # the server got it...
        assert await nothing_arrives(client)  # ...and its answer is held
        proxy.clear()
        assert await read_exactly(client, 4) == b"down"


# -- toxicity and seeds ------------------------------------------------------------------------


async def cut_pattern(seed: int, toxicity: float, links: int = 16) -> list[bool]:
    """For each of ``links`` links made one after another: whether limit_data(0) cut it."""
    async with proxied(seed=seed) as (proxy, _):
        proxy.limit_data(0, direction="upstream", toxicity=toxicity)
        pattern = []
        for _ in range(links):
            client = await connect(proxy)
            await client.send_all(b"x")
            pattern.append(await is_cut(client))
            await client.aclose()
            await proxy.wait_active(0)  # the next link gets the next number
        return pattern


async def test_toxicity_zero_never_applies_and_one_always_does() -> None:
    assert await cut_pattern(seed=1, toxicity=0.0, links=8) == [False] * 8
    assert await cut_pattern(seed=1, toxicity=1.0, links=8) == [True] * 8


async def test_a_seed_makes_the_choice_per_link_reproducible() -> None:
    first = await cut_pattern(seed=7, toxicity=0.5)
    assert await cut_pattern(seed=7, toxicity=0.5) == first
    assert True in first and False in first


# -- statistics and arguments ------------------------------------------------------------------


async def test_statistics_count_links_bytes_and_toxics() -> None:
    async with proxied() as (proxy, _):
        client = await connect(proxy)
        assert await echo(client, b"x" * 1000) == b"x" * 1000
        stats = proxy.statistics()
        assert (stats.links_accepted, stats.links_active, stats.links_refused) == (1, 1, 0)
        assert (stats.bytes_upstream, stats.bytes_downstream) == (1000, 1000)
        assert (stats.resets, stats.toxics, stats.down) == (0, (), False)
        first = proxy.latency(1)
        second = proxy.latency(2, direction="upstream", toxicity=0.5)
        assert (first.name, second.name) == ("latency", "latency-2")
        assert second.attributes == (("latency", 2.0), ("jitter", 0.0))
        assert proxy.statistics().toxics == ("latency", "latency-2")
        proxy.remove("latency")
        assert proxy.statistics().toxics == ("latency-2",)
        with pytest.raises(KeyError):
            proxy.remove("latency")
        await client.aclose()
        await proxy.wait_active(0)
        assert proxy.statistics().links_active == 0
        with pytest.raises(AttributeError):
            stats.resets = 1  # type: ignore[misc]


async def test_bad_toxic_arguments_are_refused() -> None:
    async with proxied() as (proxy, _):
        with pytest.raises(ValueError, match="direction"):
            proxy.latency(1, direction="sideways")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="toxicity"):
            proxy.latency(1, toxicity=1.5)
        with pytest.raises(ValueError, match="ms"):
            proxy.timeout(-1)
        with pytest.raises(ValueError, match="kb_per_s"):
            proxy.bandwidth(0)
        with pytest.raises(ValueError, match="size_variation"):
            proxy.slicer(10, 10)
        with pytest.raises(TypeError, match="nbytes"):
            proxy.limit_data(1.5)  # type: ignore[arg-type]
        proxy.latency(1, name="slow")
        with pytest.raises(ValueError, match="already"):
            proxy.latency(1, name="slow")
        assert proxy.statistics().toxics == ("slow",)


# -- rewrite -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (
            "postgresql://u:p%40ss@db.example:5432/app?sslmode=disable&application_name=x",
            "postgresql://u:p%40ss@127.0.0.1:{port}/app?sslmode=disable&application_name=x",
        ),
        ("postgres://db.example/app", "postgres://127.0.0.1:{port}/app"),
        ("postgresql://", "postgresql://127.0.0.1:{port}"),
        ("postgresql://u@[::1]:5432,other:5433/app", "postgresql://u@127.0.0.1:{port}/app"),
        (
            "postgresql:///app?host=/var/run/postgresql&port=5433&user=u",
            "postgresql://127.0.0.1:{port}/app?user=u",
        ),
        (
            "host=db.example port=5432 dbname=app password='a b\\'c'",
            "dbname=app password='a b\\'c' host=127.0.0.1 port={port}",
        ),
        ("dbname = app hostaddr=10.0.0.1", "dbname=app host=127.0.0.1 port={port}"),
    ],
)
async def test_rewrite_routes_a_postgresql_target_through_the_proxy(
    target: str, expected: str
) -> None:
    async with proxied() as (proxy, _):
        assert proxy.rewrite(target) == expected.format(port=proxy.port)


@pytest.mark.parametrize(
    "target", ["sqlite:///app.db", "mysql://h/db", "not a target", "", "dbname='open"]
)
async def test_rewrite_refuses_anything_else(target: str) -> None:
    async with proxied() as (proxy, _):
        with pytest.raises(ValueError, match=r"chaos proxy|not a database target"):
            proxy.rewrite(target)
