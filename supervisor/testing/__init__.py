"""Tools to test code that uses a pool, and the pool itself, against real failures.

``open_chaos_proxy``: a TCP proxy on 127.0.0.1 with Toxiproxy's toxics (latency, bandwidth,
slow_close, timeout, reset_peer, slicer, limit_data, down/up), deterministic under ``seed``.
"""

from supervisor.testing.chaos import (
    ChaosProxy,
    ChaosStatistics,
    Direction,
    Toxic,
    open_chaos_proxy,
)

__all__ = ["ChaosProxy", "ChaosStatistics", "Direction", "Toxic", "open_chaos_proxy"]
