"""PostgreSQL SQL knowledge shared by every PostgreSQL driver (native psycopg, and the hosted
asyncio drivers): which statements may leave session state behind, and how to drop it.

Why: a pooled connection outlives its client, and ``reset="auto"`` resets a session only after a
lease that may have changed it, so the clean path costs no round trip. Rules: the check is a
cheap text scan that errs on the side of True; the reset is ``DISCARD ALL`` (settings, roles,
temporary tables, ``LISTEN``, session advisory locks, ``PREPARE``-d statements, ``WITH HOLD``
cursors), which also deallocates psycopg's own prepared statements: psycopg notices the
``DISCARD ALL`` command status and forgets them, and the driver forgets its own record.
"""

from __future__ import annotations

import re

from actors.sqltext import found

__all__ = ["RESET_SQL", "leaves_session_state"]

RESET_SQL = "DISCARD ALL"

# Statements that start a session-level change (matched at the start of the text or after a
# ";", on the text as it is and on the text with comments and string literals blanked out).
_STARTS = re.compile(
    r"(?:^|;)\s*"
    r"(?:set\b(?!\s*(?:local|transaction|constraints)\b)|reset\b|listen\b|unlisten\b|prepare\b|"
    r"deallocate\b|declare\b[^;]*\bwith\s+hold\b|"
    r"create\s+(?:unlogged\s+)?table\b[^;]*\bon\s+commit\b|load\b|discard\b|do\b|"
    r"select\s+[^;]*\bset_config\s*\()",
    re.IGNORECASE,
)
# Anywhere in the text: session-level calls (the _xact_ variants end with the transaction) and
# temporary objects, however the statement that makes them starts (WITH ... SELECT INTO TEMP,
# EXPLAIN ANALYZE CREATE TEMP TABLE ... AS, an object made in the pg_temp schema).
_ANYWHERE = re.compile(
    r"\bset_config\s*\(|\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(|\bdblink_connect(?:_u)?\b|"
    r"\bcreate\s+(?:or\s+replace\s+)?(?:(?:global|local)\s+)?temp(?:orary)?\b|"
    r"\binto\s+(?:(?:global|local)\s+)?temp(?:orary)?\b|"
    r"\bpg_temp(?:_\d+)?\"?\s*\.",
    re.IGNORECASE,
)
_QUICK = re.compile(
    r"set|reset|listen|prepare|deallocate|declare|temp|load|discard|\bdo\b|advisory|dblink",
    re.IGNORECASE,
)


def leaves_session_state(query: str) -> bool:
    """Whether running ``query`` may leave session state for the next lease (errs on True)."""
    if _QUICK.search(query) is None:  # the common case: a plain DML or SELECT
        return False
    return found(query, _STARTS, _ANYWHERE)
