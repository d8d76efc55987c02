"""The one unwrap rule: no ExceptionGroup escapes a public context manager.

``open_pool`` runs the pool's tasks in a nursery around the user's block, so what leaves that
nursery is an ExceptionGroup. Users of a context manager expect the error of their block, or
the pool's own failure, as itself (trio-websocket's rule). The rule, applied to the nursery's
own group only (an ExceptionGroup the body raised is one of its members and comes out exactly
as raised):

1. The nursery's cancellations are noise and are dropped.
2. When the pool failed (restart intensity exceeded), the supervisor's ``PoolClosed`` and the
   copies delivered to waiting clients are one failure, the pool's.
3. Of what is left, a ``KeyboardInterrupt`` wins, then the body's own exception (the very
   object it raised, or, for an ExceptionGroup that also held cancellations, the group Trio
   derived from it without them), then the first one (the pool's failure comes last).
4. The others are not lost: each one not already in the winner's context chain is attached to
   the winner as a note (``add_note``), and the first of them becomes the winner's
   ``__context__`` if it has none.
"""

from __future__ import annotations

import trio

from supervisor.errors import PoolClosed, PoolError

__all__ = ["single_error"]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _derived(a: BaseException, b: BaseException) -> bool:
    """``a`` is ``b`` with the cancellations taken out (what a cancel scope leaves of a group
    that passed through it): same leaves, less the ``Cancelled`` ones."""
    if not (isinstance(a, BaseExceptionGroup) and isinstance(b, BaseExceptionGroup)):
        return False
    keep = [leaf for leaf in _leaves(b) if not isinstance(leaf, trio.Cancelled)]
    return a.message == b.message and [id(x) for x in _leaves(a)] == [id(x) for x in keep]


def _same(a: BaseException, b: BaseException) -> bool:
    """``a`` is ``b``, or a copy Trio derived from it (same message, same leaves)."""
    if a is b:
        return True
    if isinstance(a, BaseExceptionGroup) and isinstance(b, BaseExceptionGroup):
        return (
            type(a) is type(b)
            and a.message == b.message
            and len(a.exceptions) == len(b.exceptions)
            and all(_same(x, y) for x, y in zip(a.exceptions, b.exceptions, strict=True))
        )
    return False


def single_error(
    group: BaseExceptionGroup[BaseException],
    *,
    pool: str,
    body: BaseException | None,
    failure: PoolError | None,
) -> BaseException:
    """The one exception that stands for ``group`` (see the module docstring)."""
    unique = list({id(e): e for e in group.exceptions}.values())
    real = [e for e in unique if not isinstance(e, trio.Cancelled)]
    if failure is not None:
        real = [e for e in real if not (isinstance(e, PoolClosed) and e.pool == pool)]
        if not real:
            return failure
        real.append(failure)
    if not real:
        return unique[0]
    mine: BaseException | None = None  # the body's exception, as the nursery holds it
    if body is not None:
        real = [body if _same(e, body) else e for e in real]
        mine = next((e for e in real if e is body or _derived(e, body)), None)
    interrupt = next((e for e in real if isinstance(e, KeyboardInterrupt)), None)
    winner = interrupt or mine or real[0]
    others = [e for e in real if e is not winner and not _context_has(winner, e)]
    for other in others:
        winner.add_note(
            f"pool {pool!r}: {type(other).__name__} raised at the same time: {other}"
        )
    if others and winner.__context__ is None:
        winner.__context__ = others[0]
    return winner


def _context_has(exc: BaseException, target: BaseException) -> bool:
    """Whether ``target`` is already in ``exc``'s context chain (then it need not be noted)."""
    seen: set[int] = set()
    cur: BaseException | None = exc.__context__
    while cur is not None and id(cur) not in seen:
        if cur is target:
            return True
        seen.add(id(cur))
        cur = cur.__context__
    return False
