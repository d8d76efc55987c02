"""A chaos proxy: a Trio TCP proxy on 127.0.0.1 that breaks links on purpose.

Why: a pool's promises (a dead link surfaces as ``ConnectionLost``, the pool recovers, every
wait is bounded) are only worth what they were tested against. Scripted drivers test the logic;
this proxy tests the real driver over a real socket that is slow, stalled, cut or reset, the way
Toxiproxy does, but in-process, with no daemon, and deterministic under ``seed``.

The rules:

* The proxy listens on 127.0.0.1 only, on a port the OS picks; it forwards to whatever
  ``(host, port)`` it was given. Each accepted connection, once the proxy has connected to the
  target, is a *link* with two directions: ``upstream`` (client to server) and ``downstream``
  (server to client). Each direction is a reader task, which stamps each chunk with its arrival
  time, and a writer task, which applies the toxics and sends. At most 16 chunks
  are read ahead, so a stalled direction pushes back on the sender as TCP would.
* Toxics (:class:`Toxic`, Toxiproxy's set) are looked up for every chunk, so a toxic acts on the
  live links and on new ones. Whether a toxic applies to a link is drawn once per (link, toxic)
  with probability ``toxicity``, from the proxy's seed, the link's number (links are numbered in
  the order they are accepted) and the toxic's number (toxics are numbered in the order they are
  added): the same program with the same seed makes the same choices, whatever the timing.
  Jitter and slice sizes come from one ``random.Random`` per link and direction, seeded the same
  way.
* In one direction, the toxics act in this order, whatever the order they were added in:
  timeout (hold), limit_data (cut), latency (wait), slicer (split, pause), bandwidth (pace).
* Every task of the proxy lives in the nursery of :func:`open_chaos_proxy` and ends with its
  ``async with`` block, which closes every link. No ExceptionGroup escapes: a single error comes
  out as itself. A failure of one link (a peer's reset, say) ends that link only.
* ``down()`` keeps listening (the port stays the proxy's) but accepts each new connection and
  resets it at once (SO_LINGER 0): the client's connect may succeed, its first read or write then
  fails. A target that cannot be reached is met the same way. Both count as ``links_refused``.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeVar, final, get_args

import trio

from supervisor.testing._links import Engine, Rule
from supervisor.testing._targets import rewrite_target

__all__ = ["ChaosProxy", "ChaosStatistics", "Direction", "Toxic", "open_chaos_proxy"]

Direction = Literal["both", "upstream", "downstream"]
"""Which way a toxic acts: ``upstream`` is client to server, ``downstream`` server to client."""

_T = TypeVar("_T")


class _NoPublicConstructor(type):
    """Trio's rule for classes made only by a factory: calling the class raises ``TypeError``."""

    def __call__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} has no public constructor; "
            "use `async with open_chaos_proxy(host, port) as proxy`"
        )

    def _create(cls: type[_T], *args: Any, **kwargs: Any) -> _T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc, no-any-return]


@final
@dataclass(frozen=True, slots=True)
class Toxic:
    """One toxic in force, as returned by the toxic methods; ``proxy.remove(toxic.name)``
    takes it away. ``attributes`` are its parameters, by Toxiproxy's names and units."""

    name: str
    kind: str
    direction: Direction
    toxicity: float
    attributes: tuple[tuple[str, float], ...] = ()


@final
@dataclass(frozen=True, slots=True)
class ChaosStatistics:
    """What the proxy did so far (Trio's style: a frozen snapshot, see ``statistics()``).

    ``links_accepted``: links forwarded (connected to the target); ``links_active``: of those,
    the ones still open; ``links_refused``: connections reset at once (proxy down, or target
    unreachable); ``bytes_upstream`` / ``bytes_downstream``: bytes delivered to the server / to
    the client; ``resets``: links reset by ``reset_peer()``; ``toxics``: names of the toxics in
    force, in the order they were added; ``down``: whether new links are refused.
    """

    links_accepted: int
    links_active: int
    links_refused: int
    bytes_upstream: int
    bytes_downstream: int
    resets: int
    toxics: tuple[str, ...]
    down: bool


def _check(name: str, value: object, *, low: float = 0, integer: bool = False,
           above: bool = False) -> float:
    """Validate one numeric argument (``ValueError`` or ``TypeError`` naming it)."""
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, not {value!r}")
    number = float(value)  # type: ignore[arg-type]
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, not {value!r}")
    if number < low or (above and number == low):
        raise ValueError(f"{name} must be {'>' if above else '>='} {low}, not {value!r}")
    return number


@final
class ChaosProxy(metaclass=_NoPublicConstructor):
    """A TCP proxy that misbehaves on request. Made by :func:`open_chaos_proxy`, never directly.

    ``host`` / ``port``: where clients connect (127.0.0.1, a port the OS chose); ``target``: the
    ``(host, port)`` forwarded to; ``seed``: the seed of every random choice (the one given, or
    one drawn at open: print it to replay a failing run).

    The toxic methods are plain synchronous methods (no I/O: they change what the link tasks do
    next). Each takes ``direction`` (``"both"``, ``"upstream"`` = client to server,
    ``"downstream"``), ``toxicity`` (the probability, per link, that the toxic applies) and
    ``name`` (default: the kind, numbered when taken; a name in force raises ``ValueError``), and
    returns its :class:`Toxic`. Sizes are in bytes, rates in KB = 1000 bytes per second.
    """

    def __init__(self, target: tuple[str, int], port: int, seed: int | None) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.target = target
        self.seed: int = random.SystemRandom().getrandbits(64) if seed is None else seed
        self._engine = Engine(target, self.seed)

    def __repr__(self) -> str:
        host, port = self.target
        return f"<ChaosProxy {self.host}:{self.port} -> {host}:{port} seed={self.seed}>"

    # -- targets and statistics

    def rewrite(self, target: str) -> str:
        """The same database target, through this proxy.

        A ``postgresql://`` or ``postgres://`` URL keeps its user, password, path and query;
        its host and port (and any ``host``, ``hostaddr`` or ``port`` query parameter) are
        replaced by the proxy's. A libpq keyword string (``"host=... port=... dbname=..."``)
        keeps its other keywords' values verbatim and gets ``host=127.0.0.1 port=<proxy port>``.
        Anything else raises ``ValueError`` (``TypeError`` for a non-string).
        """
        return rewrite_target(target, self.host, self.port)

    def statistics(self) -> ChaosStatistics:
        """A snapshot of the counters (:class:`ChaosStatistics`)."""
        engine = self._engine
        return ChaosStatistics(
            links_accepted=engine.accepted,
            links_active=len(engine.links),
            links_refused=engine.refused,
            bytes_upstream=engine.bytes["upstream"],
            bytes_downstream=engine.bytes["downstream"],
            resets=engine.resets,
            toxics=tuple(engine.rules),
            down=engine.down,
        )

    async def wait_active(self, count: int) -> None:
        """Wait until exactly ``count`` links are open: the synchronisation point of a test
        (a client closed, the pool connected), instead of a sleep. Cancel it to bound it."""
        _check("count", count, integer=True)
        await trio.lowlevel.checkpoint()
        while len(self._engine.links) != count:
            await self._engine.changed.wait()

    # -- toxics

    def latency(self, ms: float, jitter: float = 0, *, direction: Direction = "both",
                toxicity: float = 1.0, name: str | None = None) -> Toxic:
        """Deliver each chunk ``ms`` milliseconds (plus or minus up to ``jitter``) after it
        arrived. Chunks keep their order; the delays overlap (a stream is not slowed down
        chunk by chunk)."""
        params = {"latency": _check("ms", ms), "jitter": _check("jitter", jitter)}
        return self._add("latency", params, direction, toxicity, name)

    def bandwidth(self, kb_per_s: float, *, direction: Direction = "both",
                  toxicity: float = 1.0, name: str | None = None) -> Toxic:
        """Deliver at most ``kb_per_s`` KB (1000 bytes) per second: N bytes take at least
        N / (1000 * kb_per_s) seconds."""
        params = {"rate": _check("kb_per_s", kb_per_s, above=True)}
        return self._add("bandwidth", params, direction, toxicity, name)

    def slow_close(self, ms: float, *, direction: Direction = "both", toxicity: float = 1.0,
                   name: str | None = None) -> Toxic:
        """Pass on a peer's close (its FIN) ``ms`` milliseconds late. Closes made by the proxy
        itself (limit_data, timeout, the end of the ``async with``) are not delayed."""
        params = {"delay": _check("ms", ms)}
        return self._add("slow_close", params, direction, toxicity, name)

    def timeout(self, ms: float, *, direction: Direction = "both", toxicity: float = 1.0,
                name: str | None = None) -> Toxic:
        """Stop forwarding, and close the link ``ms`` milliseconds after the toxic met it;
        ``ms=0``: hold the link open forever, forwarding nothing (a stalled network).

        Unlike Toxiproxy, which drops the data, the bytes are held, not lost (at most
        16 chunks, then the sender's socket buffers fill): removing the toxic lets them
        through, as a network that heals delivers what TCP had in flight.
        """
        params = {"timeout": _check("ms", ms)}
        return self._add("timeout", params, direction, toxicity, name)

    def slicer(self, average_size: int, size_variation: int = 0, delay_us: float = 0, *,
               direction: Direction = "both", toxicity: float = 1.0,
               name: str | None = None) -> Toxic:
        """Split each chunk into pieces of ``average_size`` bytes (plus or minus up to
        ``size_variation``, which must be smaller), ``delay_us`` microseconds apart: every
        parser's "the message came in several reads" path."""
        size = _check("average_size", average_size, low=1, integer=True)
        variation = _check("size_variation", size_variation, integer=True)
        if variation >= size:
            raise ValueError(f"size_variation ({size_variation}) must be < average_size ({size})")
        params = {"average_size": size, "size_variation": variation,
                  "delay": _check("delay_us", delay_us)}
        return self._add("slicer", params, direction, toxicity, name)

    def limit_data(self, nbytes: int, *, direction: Direction = "both", toxicity: float = 1.0,
                   name: str | None = None) -> Toxic:
        """Close the link once ``nbytes`` bytes went through in that direction since the
        toxic met the link (``nbytes=0``: when the first data comes, forwarding none). With
        ``"both"``, each direction counts on its own."""
        params = {"bytes": _check("nbytes", nbytes, integer=True)}
        return self._add("limit_data", params, direction, toxicity, name)

    def reset_peer(self, *, toxicity: float = 1.0) -> None:
        """Reset every live link now (each with probability ``toxicity``): both sockets are
        closed with SO_LINGER 0, so both peers see a RST. A one-off action: new links are not
        affected (counted in ``statistics().resets``)."""
        engine = self._engine
        probability = _toxicity(toxicity)
        serial = engine.next_serial()
        for link in list(engine.links.values()):
            if engine.decide(link, serial, probability):
                link.abort()
                engine.resets += 1
        engine.notify()

    def down(self) -> None:
        """Refuse new links (accepted, then reset at once); live links keep working."""
        self._engine.down = True
        self._engine.notify()

    def up(self) -> None:
        """Accept new links again."""
        self._engine.down = False
        self._engine.notify()

    def remove(self, name: str) -> None:
        """Take away the toxic called ``name`` (``KeyError`` when none is in force)."""
        rules = self._engine.rules
        try:
            rule = rules.pop(name)
        except KeyError:
            raise KeyError(f"no toxic named {name!r} (in force: {list(rules)})") from None
        rule.removed.set()
        self._engine.notify()

    def clear(self) -> None:
        """Take away every toxic (``down()`` is not a toxic: ``up()`` undoes it)."""
        for rule in self._engine.rules.values():
            rule.removed.set()
        self._engine.rules.clear()
        self._engine.notify()

    # -- internals

    def _add(self, kind: str, params: dict[str, float], direction: Direction, toxicity: float,
             name: str | None) -> Toxic:
        if direction not in get_args(Direction):
            raise ValueError(f"direction must be one of {get_args(Direction)}, not {direction!r}")
        probability = _toxicity(toxicity)
        rules = self._engine.rules
        if name is None:
            name, n = kind, 1
            while name in rules:
                n += 1
                name = f"{kind}-{n}"
        elif not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, not {name!r}")
        elif name in rules:
            raise ValueError(f"a toxic named {name!r} is already in force")
        self._engine.add(
            Rule(name, kind, direction, probability, self._engine.next_serial(), params)
        )
        return Toxic(name, kind, direction, probability, tuple(params.items()))


def _toxicity(toxicity: float) -> float:
    value = _check("toxicity", toxicity)
    if value > 1:
        raise ValueError(f"toxicity must be between 0 and 1, not {toxicity!r}")
    return value


@asynccontextmanager
async def open_chaos_proxy(host: str, port: int, *,
                           seed: int | None = None) -> AsyncIterator[ChaosProxy]:
    """A :class:`ChaosProxy` on 127.0.0.1 forwarding to ``(host, port)``, for the block.

    The block's end closes every link and ends every task of the proxy. No ExceptionGroup
    escapes: the block's own exception comes out as itself (a ``KeyboardInterrupt`` first), and
    any other error raised at the same time is attached to it as a note.
    """
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a non-empty string, not {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an integer from 1 to 65535, not {port!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an integer or None, not {seed!r}")
    listener, *others = await trio.open_tcp_listeners(0, host="127.0.0.1")
    for extra in others:  # 127.0.0.1 gives one; never listen anywhere else
        extra.socket.close()
    proxy = ChaosProxy._create((host, port), listener.socket.getsockname()[1], seed)
    body: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy._engine.accept, listener, nursery)
            try:
                yield proxy
            except BaseException as exc:
                body = exc
                raise
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_single(group, body)
    finally:
        listener.socket.close()


def _raise_single(group: BaseExceptionGroup[BaseException], body: BaseException | None) -> NoReturn:
    """Raise the one exception standing for the nursery's ``group`` (supervisor.groups' rule:
    cancellations dropped, then KeyboardInterrupt, the body's error, the first; others noted)."""
    members = list({id(e): e for e in group.exceptions}.values())
    real = [e for e in members if not isinstance(e, trio.Cancelled)] or members[:1]
    winner = (next((e for e in real if isinstance(e, KeyboardInterrupt)), None)
              or next((e for e in real if e is body), None) or real[0])
    for other in real:
        if other is not winner:
            winner.add_note(f"chaos proxy: {type(other).__name__} raised at the same time: {other}")
    cause, context = winner.__cause__, winner.__context__
    try:
        raise winner.with_traceback(winner.__traceback__)
    finally:
        winner.__cause__, winner.__context__ = cause, context
        del winner, group
