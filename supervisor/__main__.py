"""The command line: ``python -m supervisor demo`` (more subcommands, ``bench`` and ``check``,
are planned; each is one entry of :data:`COMMANDS`).

``main(argv)`` returns the exit status instead of exiting, so tests can run a command
in-process.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence

__all__ = ["COMMANDS", "build_parser", "main"]


def _demo(args: argparse.Namespace) -> int:
    from supervisor.demo import demo_command

    return demo_command(args)


def _plain(docstring: str) -> str:
    """A docstring as --help text: without reST roles and double backquotes."""
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", docstring).replace("``", "").strip()


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from supervisor.demo import __doc__ as demo_doc
    from supervisor.demo import add_demo_arguments

    parser = sub.add_parser(
        "demo",
        help="bank transfers under injected faults, then an integrity check",
        description=_plain((demo_doc or "").split("\n\n", 1)[-1]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_demo_arguments(parser)
    parser.set_defaults(command=_demo)


COMMANDS: dict[str, Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = {
    "demo": _add_demo
}
"""Subcommand name -> function that registers its parser (and sets ``command``)."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="python -m supervisor",
        description="trio-connection-supervisor: database connections owned by supervised "
        "actors, for Trio.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status:
    0 success, 1 the command's check failed, 2 bad usage, 130 interrupted."""
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
