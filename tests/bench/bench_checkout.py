"""Checkout-cycle microbenchmark: ``python tests/bench/bench_checkout.py [N]``.

The implementation lives in :mod:`supervisor.cli.bench` so that ``python -m supervisor bench``
works from an installed package too.
"""

import sys

from supervisor.cli.bench import run

if __name__ == "__main__":
    raise SystemExit(run(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
