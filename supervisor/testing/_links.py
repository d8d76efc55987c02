"""The chaos proxy's engine: the toxics in force, the links, and the tasks that forward them.

Private to :mod:`supervisor.testing.chaos`, which validates every argument and owns the public
API; this module trusts what it is given. See that module's docstring for the rules; the ones
that shape this code:

* A link is two directions, each a reader task (stamps every chunk with its arrival time, reads
  at most ``QUEUE`` chunks ahead, so a stalled direction pushes back on its sender as TCP would)
  and a writer task (applies the toxics, sends). The writer looks the toxics up for every chunk:
  that is how a toxic acts on live links.
* Whether a toxic applies to a link is drawn once per (link, toxic) from the seed, the link's
  number and the toxic's serial number; jitter and slice sizes come from one ``random.Random``
  per link and direction seeded the same way. No draw depends on timing or on other links.
* A link's failure (a peer's reset, a send to a closed peer) ends that link, never the proxy.
"""

from __future__ import annotations

import errno
import random
import socket
import struct
from dataclasses import dataclass, field

import trio

__all__ = ["Engine", "Rule", "reset_socket"]

CHUNK = 65536
QUEUE = 16  # chunks read ahead per direction before the reader stops reading
KB = 1000  # Toxiproxy's KB
PACE = 0.01  # bandwidth: one piece is this many seconds' worth of bytes
RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
Chunk = tuple[float, bytes]
DIRECTIONS = ("upstream", "downstream")


@dataclass(eq=False, slots=True)
class Rule:
    """A toxic in force, as the engine applies it (``params`` by Toxiproxy's names)."""

    name: str
    kind: str
    direction: str
    toxicity: float
    serial: int
    params: dict[str, float]
    removed: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False, slots=True)
class Link:
    """One forwarded connection: its two sockets and the state of the toxics on it."""

    number: int
    client: trio.SocketStream
    server: trio.SocketStream
    rngs: dict[str, random.Random]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    nursery: trio.Nursery | None = None
    sent: dict[tuple[int, str], int] = field(default_factory=dict)  # limit_data counters

    def close(self) -> None:
        """End the link; its sockets are closed as its task unwinds (an orderly FIN)."""
        self.scope.cancel()

    def abort(self) -> None:
        """Reset both sockets now: the peers see a RST, not an orderly close."""
        reset_socket(self.client)
        reset_socket(self.server)
        self.scope.cancel()


def reset_socket(stream: trio.SocketStream) -> None:
    """Close ``stream`` with SO_LINGER 0, so that its peer sees a RST (synchronous: the RST is
    sent before this returns, and a task blocked on the socket is woken)."""
    sock = stream.socket
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:  # already closed
        pass
    sock.close()


class Engine:
    """The state of one proxy and its tasks (the accept loop, and per link, four pumps)."""

    def __init__(self, target: tuple[str, int], seed: int) -> None:
        self.target = target
        self.seed = seed
        self.rules: dict[str, Rule] = {}
        self.links: dict[int, Link] = {}
        self.serial = 0
        self.accepted = 0
        self.refused = 0
        self.bytes = dict.fromkeys(DIRECTIONS, 0)
        self.resets = 0
        self.down = False
        self.changed = trio.Event()

    def notify(self) -> None:
        """Wake every task waiting for a change (held writers, ``wait_active``)."""
        self.changed.set()
        self.changed = trio.Event()

    def next_serial(self) -> int:
        self.serial += 1
        return self.serial

    def add(self, rule: Rule) -> None:
        self.rules[rule.name] = rule
        for link in self.links.values():
            self.arm(link, rule)
        self.notify()

    def decide(self, link: Link, serial: int, toxicity: float) -> bool:
        """Whether the toxic numbered ``serial`` applies to ``link`` (stable, seeded)."""
        if toxicity >= 1:
            return True
        if toxicity <= 0:
            return False
        return random.Random(f"{self.seed}/{link.number}/{serial}").random() < toxicity

    def applying(self, link: Link, direction: str) -> list[Rule]:
        return [
            rule for rule in self.rules.values()
            if rule.direction in ("both", direction)
            and self.decide(link, rule.serial, rule.toxicity)
        ]

    def arm(self, link: Link, rule: Rule) -> None:
        """Start the clock of a timeout toxic (ms > 0) that meets this link."""
        if (rule.kind == "timeout" and rule.params["timeout"] > 0
                and link.nursery is not None
                and self.decide(link, rule.serial, rule.toxicity)):
            link.nursery.start_soon(self._expire, link, rule)

    async def _expire(self, link: Link, rule: Rule) -> None:
        with trio.move_on_after(rule.params["timeout"] / 1000) as clock:
            await rule.removed.wait()
        if clock.cancelled_caught:
            link.close()

    async def _hold(self, link: Link, direction: str) -> None:
        """Wait while a timeout toxic holds this direction of the link."""
        while any(r.kind == "timeout" for r in self.applying(link, direction)):
            await self.changed.wait()

    async def accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """The accept loop: every connection is served in ``nursery`` (the proxy's own)."""
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in RESOURCE_ERRORS:
                        raise
                    await trio.sleep(0.1)  # out of file descriptors: let links end first
                    continue
                nursery.start_soon(self._serve, stream)

    async def _serve(self, client: trio.SocketStream) -> None:
        """One connection: refuse it, or connect to the target and forward both ways."""
        server: trio.SocketStream | None = None
        try:
            if not self.down:
                try:
                    server = await trio.open_tcp_stream(*self.target)
                except OSError:
                    server = None
            if server is None or self.down:
                reset_socket(client)
                self.refused += 1
                self.notify()
                return
            self.accepted += 1
            number = self.accepted
            rngs = {d: random.Random(f"{self.seed}/{number}/{d}") for d in DIRECTIONS}
            link = Link(number, client, server, rngs)
            self.links[number] = link
            self.notify()
            try:
                with link.scope:
                    async with trio.open_nursery() as nursery:
                        link.nursery = nursery
                        for rule in self.rules.values():
                            self.arm(link, rule)
                        for direction, src, dst in (
                            ("upstream", client, server), ("downstream", server, client)
                        ):
                            send, receive = trio.open_memory_channel[Chunk](QUEUE)
                            nursery.start_soon(self._read, link, src, send)
                            nursery.start_soon(self._write, link, direction, receive, dst)
            finally:
                del self.links[number]
                self.notify()
        finally:
            client.socket.close()
            if server is not None:
                server.socket.close()

    async def _read(self, link: Link, src: trio.SocketStream,
                    send: trio.MemorySendChannel[Chunk]) -> None:
        async with send:
            try:
                while data := await src.receive_some(CHUNK):
                    await send.send((trio.current_time(), data))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                link.abort()  # a peer reset its side: the other peer sees a reset too

    async def _write(self, link: Link, direction: str,
                     receive: trio.MemoryReceiveChannel[Chunk], dst: trio.SocketStream) -> None:
        try:
            async with receive:
                async for arrival, data in receive:
                    if not await self._deliver(link, direction, arrival, data, dst):
                        link.close()
                        return
            await self._hold(link, direction)  # a held direction holds its FIN too
            delay = sum(r.params["delay"] for r in self.applying(link, direction)
                        if r.kind == "slow_close")
            if delay:
                await trio.sleep(delay / 1000)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            link.abort()

    async def _deliver(self, link: Link, direction: str, arrival: float, data: bytes,
                       dst: trio.SocketStream) -> bool:
        """Send one chunk through the toxics; False when the link must close after it.

        Order: timeout (hold), limit_data (cut), latency (wait), slicer (split, pause),
        bandwidth (pace)."""
        await self._hold(link, direction)
        rules = self.applying(link, direction)
        keep = True
        limits = [r for r in rules if r.kind == "limit_data"]
        for rule in limits:
            left = int(rule.params["bytes"]) - link.sent.get((rule.serial, direction), 0)
            if left <= len(data):
                data, keep = data[:max(left, 0)], False
        rng = link.rngs[direction]
        delay = sum(r.params["latency"] + rng.uniform(-r.params["jitter"], r.params["jitter"])
                    for r in rules if r.kind == "latency")
        if delay > 0:
            await trio.sleep_until(arrival + delay / 1000)
        pieces = [data]
        pause = 0.0
        for rule in (r for r in rules if r.kind == "slicer"):
            size, spread = int(rule.params["average_size"]), int(rule.params["size_variation"])
            pause += rule.params["delay"] / 1e6
            cut: list[bytes] = []
            for piece in pieces:
                while piece:
                    n = max(1, size + rng.randint(-spread, spread))
                    cut.append(piece[:n])
                    piece = piece[n:]
            pieces = cut
        rate = min((r.params["rate"] * KB for r in rules if r.kind == "bandwidth"), default=0.0)
        step = max(1, int(rate * PACE)) if rate else 0
        for i, piece in enumerate(pieces):
            if i and pause:
                await trio.sleep(pause)
            parts = [piece[j:j + step] for j in range(0, len(piece), step)] if step else [piece]
            for part in parts:
                if step:
                    await trio.sleep(len(part) / rate)
                await dst.send_all(part)
                self.bytes[direction] += len(part)
        for rule in limits:
            key = (rule.serial, direction)
            link.sent[key] = link.sent.get(key, 0) + len(data)
        return keep
