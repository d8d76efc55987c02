"""The command line: ``python -m supervisor demo | bench | check`` (each is one entry of
:data:`COMMANDS`), run by ``supervisor/__main__.py``.

* ``demo``: the bank-transfer workload under injected faults, with an integrity check.
* ``bench``: the checkout-cycle microbenchmark (ratios to one Trio checkpoint).
* ``check URL``: open a pool on a database, run one query, print what happened: a quick way
  to see that a DSN, credentials and the driver work.

``main(argv)`` returns the exit status instead of exiting, so tests can run a command
in-process. This module holds the parser; each command is a module of this package
(:mod:`~supervisor.cli.demo`, :mod:`~supervisor.cli.bench`, :mod:`~supervisor.cli.check`),
imported only when its command runs (``demo``'s when the parser is built: its flags and help
text are there). These are applications of the library: they use its public API only.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeAlias

from supervisor import __version__
from supervisor.cli.args import Bound

__all__ = ["COMMANDS", "Parser", "build_parser", "interrupted", "main"]

Subparsers: TypeAlias = "argparse._SubParsersAction[Parser]"
"""What ``ArgumentParser.add_subparsers()`` returns (a class argparse names privately)."""


class Parser(argparse.ArgumentParser):
    """argparse's parser, with a usage error always two lines: one usage line (the short form
    when the full one does not fit on a line) and ``prog: error: message``; exit status 2."""

    def error(self, message: str) -> NoReturn:
        usage = self.format_usage().strip()
        if "\n" in usage:
            usage = f"usage: {self.prog} [options] (--help lists them)"
        self.exit(2, f"{usage}\n{self.prog}: error: {message}\n")


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a Ctrl-C: a KeyboardInterrupt, or an exception group holding one
    (how Trio delivers it from inside a nursery)."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    return isinstance(exc, BaseExceptionGroup) and exc.split(KeyboardInterrupt)[0] is not None


def _demo(args: argparse.Namespace) -> int:
    from supervisor.cli.demo import demo_command

    return demo_command(args)


def _plain(docstring: str) -> str:
    """A docstring as --help text: without reST roles and double backquotes."""
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", docstring).replace("``", "").strip()


def _add_demo(sub: Subparsers) -> None:
    from supervisor.cli.demo import __doc__ as demo_doc
    from supervisor.cli.demo import add_demo_arguments

    parser = sub.add_parser(
        "demo",
        help="bank transfers under injected faults, then an integrity check",
        description=_plain((demo_doc or "").split("\n\n", 1)[-1]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_demo_arguments(parser)
    parser.set_defaults(command=_demo)


def _bench(args: argparse.Namespace) -> int:
    from supervisor.cli.bench import run

    n: int = args.n
    rounds: int = args.rounds
    return run(n, rounds)


def _add_bench(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "bench",
        help="checkout-cycle microbenchmark, as ratios to one trio checkpoint",
        description="Measure the uncontended checkout-and-return cycle (and a transaction "
        "and a one-shot query) against a no-op driver, in microseconds and as a ratio to one "
        "trio.lowlevel.checkpoint() measured in the same run.",
    )
    parser.add_argument(
        "-n", type=Bound(int), default=20000, help="operations per round (default: 20000)"
    )
    parser.add_argument(
        "--rounds", type=Bound(int), default=7, help="rounds; the median is shown (default: 7)"
    )
    parser.set_defaults(command=_bench)


def _check(args: argparse.Namespace) -> int:
    from supervisor.cli.check import run

    url: str = args.url
    timeout: float = args.timeout
    return run(url, timeout)


def _add_check(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "check",
        help="connect to a database URL and run one query",
        description="Open a one-connection pool on URL (postgresql://..., sqlite:///path), run "
        "'select 1' and report; exit status 1 with the reason if that fails. No password is "
        "ever printed. An SQLite file is opened read-only and never created.",
    )
    parser.add_argument("url", help="database URL, e.g. postgresql://user@host/db")
    parser.add_argument(
        "--timeout",
        type=Bound(float, positive=True),
        default=10.0,
        metavar="SECONDS",
        help="how long to keep trying to connect and run the query (default: 10)",
    )
    parser.set_defaults(command=_check)


COMMANDS: dict[str, Callable[[Subparsers], None]] = {
    "demo": _add_demo,
    "bench": _add_bench,
    "check": _add_check,
}
"""Subcommand name -> function that registers its parser (and sets ``command``)."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand of :data:`COMMANDS`."""
    parser = Parser(
        prog="python -m supervisor",
        description="trio-connection-supervisor: database connections owned by supervised "
        "actors, for Trio.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status:
    0 success, 1 the command's check failed, 2 bad usage, 130 interrupted (Ctrl-C: one line
    on stderr, no traceback)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already reported
        return exc.code if isinstance(exc.code, int) else 2
    command = getattr(args, "command", None)
    if command is None:
        parser.print_help()
        return 2
    try:
        status: int = command(args)
    except BaseException as exc:
        if not interrupted(exc):
            raise
        print("interrupted", file=sys.stderr)
        return 130
    return status
