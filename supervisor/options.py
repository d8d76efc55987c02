"""Pool options: one frozen, self-validating object, checked once where it is made.

``open_pool(target, **options)`` turns its keyword arguments into a :class:`PoolOptions` through
:meth:`PoolOptions.build`, which resolves ``size`` into ``min_size`` / ``max_size`` and the pool
name; ``__post_init__`` is the one validator. A bad value raises ``ConfigError`` naming the option
and the pool, before anything is started, and changes nothing. Every layer above reads the
options from this object; none checks them again.
"""

from __future__ import annotations

import inspect
import itertools
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, final

from supervisor.backoff import Backoff
from supervisor.errors import ConfigError
from supervisor.limits import SafetyLimits
from supervisor.log import LogHook
from supervisor.rows import RowFactory, tuple_row
from supervisor.validate import check_number

__all__ = ["DEFAULT_SETTINGS", "Configure", "PoolOptions", "ResetMode", "SessionSettings"]

ResetMode = Literal["auto", "always", "never"]
"""How a lease's session state is cleaned before the next lease (``open_pool(reset=...)``; a
custom async function counts as ``"always"`` for the sessions)."""


@final
@dataclass(frozen=True, slots=True)
class SessionSettings:
    """The pool options a session reads on every call."""

    row_factory: RowFactory = tuple_row
    statement_cache_size: int = 100
    reset: ResetMode = "auto"


DEFAULT_SETTINGS = SessionSettings()

Configure = Callable[
    [Mapping[str, Any], int], Mapping[str, Any] | Awaitable[Mapping[str, Any]]
]
"""The ``configure=`` hook: ``fn(options, index) -> options`` (plain or async) before every
connect: credential rotation."""

_names = itertools.count(1)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,30}")

DEFAULT_SIZE = 10


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class PoolOptions:
    """Every pool option, validated. See :func:`supervisor.open_pool` for what each one means."""

    name: str
    min_size: int = DEFAULT_SIZE
    max_size: int = DEFAULT_SIZE
    queue_target: float = 0.05
    queue_interval: float = 1.0
    backoff: Backoff = field(default_factory=Backoff)
    idle_interval: float = 1.0
    max_idle: float | None = 600.0
    max_lifetime: float | None = None
    after_connect: Callable[[Any], Awaitable[Any]] | None = None
    configure: Configure | None = None
    limits: SafetyLimits = field(default_factory=SafetyLimits)
    log: LogHook | None = None
    log_params: bool = False
    max_restarts: int = 10
    restart_window: float = 60.0
    seed: int | None = None
    row_factory: RowFactory = tuple_row
    statement_cache_size: int = 100
    reset: ResetMode | Callable[[Any], Awaitable[Any]] = "auto"

    def __post_init__(self) -> None:
        pool = self.name
        if not isinstance(pool, str) or not pool:
            raise ConfigError(f"option name must be a non-empty string, not {pool!r}")

        def number(
            option: str, *, optional: bool = False, zero: bool = False, integer: bool = False
        ) -> None:
            check_number(f"option {option}", getattr(self, option), pool=pool,
                         optional=optional, zero=zero, integer=integer)

        number("min_size", integer=True, zero=True)
        number("max_size", integer=True)
        if self.min_size > self.max_size:
            raise ConfigError(
                f"option min_size ({self.min_size}) must not exceed max_size ({self.max_size})",
                pool=pool,
            )
        for option in ("queue_target", "queue_interval", "idle_interval", "restart_window"):
            number(option)
        number("max_idle", optional=True)
        number("max_lifetime", optional=True)
        number("max_restarts", integer=True, zero=True)
        if not isinstance(self.backoff, Backoff):
            raise ConfigError(f"option backoff must be a Backoff, not {self.backoff!r}", pool=pool)
        if not isinstance(self.limits, SafetyLimits):
            raise ConfigError(
                f"option limits must be a SafetyLimits, not {self.limits!r}", pool=pool
            )
        for option in ("after_connect", "configure", "log"):
            fn = getattr(self, option)
            if fn is not None and not callable(fn):
                raise ConfigError(f"option {option} must be callable, not {fn!r}", pool=pool)
        hook = self.after_connect
        if inspect.isfunction(hook) and not inspect.iscoroutinefunction(hook):
            raise ConfigError(
                "option after_connect must be an async function (async def f(conn)), "
                f"not the plain function {hook.__name__!r}",
                pool=pool,
            )
        if not isinstance(self.log_params, bool):
            raise ConfigError(
                f"option log_params must be True or False, not {self.log_params!r}", pool=pool
            )
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"option seed must be an integer or None, not {seed!r}", pool=pool)
        if not callable(self.row_factory):
            raise ConfigError(
                "option row_factory must be a row factory such as supervisor.rows.dict_row, "
                f"not {self.row_factory!r}",
                pool=pool,
            )
        number("statement_cache_size", integer=True)
        reset = self.reset
        if isinstance(reset, str):
            if reset not in ("auto", "always", "never"):
                raise ConfigError(
                    f"option reset must be 'auto', 'always', 'never' or an async function, "
                    f"not {reset!r}",
                    pool=pool,
                )
        elif not callable(reset) or (
            inspect.isfunction(reset) and not inspect.iscoroutinefunction(reset)
        ):
            raise ConfigError(
                "option reset must be 'auto', 'always', 'never' or an async function "
                f"(async def reset(conn)), not {reset!r}",
                pool=pool,
            )

    @property
    def session_settings(self) -> SessionSettings:
        """What every session of the pool reads (a custom reset function resets always)."""
        reset = self.reset if isinstance(self.reset, str) else "always"
        return SessionSettings(
            row_factory=self.row_factory,
            statement_cache_size=self.statement_cache_size,
            reset=reset,
        )

    @classmethod
    def build(
        cls,
        target: object,
        *,
        size: int | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        name: str | None = None,
        backoff: Backoff | None = None,
        limits: SafetyLimits | None = None,
        **options: Any,
    ) -> PoolOptions:
        """The options of ``open_pool(target, **options)``: resolve the sizes (``size`` or
        ``min_size`` / ``max_size``, default 10) and the name (given, or ``<scheme>-<n>``,
        never built from the target's text, which may hold a password), then validate."""
        if name is None:
            if isinstance(target, str):
                scheme = target.split(":", 1)[0]
            else:
                scheme = str(getattr(target, "name", None) or "pool")
            if not _SCHEME.fullmatch(scheme):
                scheme = "pool"
            name = f"{scheme}-{next(_names)}"
        elif not isinstance(name, str) or not name:
            raise ConfigError(f"option name must be a non-empty string, not {name!r}")
        if size is not None and (min_size is not None or max_size is not None):
            raise ConfigError("give either size or min_size/max_size, not both", pool=name)
        if size is not None:
            check_number("option size", size, pool=name, integer=True)
            lo = hi = size
        elif min_size is None and max_size is None:
            lo = hi = DEFAULT_SIZE
        else:
            lo = min_size if min_size is not None else 0
            if max_size is not None:
                hi = max_size
            else:
                check_number("option min_size", lo, pool=name, integer=True, zero=True)
                hi = max(lo, DEFAULT_SIZE)
        return cls(
            name=name,
            min_size=lo,
            max_size=hi,
            backoff=Backoff() if backoff is None else backoff,
            limits=SafetyLimits() if limits is None else limits,
            **options,
        )
