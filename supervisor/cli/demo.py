"""``python -m supervisor demo``: a bank-transfer workload run while faults are injected on purpose.
This module is the command: its flags, and a run with the live display and the summary;
the workload and the check are in :mod:`supervisor.cli.bank`, the display in
:mod:`supervisor.cli.display`. The rest of this docstring is the ``--help`` text.

Why it exists: to show, on a real database, that the pool loses nothing when connections die,
leases are revoked, clients are cancelled mid-transaction and the driver fails at random; and to
give users a template for their own fault-injection checks.

The workload: ``accounts`` accounts start with ``INITIAL`` each, so the total is known. ``clients``
tasks run transfers, each one transaction made of nested blocks:

* the outer ``pool.transaction()`` (``BEGIN IMMEDIATE`` on SQLite: writers queue on the lock
  instead of failing on a stale snapshot);
* a ``tx.transaction(savepoint=True)`` block per leg (debit, credit); an overdraft violates a
  CHECK constraint inside the debit savepoint, which rolls back to it, and the client then rolls
  the whole transfer back with ``tx.rollback("insufficient funds")``;
* sometimes a fee leg in a savepoint that is rolled back on purpose (``fee.rollback()``): its
  writes must vanish while the transfer goes on;
* a flat ``tx.transaction()`` block that writes the ledger row, keyed by the transfer id;
* sometimes ``tx.rollback("audit veto")`` at the end, on purpose.

Faults (``--faults some`` / ``heavy``): random driver errors and lost connections through
:class:`actors.faults.FaultDriver` (including COMMITs that happen but whose reply is lost), clients
cancelled after a random short deadline, ``kill()`` of a client's own connection
mid-transaction, leases revoked by ``hold_timeout`` under slow clients, ``pool.disconnect_all()``,
simulated server restarts (``FaultDriver.break_all()``) and, when heavy, failing connects and
pings, slow statements, and driver bugs (an unexpected exception while an actor recovers a
connection: the connection is replaced).

The integrity check reads the database with a fresh, fault-free pool. It does not trust the
clients: a client cancelled mid-COMMIT, or whose COMMIT reply was lost, cannot know whether its
transfer committed. What must hold is: the total balance is unchanged; every account's balance
equals its initial balance plus the ledger rows into it minus those out of it (so every committed
transfer has exactly one ledger row, and no ledger row lacks its transfer); every transfer a
client saw committed is in the ledger; no transfer whose every attempt failed before COMMIT was
sent (rolled back on purpose, overdraft, ``kill()``, revocation, any error inside the block) is.
Exit status 0 only if all of that holds.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import trio

from supervisor.cli.bank import INITIAL, DemoConfig, Workload, run_demo
from supervisor.cli.display import Progress, print_summary, wants_rich

__all__ = ["add_demo_arguments", "config_from_args", "demo_command"]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's flags."""
    parser.add_argument(
        "--duration",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long clients keep starting transfers (default: 5)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=8,
        metavar="N",
        help="concurrent client tasks running transfers (default: 8)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=4,
        metavar="N",
        help="connections in the pool; clients beyond it queue (default: 4)",
    )
    parser.add_argument(
        "--accounts",
        type=int,
        default=50,
        metavar="N",
        help=f"bank accounts, each starting with {INITIAL} (default: 50)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for the workload and the fault draws (default: random, printed at the end)",
    )
    parser.add_argument(
        "--faults",
        choices=("none", "some", "heavy"),
        default="some",
        help="what to break on purpose: none; some (random driver errors and lost connections, "
        "lost COMMIT replies, cancelled clients, kill(), hold-timeout revocations, "
        "disconnect_all, server restarts); heavy (all of that more often, plus failing connects "
        "and pings, slow statements and driver bugs) (default: some)",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--db",
        metavar="PATH",
        default=None,
        help="SQLite database file to use (its demo_* tables are replaced; default: a "
        "temporary file, deleted afterwards)",
    )
    target.add_argument(
        "--dsn",
        metavar="postgresql://...",
        default=None,
        help="run on PostgreSQL instead of SQLite (its demo_accounts and demo_ledger tables "
        "are replaced)",
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "rich", "plain", "off"),
        default="auto",
        help="live display: rich on a terminal, plain lines otherwise (default: auto)",
    )


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """Validate the parsed flags into a :class:`DemoConfig` (ValueError naming the flag)."""
    for name in ("clients", "size", "accounts"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    if args.accounts < 2:
        raise ValueError("--accounts must be at least 2 (a transfer needs two accounts)")
    if not args.duration > 0:
        raise ValueError("--duration must be a positive number of seconds")
    if args.dsn is not None and not args.dsn.startswith(("postgresql://", "postgres://")):
        raise ValueError("--dsn must be a postgresql:// URL")
    return DemoConfig(
        duration=args.duration,
        clients=args.clients,
        size=args.size,
        accounts=args.accounts,
        seed=args.seed,
        faults=args.faults,
        db=args.db,
        dsn=args.dsn,
        progress=args.progress,
    )


def demo_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``demo`` from parsed arguments; return the exit status."""
    stream = out if out is not None else sys.stdout
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"python -m supervisor demo: error: {exc}", file=sys.stderr)
        return 2

    async def progress(work: Workload) -> None:
        await Progress(work, stream, config.progress).run()

    result = trio.run(run_demo, config, progress)
    print_summary(result, stream, wants_rich(config.progress, stream))
    return result.exit_status
