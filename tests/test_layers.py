"""The architecture, enforced: every module imports only the layers beneath it.

The imports of every module of ``actors`` and ``supervisor`` are read with ``ast`` (all of them:
module level, inside functions and under ``TYPE_CHECKING``, which is where cycles hide), and
these rules are checked:

* no import cycle anywhere;
* ``actors`` never imports ``supervisor``; a driver package (``actors.psycopg``,
  ``actors.sqlite``, ``actors.aio``) imports only ``actors.driver``, ``actors.threads``,
  ``actors.pgsql`` (PostgreSQL's SQL, shared by the PostgreSQL drivers), ``actors.sqltext``
  (SQL text scanning) and its own package;
* inside ``supervisor``, a module imports only modules of a lower layer (:data:`LAYERS`, the
  order of docs/internals.rst); a new module must be given a layer here;
* ``supervisor.cli`` is an application: it imports only the public API (``supervisor``,
  ``supervisor.testing``), public modules of ``actors``, and no name with a leading underscore.

The checker itself is tested on small made-up graphs, so a green run means something.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("actors", "supervisor")

LAYERS: dict[str, int] = {
    # leaves
    "supervisor.errors": 0,
    "supervisor.log": 0,
    "supervisor.queue": 0,
    "supervisor.rows": 0,
    "supervisor.validate": 1,
    "supervisor.groups": 1,
    "supervisor.limits": 2,
    "supervisor.backoff": 2,
    # options and reporting
    "supervisor.options": 3,
    "supervisor.reporter": 3,
    # one lease
    "supervisor.session": 4,
    # who gets which connection
    "supervisor.lender": 5,
    # what clients hold; who runs the actors
    "supervisor.handles": 6,
    "supervisor.supervision": 6,
    "supervisor.sandbox": 6,
    # one-shots and statements over handles
    "supervisor.statements": 7,
    # the facade
    "supervisor.pool": 8,
    "supervisor": 9,
    # applications and test tools, on the public API
    "supervisor.cli": 10,
    "supervisor.testing": 10,
    "supervisor.otel": 10,
    "supervisor.__main__": 11,
}
"""Layer of each module of ``supervisor`` (a package's submodules share the package's layer
unless listed)."""

DRIVER_PACKAGES = ("actors.psycopg", "actors.sqlite", "actors.aio")
DRIVER_MAY_IMPORT = ("actors.driver", "actors.threads", "actors.pgsql", "actors.sqltext")
CLI_MAY_IMPORT = ("supervisor", "supervisor.testing", "supervisor.cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_imports(path: Path, name: str) -> list[tuple[str, list[str]]]:
    """(imported module, names imported from it) for every import statement in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")
                if not is_package:
                    package.pop()
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            found.append((base, [alias.name for alias in node.names]))
    return found


def project_graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, list[str]]]]]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    raw = {}
    for name, path in modules.items():
        imports = read_imports(path, name)
        # `from package import submodule` imports the submodule too
        imports += [
            (f"{base}.{n}", []) for base, names in imports for n in names
            if f"{base}.{n}" in modules
        ]
        raw[name] = imports
    graph = {
        name: {target for target, _ in imports if target in modules and target != name}
        for name, imports in raw.items()
    }
    return graph, raw


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_of(module: str) -> int | None:
    while module:
        if module in LAYERS:
            return LAYERS[module]
        module = module.rpartition(".")[0]
    return None


def upward_imports(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Every import in ``supervisor`` that does not go strictly down a layer."""
    problems = []
    for source, targets in graph.items():
        if not source.startswith("supervisor"):
            continue
        mine = layer_of(source)
        if mine is None:
            problems.append(f"{source} has no layer in tests/test_layers.py LAYERS")
            continue
        for target in targets:
            if not target.startswith("supervisor") or _same_package(source, target):
                continue
            theirs = layer_of(target)
            if theirs is None or theirs >= mine:
                problems.append(f"{source} (layer {mine}) imports {target} (layer {theirs})")
    return problems


SUBPACKAGES = ("supervisor.cli", "supervisor.testing")


def _same_package(a: str, b: str) -> bool:
    """Two modules of one subpackage (supervisor.cli and supervisor.cli.bank, say): a
    subpackage's modules share its layer and may import each other (the cycle check still
    applies)."""
    return any(
        (a == p or a.startswith(p + ".")) and (b == p or b.startswith(p + "."))
        for p in SUBPACKAGES
    )


def actor_side_problems(graph: Mapping[str, Iterable[str]]) -> list[str]:
    problems = []
    for source, targets in graph.items():
        if not source.startswith("actors"):
            continue
        for target in targets:
            if target.startswith("supervisor"):
                problems.append(f"{source} imports {target}: actors never import supervisor")
        for package in DRIVER_PACKAGES:
            if source == package or source.startswith(package + "."):
                for target in targets:
                    if not (
                        target == package
                        or target.startswith(package + ".")
                        or target in DRIVER_MAY_IMPORT
                        or target == "actors"
                        # psycopg's seam serves both drivers built on psycopg
                        or (package == "actors.aio" and target == "actors.psycopg.seam")
                    ):
                        problems.append(f"driver module {source} imports {target}")
    return problems


def cli_problems(raw: Mapping[str, list[tuple[str, list[str]]]]) -> list[str]:
    problems = []
    for source, imports in raw.items():
        if not source.startswith("supervisor.cli"):
            continue
        for target, names in imports:
            root = target.split(".")[0]
            if root not in PACKAGES:
                continue
            if root == "supervisor" and not any(
                target == allowed or (allowed != "supervisor" and target.startswith(allowed + "."))
                for allowed in CLI_MAY_IMPORT
            ):
                problems.append(f"{source} imports the internal module {target}")
            if any(_private(part) for part in target.split(".")):
                problems.append(f"{source} imports the private module {target}")
            private = [n for n in names if _private(n)]
            if private:
                problems.append(f"{source} imports private names {private} from {target}")
    return problems


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# -- the rules, on the real tree -----------------------------------------------------------------


def test_the_project_has_no_import_cycle() -> None:
    graph, _ = project_graph()
    assert find_cycle(graph) is None


def test_supervisor_modules_import_only_lower_layers() -> None:
    graph, _ = project_graph()
    assert upward_imports(graph) == []


def test_actors_never_import_supervisor_and_drivers_only_the_driver_protocol() -> None:
    graph, _ = project_graph()
    assert actor_side_problems(graph) == []


def test_the_command_line_uses_public_names_only() -> None:
    _, raw = project_graph()
    assert cli_problems(raw) == []


def test_every_supervisor_module_has_a_layer() -> None:
    graph, _ = project_graph()
    missing = [m for m in graph if m.startswith("supervisor") and layer_of(m) is None]
    assert missing == []


# -- the checker can fail ------------------------------------------------------------------------


def test_the_checker_finds_a_cycle_hidden_behind_two_modules() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_the_checker_finds_an_upward_import() -> None:
    graph = {"supervisor.session": {"supervisor.pool"}, "supervisor.pool": set()}
    assert upward_imports(graph) == [
        "supervisor.session (layer 4) imports supervisor.pool (layer 8)"
    ]


def test_the_checker_finds_an_actor_importing_supervisor_and_a_driver_reaching_sideways() -> None:
    graph = {
        "actors.actor": {"supervisor.errors"},
        "actors.sqlite.connection": {"actors.actor", "actors.driver"},
    }
    assert actor_side_problems(graph) == [
        "actors.actor imports supervisor.errors: actors never import supervisor",
        "driver module actors.sqlite.connection imports actors.actor",
    ]


def test_the_checker_finds_the_cli_using_a_private_name() -> None:
    raw = {
        "supervisor.cli.demo": [
            ("supervisor.pool", ["Pool"]),
            ("supervisor", ["_secret"]),
            ("trio", ["run"]),
        ]
    }
    assert cli_problems(raw) == [
        "supervisor.cli.demo imports the internal module supervisor.pool",
        "supervisor.cli.demo imports private names ['_secret'] from supervisor",
    ]


@pytest.mark.parametrize(
    ("source", "line", "expected"),
    [
        ("supervisor.pool", "from .handles import RunBlock", ("supervisor.handles", ["RunBlock"])),
        ("supervisor.cli", "from . import bank", ("supervisor.cli", ["bank"])),
        ("supervisor.cli.demo", "from .bank import demo", ("supervisor.cli.bank", ["demo"])),
        ("supervisor.cli.demo", "from .. import open_pool", ("supervisor", ["open_pool"])),
    ],
)
def test_relative_imports_are_resolved(
    tmp_path: Path, source: str, line: str, expected: tuple[str, list[str]]
) -> None:
    path = tmp_path / ("__init__.py" if source == "supervisor.cli" else "m.py")
    path.write_text(line + "\n", encoding="utf-8")
    assert read_imports(path, source) == [expected]
