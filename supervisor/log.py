"""The log hook: one :class:`LogEntry` per statement and per lifecycle event.

The hook is a plain function called synchronously in the task that did the work; it must be
quick. An exception raised by the hook is reported through :mod:`logging` and otherwise ignored:
logging never breaks a query. Parameters are not logged unless ``log_params=True`` (they often
hold personal data); no entry ever contains a password.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

__all__ = ["LogEntry", "LogHook"]

_logger = logging.getLogger("supervisor")


@final
@dataclass(frozen=True, slots=True)
class LogEntry:
    """What happened, where, and how long it took.

    ``call`` is the operation: a statement call (``execute``, ``fetch_all``, ``fetch_one``,
    ``fetch_val``, ``fetch_column``, ``stream``, ``prepare``, ``begin``, ``commit``, ``rollback``,
    ``savepoint``, ``release``, ``rollback_to``) or a lifecycle event (``connect``,
    ``connect_failed``, ``disconnect``, ``ping_failed``, ``recovered``, ``revoked``, ``crash``,
    ``restart``, ``dropped``, ``timeout``).
    ``pool_time`` is how long the request waited for a connection (one-shot calls only);
    ``connection_time`` how long the database call took. ``result`` is the row count or number of
    rows affected; ``error`` the exception when the call failed.
    """

    pool: str
    call: str
    connection: int | None = None
    query: str | None = None
    params: Any = None
    pool_time: float | None = None
    connection_time: float | None = None
    result: Any = None
    error: BaseException | None = None
    message: str | None = None


LogHook = Callable[[LogEntry], None]
"""The type of the ``log=`` option."""


def emit(hook: LogHook | None, entry: LogEntry) -> None:
    """Call the hook, shielding the caller from its failures."""
    if hook is None:
        return
    try:
        hook(entry)
    except Exception:
        _logger.exception("log hook of pool %r raised", entry.pool)
