"""pytest configuration shared by every test under tests/.

Fixtures shared by several test modules belong here; none is shared yet (a fixture used by one
module stays in it, and the PostgreSQL suite has its own in ``tests/postgres/conftest.py``).

Helper *functions* do not live here: a ``conftest.py`` is loaded by pytest, not meant to be
imported by name (its module name depends on the layout and the import mode). They live in
plain modules next to this file and are imported by name:

* ``tests/helpers.py``: ``settle()``, scripted-driver steps (``hang``, ``gate_step``), holding
  a connection in another task (``hold_until``, ``held``), the protocol operations (``ops``,
  ``QUIET``);
* ``tests/sqlite_helpers.py``: synchronising with real SQLite worker threads, ground-truth counts.

``from helpers import settle`` works because tests/ has no ``__init__.py``: with pytest's default
``prepend`` import mode, loading this file (and any test module here) puts tests/ on
``sys.path``. Under ``--import-mode=importlib`` such helper modules would not be importable.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--soak-minutes N``: how long tests/faults/test_soak.py runs (default 1: about 60 s,
    which is what CI runs)."""
    parser.addoption(
        "--soak-minutes",
        type=float,
        default=1.0,
        help="minutes the fault soak (tests/faults/test_soak.py) runs; default 1",
    )
