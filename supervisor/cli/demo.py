"""``python -m supervisor demo``: a bank-transfer workload run while faults are injected on purpose.
This module is the command: its flags, and a run with the live display and the summary;
the workload and the check are in :mod:`supervisor.cli.bank`, the display in
:mod:`supervisor.cli.display`. The rest of this docstring is the ``--help`` text.

Why it exists: to show, on a real database, that the pool loses nothing when connections die,
leases are revoked, clients are cancelled mid-transaction and the driver fails at random; and to
give users a template for their own fault-injection checks.

The workload: ``--accounts`` accounts start with 1,000 each, so the total is known.
``--clients`` tasks run transfers, each one transaction made of nested blocks:

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
pings, slow statements, driver bugs (an unexpected exception in a client's call: the client
gets ``ConnectionLost`` and the actor crashes; or while an actor recovers a connection: the
connection is replaced) and actor crashes (the pool's ``configure`` hook fails on every 8th
connect). The supervisor restarts a crashed actor, counted as ``restarts``.

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

from supervisor import PoolError
from supervisor.cli.args import Bound, failure_line, postgres_url, sqlite_file
from supervisor.cli.bank import INITIAL, DemoConfig, SetupError, Workload, run_demo
from supervisor.cli.display import Progress, print_summary, rich_installed, wants_rich

__all__ = ["BOUNDS", "add_demo_arguments", "config_from_args", "demo_command"]

BOUNDS: dict[str, Bound] = {
    "duration": Bound(float, positive=True),
    "clients": Bound(int),
    "size": Bound(int),
    "accounts": Bound(int, 2, " (a transfer needs two accounts)"),
}
"""The numeric flags and their rules: argparse's ``type=``, and :func:`config_from_args`'s
check of a namespace built without argparse."""


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's flags."""
    parser.add_argument(
        "--duration",
        type=BOUNDS["duration"],
        default=5.0,
        metavar="SECONDS",
        help="how long clients keep starting transfers (default: 5)",
    )
    parser.add_argument(
        "--clients",
        type=BOUNDS["clients"],
        default=8,
        metavar="N",
        help="concurrent client tasks running transfers (default: 8)",
    )
    parser.add_argument(
        "--size",
        type=BOUNDS["size"],
        default=4,
        metavar="N",
        help="connections in the pool; clients beyond it queue (default: 4)",
    )
    parser.add_argument(
        "--accounts",
        type=BOUNDS["accounts"],
        default=50,
        metavar="N",
        help=f"bank accounts, at least 2, each starting with {INITIAL:,} (default: 50)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="reproduces what is drawn, not what happens: each client's sequence of transfers "
        "(accounts, amounts, which ones take a fee, are vetoed, cancelled, killed or dawdle) is "
        "the same in every run with this seed, and so are the sequence of chaos actions with "
        "the pauses between them and the sequence of the fault driver's random draws. The run "
        "is timed and its tasks interleave as real time goes, so how many transfers run, which "
        "driver calls the fault draws land on, and every count in the summary differ from run "
        "to run (default: a random seed, shown in the summary)",
    )
    parser.add_argument(
        "--faults",
        choices=("none", "some", "heavy"),
        default="some",
        help="what to break on purpose: none; some (random driver errors and lost connections, "
        "lost COMMIT replies, cancelled clients, kill(), hold-timeout revocations, "
        "disconnect_all, server restarts); heavy (all of that more often, plus failing connects "
        "and pings, slow statements, driver bugs and actor crashes) (default: some)",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--db",
        metavar="PATH",
        type=sqlite_file,
        default=None,
        help="SQLite database file to use (its demo_* tables are replaced; default: a "
        "temporary file, deleted afterwards)",
    )
    target.add_argument(
        "--dsn",
        metavar="postgresql://...",
        type=postgres_url,
        default=None,
        help="run on PostgreSQL instead of SQLite (its demo_accounts and demo_ledger tables "
        "are replaced)",
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "rich", "plain", "off"),
        default="auto",
        help="live display: rich on a terminal, plain lines otherwise (default: auto; rich "
        "needs the rich package: pip install 'trio-connection-supervisor[demo]')",
    )


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """Validate the parsed flags into a :class:`DemoConfig` (ValueError naming the flag).

    argparse already applied these rules (:data:`BOUNDS`, ``--dsn``); they are checked again
    here, by the same objects, for a namespace built by code."""
    for name, bound in BOUNDS.items():
        try:
            bound.check(getattr(args, name))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--{name} {exc}") from None
    if args.dsn is not None:
        try:
            postgres_url(args.dsn)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--dsn {exc}") from None
    if args.progress == "rich" and not rich_installed():
        raise ValueError(
            "--progress rich needs the rich package: "
            "pip install 'trio-connection-supervisor[demo]'"
        )
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
    """Run ``demo`` from parsed arguments; return the exit status: 0 when the integrity check
    holds, 1 when it fails or the database cannot be used (one ``failed: ...`` line on stderr),
    2 for a bad flag."""
    stream = out if out is not None else sys.stdout
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"python -m supervisor demo: error: {exc}", file=sys.stderr)
        return 2

    async def progress(work: Workload) -> None:
        await Progress(work, stream, config.progress).run()

    try:
        result = trio.run(run_demo, config, progress)
    except (PoolError, SetupError) as exc:
        print(failure_line(exc, config.dsn), file=sys.stderr)
        return 1
    print_summary(result, stream, wants_rich(config.progress, stream))
    return result.exit_status
