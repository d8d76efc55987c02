"""The one number check every option, limit and argument goes through.

Options are checked where they enter (``open_pool``, ``SafetyLimits``, ``Backoff``, a handle
method's argument) and never again, and every check says the same thing the same way: which
value, what it must be, what it was, and which pool.
"""

from __future__ import annotations

import math
from typing import Any

from supervisor.errors import ConfigError

__all__ = ["check_number"]


def check_number(
    what: str,
    value: Any,
    *,
    pool: str | None = None,
    optional: bool = False,
    zero: bool = False,
    integer: bool = False,
    finite: bool = False,
    unit: str = "",
) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a number ``> 0`` (``>= 0`` with ``zero``).

    ``optional``: ``None`` is allowed. ``integer``: only ``int`` (never ``bool``). ``finite``:
    no infinity. NaN is always refused. ``what`` names the value in the message (for example
    ``"option size"``); ``unit`` is added after "a number" (``" of seconds"``).
    """
    if value is None and optional:
        return
    kinds: type | tuple[type, ...] = int if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kinds)
    if ok and not integer:
        ok = not math.isnan(value) and (not finite or math.isfinite(value))
    if ok:
        ok = value >= 0 if zero else value > 0
    if not ok:
        kind = "an integer" if integer else f"a {'finite ' if finite else ''}number{unit}"
        bound = ">= 0" if zero else "> 0"
        raise ConfigError(
            f"{what} must be {kind} {bound}{' or None' if optional else ''}, not {value!r}",
            pool=pool,
        )
