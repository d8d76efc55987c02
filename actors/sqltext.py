"""SQL text scanning shared by the drivers' session-state checks (``reset="auto"``).

Why: deciding whether a statement may leave session state behind is a cheap text scan
(:func:`actors.pgsql.leaves_session_state`, :func:`actors.sqlite.session.leaves_session_state`),
and a scan that matches keywords across comments (``CREATE /* why */ TEMP TABLE``) needs the
comments out of the way first. Rules: one linear pass, never a backtracking pattern (a regex
that skips comments with a nested loop took 14 s on 24 block comments); the callers check the
text as it is too, so a literal taken wrongly here can only add a match, never hide one.
"""

from __future__ import annotations

import re

__all__ = ["blank_comments_and_literals"]

# Comments and single-quoted literals, each ending at its first end (or at the end of the text).
# Nested block comments, E'' escapes and dollar-quoting are not understood (see the rules).
_NOISE = re.compile(r"'(?:[^']|'')*(?:'|\Z)|--[^\n]*|/\*.*?(?:\*/|\Z)", re.DOTALL)


def _blank(match: re.Match[str]) -> str:
    return "''" if match.group().startswith("'") else " "


def blank_comments_and_literals(text: str) -> str:
    """``text`` with each comment replaced by a space and each string literal by ``''``."""
    return _NOISE.sub(_blank, text)
