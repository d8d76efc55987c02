"""Session state on SQLite: which statements may leave some behind, and how to drop it.

Why: a pooled connection outlives its client. ``reset="auto"`` resets only after a lease that
may have changed the session; the reset drops temporary tables, views and triggers, detaches
every attached database and puts back the connection-level pragmas that differ from what they
were when the connection was opened (``query_only`` is the driver's own and is left alone).
Rules: the functions here run in the connection's worker thread, on its raw handle.
"""

from __future__ import annotations

import re
import sqlite3

from actors.sqltext import found

__all__ = ["PRAGMAS", "leaves_session_state", "reset_session_sync", "snapshot_pragmas"]

PRAGMAS = (
    "foreign_keys",
    "recursive_triggers",
    "defer_foreign_keys",
    "ignore_check_constraints",
    "reverse_unordered_selects",
    "automatic_index",
    "temp_store",
    "trusted_schema",
    "legacy_alter_table",
    "busy_timeout",
    "cell_size_check",
)
"""Connection-level pragmas a lease may change and the reset puts back (none of them reads the
schema, so taking the baseline takes no lock)."""

_STATE = re.compile(
    r"\bpragma\b|\battach\b|\bdetach\b|\bcreate\s+(?:temp|temporary)\b|"
    r"\btemp['\"`\]]?\s*\.",
    re.IGNORECASE,
)


def leaves_session_state(query: str) -> bool:
    """Whether running ``query`` may leave session state for the next lease (errs on True);
    the text is checked as it is and with its comments and literals blanked out."""
    return found(query, _STATE)


def snapshot_pragmas(raw: sqlite3.Connection) -> dict[str, object]:
    """The values of :data:`PRAGMAS` now (the baseline a reset returns to)."""
    values: dict[str, object] = {}
    for name in PRAGMAS:
        row = raw.execute(f"PRAGMA {name}").fetchone()
        if row is not None:
            values[name] = row[0]
    return values


def reset_session_sync(raw: sqlite3.Connection, baseline: dict[str, object]) -> None:
    """Drop temporary objects, detach attached databases, restore the pragmas."""
    temp = raw.execute(
        "SELECT type, name FROM temp.sqlite_master WHERE type IN ('table', 'view', 'trigger')"
        " AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    for kind, name in temp:
        quoted = '"' + str(name).replace('"', '""') + '"'
        raw.execute(f"DROP {str(kind).upper()} IF EXISTS temp.{quoted}")
    for _, name, _ in raw.execute("PRAGMA database_list").fetchall():
        if name not in ("main", "temp"):
            quoted = '"' + str(name).replace('"', '""') + '"'
            raw.execute(f"DETACH DATABASE {quoted}")
    for name, value in baseline.items():
        row = raw.execute(f"PRAGMA {name}").fetchone()
        if row is not None and row[0] != value:
            raw.execute(f"PRAGMA {name} = {int(value) if isinstance(value, bool) else value}")
