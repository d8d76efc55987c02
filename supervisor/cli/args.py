"""What the commands share: argparse ``type=`` checks that name their constraint, and the one
line a command prints when it fails.

An argparse ``type=`` function that raises :class:`argparse.ArgumentTypeError` gets its message
printed as ``argument --flag: <message>`` (exit status 2), so every flag is validated with a
message that names it, before anything runs. The same objects check values that arrive without
argparse (:meth:`Bound.check`), so each constraint is written once.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

__all__ = ["Bound", "failure_line", "postgres_url", "sqlite_file"]


@dataclass(frozen=True)
class Bound:
    """A number flag: an ``int`` (or a ``float`` number of seconds) of at least ``minimum``
    (``positive``: strictly above 0). Use the instance as argparse's ``type=``."""

    kind: type[int] | type[float]
    minimum: float = 1
    why: str = ""
    positive: bool = False

    @property
    def constraint(self) -> str:
        """The rule, as the error message says it."""
        if self.kind is float:
            text = "a positive number of seconds" if self.positive else (
                f"a number of seconds >= {self.minimum:g}"
            )
        else:
            text = f"an integer of at least {self.minimum:g}"
        return f"must be {text}{self.why}"

    def check(self, value: float) -> float:
        """``value`` if it keeps the rule, else :class:`argparse.ArgumentTypeError`."""
        ok = math.isfinite(value) and (value > 0 if self.positive else value >= self.minimum)
        if not ok:
            raise argparse.ArgumentTypeError(f"{self.constraint}, got {value:g}")
        return value

    def __call__(self, text: str) -> float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{self.constraint}, got {text!r}") from None
        return self.kind(self.check(value))


def postgres_url(text: str) -> str:
    """``--dsn``: a ``postgresql://`` or ``postgres://`` URL (the value is not echoed: it may
    hold a password)."""
    if not text.lower().startswith(("postgresql://", "postgres://")):
        raise argparse.ArgumentTypeError("must be a postgresql:// or postgres:// URL")
    return text


def sqlite_file(text: str) -> str:
    """``--db``: a file path whose directory exists (the file itself may be new)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a database file")
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"directory {directory!r} does not exist")
    return text


def failure_line(exc: BaseException, url: str | None = None) -> str:
    """``failed: <reason>`` on one line, with the password of ``url`` (if any) removed.

    The pool's own messages are already scrubbed of secrets; this also covers errors raised
    before a pool exists, and folds the multi-line messages some drivers give (libpq's hints)
    into one line.
    """
    text = str(exc) or type(exc).__name__
    if url is not None:
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        for secret in {password, unquote(password)} if password else ():
            text = text.replace(secret, "***")
    return "failed: " + re.sub(r"\s+", " ", text).strip()
