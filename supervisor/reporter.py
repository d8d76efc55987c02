"""The reporter: one pool's counters, its log hook and its secret scrubbing.

Rules:

* The reporter is the only writer of its counters: the lender, the sessions and the supervisor
  call its methods (``dropped``, ``event`` ...), never ``+= 1`` on a field. (The lender counts
  its own checkouts: that is its state, and the hot path.)
* Every text that leaves the pool (an error message built from a driver error, a log entry)
  goes through :meth:`Reporter.scrub`; every exception handed to the log hook goes through
  :meth:`Reporter.safe_error`, which replaces one whose text (or whose chain's text) holds a
  known secret. The secrets are learnt from the driver each time connect options are made
  (:meth:`Reporter.learn_secrets`), so a rotated password is scrubbed too.
* Parameters reach the log hook only with ``log_params=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, final

import trio

from actors.driver import Params, redact
from supervisor.errors import PoolError
from supervisor.log import LogEntry, LogHook, emit

__all__ = ["Reporter"]


@final
class Reporter:
    """Counters, log entries and scrubbing for the pool called ``name``."""

    __slots__ = (
        "_log_params",
        "_secrets",
        "connects",
        "disconnects",
        "dropped_count",
        "hook",
        "last_connect_error",
        "last_connect_failure",
        "name",
        "query_timeouts",
        "recovered_at",
        "restarts",
        "revoked",
        "timeouts",
        "transaction_restarts",
    )

    def __init__(self, name: str, hook: LogHook | None, *, log_params: bool = False) -> None:
        self.name = name
        self.hook = hook
        self._log_params = log_params
        self._secrets: list[str] = []
        self.last_connect_error: str | None = None  # while connects are failing
        self.last_connect_failure: tuple[float, str] | None = None  # kept after a good connect
        self.recovered_at = -math.inf  # the first good connect after failures
        self.connects = 0
        self.disconnects = 0
        self.restarts = 0
        self.dropped_count = 0
        self.timeouts = 0
        self.revoked = 0
        self.query_timeouts = 0
        self.transaction_restarts = 0

    # -- counters -------------------------------------------------------------------------------

    def dropped(self, error: BaseException, waited: float | None = None) -> None:
        """A request was refused or shed (``QueueDropped``)."""
        self.dropped_count += 1
        if waited is not None:
            self.log(LogEntry(pool=self.name, call="dropped", error=error, pool_time=waited))

    def timed_out(self, error: BaseException, waited: float) -> None:
        """A checkout gave up (``CheckoutTimeout``)."""
        self.timeouts += 1
        self.log(LogEntry(pool=self.name, call="timeout", pool_time=waited, error=error))

    def transaction_restarted(self) -> None:
        """A transaction's connection was lost at BEGIN; it restarted on another one."""
        self.transaction_restarts += 1

    def query_timed_out(self) -> None:
        """A statement ran past ``query_timeout``."""
        self.query_timeouts += 1

    def event(
        self, event: str, index: int, *, error: BaseException | None = None, message: str = ""
    ) -> None:
        """Count a lifecycle event of connection ``index`` and pass it to the log hook."""
        if event == "connect":
            self.connects += 1
            if self.last_connect_error is not None or self.recovered_at == math.inf:
                self.recovered_at = trio.current_time()
            self.last_connect_error = None
        elif event == "connect_failed" and error is not None:
            self.last_connect_error = self.describe(error)
            self.last_connect_failure = (
                trio.current_time(), f"last connect attempt failed: {self.last_connect_error}"
            )
        elif event == "crash" and error is not None:
            # Until the restarted actor connects, its slot has no connection: waiters shed
            # meanwhile are told why, as for a failed connect.
            self.last_connect_failure = (
                trio.current_time(),
                f"connection #{index}'s actor crashed and is being restarted: "
                + self.describe(error),
            )
            self.recovered_at = math.inf  # recovered at its next connect
        elif event == "disconnect":
            self.disconnects += 1
        elif event == "revoked":
            self.revoked += 1
        elif event == "restart":
            self.restarts += 1
        if self.hook is not None:
            text = message
            if error is not None:
                text = (text + ": " if text else "") + f"{type(error).__name__}: {error}"
            self.log(
                LogEntry(
                    pool=self.name,
                    call=event,
                    connection=index,
                    error=self.safe_error(error),
                    message=self.scrub(text) or None,
                )
            )

    def connect_failed_since(self, start: float) -> str | None:
        """Why no connection could be made, if connects were failing (or a crashed actor was
        being restarted) at some moment since ``start`` (so a request that waited since then
        was kept waiting by the database or a crash, not by the load): it happened after
        ``start``, or the pool recovered only after it."""
        failure = self.last_connect_failure
        if failure is not None and (failure[0] >= start or self.recovered_at >= start):
            return failure[1]
        return None

    # -- log and secrets ------------------------------------------------------------------------

    def log(self, entry: LogEntry) -> None:
        """Pass ``entry`` to the log hook (a failing hook never breaks the caller)."""
        emit(self.hook, entry)

    def learn_secrets(self, secrets: Sequence[str]) -> None:
        """Remember more strings that must never be shown (longest first, so a secret that
        contains another is removed whole)."""
        if secrets:
            self._secrets = sorted(set(self._secrets) | set(secrets), key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """``text`` with every known secret replaced by ``***``."""
        return redact(text, self._secrets)

    def describe(self, error: BaseException) -> str:
        """``"Type: message"`` of ``error``, scrubbed of secrets (for messages and logs)."""
        return self.scrub(f"{type(error).__name__}: {error}")

    def safe_error(self, error: BaseException | None) -> BaseException | None:
        """``error`` for a log entry, or, if its text (or that of any exception it chains to)
        contains a known secret, a scrubbed stand-in with no chain: a log hook that prints
        ``entry.error`` must never print a password."""
        if error is None or self.chain_is_safe(error):
            return error
        return PoolError(self.describe(error), pool=self.name)

    def chain_is_safe(self, error: BaseException) -> bool:
        """Whether no text of ``error``, or of any exception it chains to, holds a known
        secret (only then may it be chained to an error the user sees)."""
        if not self._secrets:
            return True
        seen: set[int] = set()
        exc: BaseException | None = error
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            text = f"{exc!s} {exc!r} {getattr(exc, '__notes__', '')}"
            if any(secret and secret in text for secret in self._secrets):
                return False
            exc = exc.__cause__ or exc.__context__
        return True

    def log_params_of(self, params: Params) -> Any:
        """What the log hook may see of the parameters."""
        if params is None or self._log_params:
            return params
        return f"<{len(params)} params redacted>"
