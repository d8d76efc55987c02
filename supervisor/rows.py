"""Row factories: how a result row reaches the caller.

A row factory is called once per result with the column names, as the database reported them,
and returns the function that turns one row (a tuple) into what the caller gets. ``tuple_row``
is the default and costs nothing: rows come back exactly as the driver made them.

Use one per pool (``open_pool(..., row_factory=dict_row)``) or per call
(``await conn.fetch_all(q, row_factory=namedtuple_row)``); ``fetch_val`` and ``fetch_column``
are unaffected (they return values, not rows).
"""

from __future__ import annotations

import functools
import keyword
from collections import namedtuple
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["RowFactory", "RowMaker", "class_row", "dict_row", "namedtuple_row", "tuple_row"]

T = TypeVar("T")

RowMaker = Callable[[tuple[Any, ...]], Any]
"""Turns one row (a tuple) into the caller's object."""

RowFactory = Callable[[Sequence[str]], RowMaker]
"""Given the column names of a result, returns its :data:`RowMaker`."""


def _identity(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return row


def tuple_row(columns: Sequence[str]) -> RowMaker:
    """Rows as plain tuples (the default)."""
    return _identity


def dict_row(columns: Sequence[str]) -> RowMaker:
    """Rows as ``dict`` from column name to value. With repeated column names the last wins,
    as in a dict display; name the columns (``select a.id as a_id, ...``) to keep both."""
    names = tuple(columns)

    def make(row: tuple[Any, ...]) -> dict[str, Any]:
        return dict(zip(names, row, strict=True))

    return make


@functools.lru_cache(maxsize=512)
def _namedtuple_type(names: tuple[str, ...]) -> type[Any]:
    fields = [
        name if name.isidentifier() and not keyword.iskeyword(name) else f"f{i}"
        for i, name in enumerate(names)
    ]
    seen: set[str] = set()
    for i, field in enumerate(fields):
        if field in seen or field.startswith("_"):
            fields[i] = f"f{i}"
        seen.add(fields[i])
    return namedtuple("Row", fields)


def namedtuple_row(columns: Sequence[str]) -> RowMaker:
    """Rows as named tuples (``row.id``, ``row[0]``). A column whose name is not a valid
    identifier (or repeats one) is named ``f<position>``. The tuple types are cached."""
    cls = _namedtuple_type(tuple(columns))

    def make(row: tuple[Any, ...]) -> Any:
        return cls._make(row)

    return make


def class_row(cls: Callable[..., T]) -> RowFactory:
    """Rows as ``cls(**columns)`` (a dataclass, a pydantic model, ...)."""

    def factory(columns: Sequence[str]) -> RowMaker:
        names = tuple(columns)

        def make(row: tuple[Any, ...]) -> T:
            return cls(**dict(zip(names, row, strict=True)))

        return make

    return factory
