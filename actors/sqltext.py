"""SQL text scanning shared by the drivers' session-state checks (``reset="auto"``).

Why: deciding whether a statement may leave session state behind is a cheap text scan
(:func:`actors.pgsql.leaves_session_state`, :func:`actors.sqlite.session.leaves_session_state`),
and a scan that finds keywords across comments (``CREATE /* why */ TEMP TABLE``) or hidden by a
quoted name (``SET"search_path"``) needs the comments, literals and quotes out of the way.

Rules:

* one linear pass, never a backtracking pattern (a regex that skipped comments with a nested
  loop took 14 s on 24 block comments);
* it errs on the side of "may leave state": whatever it cannot read for sure (an unterminated
  literal, quoted name, dollar quote or comment, a nested block comment, a stray ``*/``) makes
  :func:`blank_comments_and_literals` return None, and :func:`found` then answers True;
* what it understands: ``'...'`` (``''`` inside), ``E'...'`` (backslash escapes), ``"..."``
  (``""`` inside; the quotes are dropped, the name kept), ``$tag$...$tag$``, ``--`` and
  ``/* */`` comments.
"""

from __future__ import annotations

import re

__all__ = ["blank_comments_and_literals", "found"]

# The next token that is not plain SQL text; each alternative starts with a distinct character
# and its body cannot match in two ways, so a search from any position is linear.
_SPECIAL = re.compile(
    r"(?P<e>(?<![\w$])[eE]'(?:[^'\\]|\\.|'')*(?P<e_end>'?))"
    r"|(?P<s>'(?:[^']|'')*(?P<s_end>'?))"
    r"|(?P<q>\"(?P<name>(?:[^\"]|\"\")*)(?P<q_end>\"?))"
    r"|(?P<dollar>(?<![\w$])\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*)?\$)"
    r"|(?P<line>--[^\n]*)"
    r"|(?P<block>/\*(?:[^*/]|\*(?!/)|/(?!\*))*(?P<b_end>\*/|/\*)?)"
    r"|(?P<stray>\*/)",
    re.DOTALL,
)


def blank_comments_and_literals(text: str) -> str | None:
    """``text`` with each comment replaced by a space, each string (and dollar-quoted) literal
    by ``''``, and each quoted name by the name between spaces; None when the text cannot be
    read for sure (see the module rules)."""
    out: list[str] = []
    pos = 0
    while True:
        m = _SPECIAL.search(text, pos)
        if m is None:
            out.append(text[pos:])
            return "".join(out)
        out.append(text[pos : m.start()])
        kind = m.lastgroup
        if kind in ("e", "s"):
            if not m.group(f"{kind}_end"):
                return None  # unterminated
            out.append("''")
            pos = m.end()
        elif kind == "q":
            if not m.group("q_end"):
                return None
            out.append(" " + m.group("name").replace('""', '"') + " ")
            pos = m.end()
        elif kind == "dollar":
            close = text.find(m.group(), m.end())
            if close < 0:
                return None
            out.append("''")
            pos = close + len(m.group())
        elif kind == "line":
            out.append(" ")
            pos = m.end()
        elif kind == "block":
            if m.group("b_end") != "*/":
                return None  # unterminated, or a nested comment
            out.append(" ")
            pos = m.end()
        else:
            return None  # a "*/" outside any comment


def found(text: str, *patterns: re.Pattern[str]) -> bool:
    """Whether one of ``patterns`` matches ``text`` as it is, or with its comments and literals
    blanked out; True also when the text cannot be read for sure (see the module rules)."""
    if any(p.search(text) is not None for p in patterns):
        return True
    bare = blank_comments_and_literals(text)
    return bare is None or any(p.search(bare) is not None for p in patterns)
