"""One-shot queries and virtual statements: work that borrows a connection for one call.

The one-shot functions run one call on the calling task's own lease when it holds one from this
pool (Racket's virtual connection: ``pool.fetch_val(...)`` inside ``async with pool.run()``
joins that connection and its transaction), otherwise on a lease taken for that call alone.
Reads are retried once on a lost connection when they ran on their own lease (crystal-db's rule,
only where it is safe); writes are never retried: a write may have committed before the
connection dropped.

A :class:`Statement` (Racket's virtual statement) is SQL text bound to a pool, prepared lazily
once per physical connection the first time it runs there, and again after a reconnect or a
session reset. The per-connection record of what is prepared is the actor's
(``Actor.statements``, least recently used evicted past ``statement_cache_size``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, final

import trio

from actors.driver import Params
from supervisor.errors import PoolError
from supervisor.handles import Connection, Stream, one_shot
from supervisor.lender import Lender
from supervisor.rows import RowFactory
from supervisor.session import Query, short

__all__ = [
    "Statement",
    "execute",
    "execute_many",
    "fetch_all",
    "fetch_column",
    "fetch_one",
    "fetch_val",
]


async def execute(lender: Lender, query: Query, params: Params) -> int:
    """One-shot :meth:`Connection.execute` (never retried)."""
    return await one_shot(lender, lambda c: c.execute(query, params), retry=False)


async def execute_many(lender: Lender, query: Query, params_seq: Iterable[Params]) -> int:
    """One-shot :meth:`Connection.execute_many` (atomic; never retried)."""
    batch = list(params_seq)
    return await one_shot(lender, lambda c: c.execute_many(query, batch), retry=False)


async def fetch_all(
    lender: Lender, query: Query, params: Params, row_factory: RowFactory | None
) -> list[Any]:
    """One-shot :meth:`Connection.fetch_all` (retried once on a lost connection)."""
    return await one_shot(
        lender, lambda c: c.fetch_all(query, params, row_factory=row_factory), retry=True
    )


async def fetch_one(
    lender: Lender, query: Query, params: Params, optional: bool, row_factory: RowFactory | None
) -> Any:
    """One-shot :meth:`Connection.fetch_one` (retried once on a lost connection)."""
    return await one_shot(
        lender,
        lambda c: c.fetch_one(query, params, optional=optional, row_factory=row_factory),
        retry=True,
    )


async def fetch_val(lender: Lender, query: Query, params: Params, optional: bool) -> Any:
    """One-shot :meth:`Connection.fetch_val` (retried once on a lost connection)."""
    return await one_shot(
        lender, lambda c: c.fetch_val(query, params, optional=optional), retry=True
    )


async def fetch_column(lender: Lender, query: Query, params: Params) -> list[Any]:
    """One-shot :meth:`Connection.fetch_column` (retried once on a lost connection)."""
    return await one_shot(lender, lambda c: c.fetch_column(query, params), retry=True)


@final
class Statement:
    """SQL text bound to a pool, prepared lazily on each physical connection it runs on.

    Made by ``pool.statement(query)`` (no I/O). Run it through the pool
    (``await stmt.fetch_all(params)``: on the calling task's connection if it holds one, else on
    a connection for that call), or pass it to any handle method in place of the SQL text
    (``await conn.fetch_one(stmt, params)``). Placeholders are the driver's own.
    """

    __slots__ = ("_lender", "_text")

    def __init__(self, lender: Lender, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"a statement's query must be SQL text, not {type(text).__name__}")
        self._lender = lender
        self._text = text

    @property
    def text(self) -> str:
        """The SQL text."""
        return self._text

    def __repr__(self) -> str:
        return f"<Statement pool={self._lender.name!r} {short(self._text, 60)!r}>"

    async def execute(self, params: Params = None) -> int:
        """Run it; return the rows affected (never retried)."""
        return await execute(self._lender, self, params)

    async def execute_many(self, params_seq: Iterable[Params]) -> int:
        """Run it once per parameter set, atomically; return the total rows affected."""
        return await execute_many(self._lender, self, params_seq)

    async def fetch_all(
        self, params: Params = None, *, row_factory: RowFactory | None = None
    ) -> list[Any]:
        """Run it; return every row."""
        return await fetch_all(self._lender, self, params, row_factory)

    async def fetch_one(
        self,
        params: Params = None,
        *,
        optional: bool = False,
        row_factory: RowFactory | None = None,
    ) -> Any:
        """Run it; return the only row (``CardinalityError`` otherwise, unless optional)."""
        return await fetch_one(self._lender, self, params, optional, row_factory)

    async def fetch_val(self, params: Params = None, *, optional: bool = False) -> Any:
        """Run it; return the only value."""
        return await fetch_val(self._lender, self, params, optional)

    async def fetch_column(self, params: Params = None) -> list[Any]:
        """Run it; return the first column of every row."""
        return await fetch_column(self._lender, self, params)

    def stream(
        self,
        params: Params = None,
        *,
        batch_size: int = 1000,
        row_factory: RowFactory | None = None,
    ) -> Stream:
        """Stream its rows on the connection the calling task holds (a stream keeps its
        connection while it is iterated, so it needs a block: ``async with pool.run()``)."""
        session = self._lender.holders.get(trio.lowlevel.current_task())
        if session is None:
            raise PoolError(
                "stmt.stream() needs a connection held by this task: use it inside "
                "`async with pool.run() as conn:` (or call conn.stream(stmt))",
                pool=self._lender.name,
            )
        return Connection(session).stream(
            self, params, batch_size=batch_size, row_factory=row_factory
        )
