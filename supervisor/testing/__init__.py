"""Tools to test code that uses a pool, and the pool itself, against real failures.

``open_chaos_proxy``: a TCP proxy on 127.0.0.1 with Toxiproxy's toxics (latency, bandwidth,
slow_close, timeout, reset_peer, slicer, limit_data, down/up), deterministic under ``seed``.

``sandbox``: Ecto's SQL.Sandbox for Trio: a test's work on one connection, inside a
transaction rolled back when its block ends, shared with the tasks it starts.
"""

from supervisor.testing.chaos import (
    ChaosProxy,
    ChaosStatistics,
    Direction,
    Toxic,
    open_chaos_proxy,
)
from supervisor.testing.sandbox import Sandbox, sandbox

__all__ = [
    "ChaosProxy",
    "ChaosStatistics",
    "Direction",
    "Sandbox",
    "Toxic",
    "open_chaos_proxy",
    "sandbox",
]
