"""Rewriting a PostgreSQL target so that it goes through the chaos proxy.

Private to :mod:`supervisor.testing.chaos` (``ChaosProxy.rewrite``). Why by hand and not with
``urllib.parse`` or psycopg's ``conninfo``: everything but the address must come out exactly as
it went in (a percent-encoded password, the order and spelling of the query, a quoted keyword
value), and this package imports only the standard library and Trio.

Rules: a ``postgresql://`` / ``postgres://`` URL gets the proxy's address as its netloc's host
and port (user and password kept; every host of a multi-host netloc replaced by the proxy) and
loses any ``host``, ``hostaddr`` and ``port`` query parameter, which libpq would prefer to the
netloc. A libpq keyword string loses its ``host``, ``hostaddr`` and ``port`` keywords and gets
``host=... port=...`` at the end; its other keywords keep their values verbatim (written
``key=value``). Anything else is a ``ValueError`` (a ``TypeError`` when not a string).
"""

from __future__ import annotations

from urllib.parse import unquote

__all__ = ["rewrite_target"]

_SCHEMES = ("postgresql", "postgres")
_ADDRESS = frozenset({"host", "hostaddr", "port"})


def rewrite_target(target: str, host: str, port: int) -> str:
    """``target`` with its address replaced by ``host:port`` (see the module docstring)."""
    if not isinstance(target, str):
        raise TypeError(f"target must be a string, not {type(target).__name__}")
    scheme, sep, rest = target.partition("://")
    if sep:
        if scheme.lower() not in _SCHEMES:
            raise ValueError(
                f"cannot route {scheme}:// through the chaos proxy: "
                "only postgresql:// and postgres:// URLs and libpq keyword strings"
            )
        return _rewrite_url(scheme, rest, host, port)
    entries = _keywords(target)
    if not entries:
        raise ValueError("not a database target: an empty libpq keyword string")
    kept = [text for key, text in entries if key not in _ADDRESS]
    return " ".join([*kept, f"host={host}", f"port={port}"])


def _rewrite_url(scheme: str, rest: str, host: str, port: int) -> str:
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    end = min(ends, default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, _ = netloc.rpartition("@")
    tail, hash_, fragment = tail.partition("#")
    path, _, query = tail.partition("?")
    items = [
        item for item in query.split("&")
        if item and unquote(item.partition("=")[0]) not in _ADDRESS
    ]
    query_part = "?" + "&".join(items) if items else ""
    return f"{scheme}://{userinfo}{at}{host}:{port}{path}{query_part}{hash_}{fragment}"


def _keywords(text: str) -> list[tuple[str, str]]:
    """``(keyword, "keyword=value" as written)`` for each entry of a libpq keyword string
    (libpq's syntax: spaces around ``=`` allowed; a value is single-quoted, with ``\\'`` and
    ``\\\\`` escapes, or runs to the next space)."""
    entries: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return entries
        start = i
        while i < n and (text[i].isalnum() or text[i] == "_"):
            i += 1
        key = text[start:i]
        while i < n and text[i].isspace():
            i += 1
        if not key or i >= n or text[i] != "=":
            raise ValueError(
                f"not a database target: {text!r} is neither a postgresql:// URL nor a libpq "
                f"keyword string (expected keyword=value at position {start})"
            )
        i += 1
        while i < n and text[i].isspace():
            i += 1
        value = i
        if i < n and text[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise ValueError(f"not a database target: unterminated quote in {key}=")
                if text[i] == "\\":
                    i += 2
                elif text[i] == "'":
                    i += 1
                    break
                else:
                    i += 1
        else:
            while i < n and not text[i].isspace():
                i += 2 if text[i] == "\\" else 1
        entries.append((key, f"{key}={text[value:min(i, n)]}"))
