"""The rooms of the code base and what each may import (docs/architecture.md).

Read from the source with :mod:`ast`, not by importing it: an import inside a
function counts as much as one at the top of a module. Imports under ``if
TYPE_CHECKING:`` count for what a room may import, not for cycles (they never
run).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}

# The packages of orchestrator/, each a room; the modules at its top are
# rooms of their own.
ROOMS = ("luo", "restore", "engine", "agent", "observe", "vmm", "cli", "demo")

# Stdlib only, and only these of ours: what runs inside the blackout.
BLACKOUT = {
    "luo": {"luo", "errors", "compat"},
    "restore": {"restore", "luo", "errors", "compat"},
    "errors": {"errors", "compat"},
    "compat": {"compat"},
}

# What a plugin may import from orchestrator: the names in these modules'
# __all__, and nothing else (no private module, no `import orchestrator.x`).
PLUGIN_API = (
    "orchestrator",
    "orchestrator.luo",
    "orchestrator.vmm",
    "orchestrator.agent_client",
    "orchestrator.demo",
)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (a submodule when `from pkg import mod`)
    names: tuple[str, ...]  # `from target import names`; () for `import target`
    type_only: bool  # under `if TYPE_CHECKING:`
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {
        module_name(path): path
        for top in ("orchestrator", "plugins")
        for path in sorted((ROOT / top).rglob("*.py"))
    }


MODULES = sources()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                visit(stmt, True)
            for stmt in node.orelse:
                visit(stmt, type_only)
            return
        if isinstance(node, ast.Import):
            found.extend(
                Import(module, alias.name, (), type_only, node.lineno)
                for alias in node.names
            )
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = tuple(alias.name for alias in node.names)
            found.append(Import(module, base, names, type_only, node.lineno))
            found.extend(  # `from pkg import mod` imports pkg.mod
                Import(module, f"{base}.{name}", (), type_only, node.lineno)
                for name in names
                if f"{base}.{name}" in MODULES
            )
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def room(module: str) -> str:
    """The room a module of ours is in; "" for a third-party or stdlib one."""
    parts = module.split(".")
    if parts[0] == "plugins":
        return "plugins"
    if parts[0] != "orchestrator":
        return ""
    if len(parts) == 1:
        return "api"
    if parts[1] in ROOMS:
        return parts[1]
    return {
        "errors": "errors",
        "_compat": "compat",
        "_http": "http",
        "agent_client": "agent",
    }.get(parts[1], parts[1])


def _where(imp: Import) -> str:
    return f"{MODULES[imp.module].relative_to(ROOT)}:{imp.line}: {imp.target}"


def all_imports() -> list[Import]:
    return [imp for module in MODULES for imp in imports_of(module)]


def test_every_module_is_in_a_known_room() -> None:
    known = {*ROOMS, "api", "errors", "compat", "http", "plugins"}
    assert {room(m) for m in MODULES} <= known


@pytest.mark.parametrize("source", sorted(BLACKOUT))
def test_blackout_rooms_import_only_the_standard_library(source: str) -> None:
    """luo and restore run inside the blackout: the standard library, each
    other (restore uses luo, never the reverse), errors and _compat only."""
    bad = [
        _where(imp)
        for imp in all_imports()
        if room(imp.module) == source
        and not (
            imp.target.split(".")[0] in STDLIB or room(imp.target) in BLACKOUT[source]
        )
    ]
    assert not bad, "\n".join(bad)


def _public_names(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                assert node.value is not None
                value = ast.literal_eval(node.value)
                assert isinstance(value, list)
                return set(value)
    raise AssertionError(f"{module} has no __all__")


def test_plugins_import_only_public_names() -> None:
    """A built-in plugin is written as a third-party one would be."""
    bad = []
    for imp in all_imports():
        if room(imp.module) != "plugins" or room(imp.target) in ("", "plugins"):
            continue
        if imp.target in PLUGIN_API and imp.names:
            private = set(imp.names) - _public_names(imp.target)
            if not private:
                continue
            bad.append(f"{_where(imp)} (not in __all__: {', '.join(sorted(private))})")
        elif not any(
            # `from orchestrator import X` also yields orchestrator.X when X is a
            # module; only the `from` form above counts.
            other.line == imp.line
            and other.module == imp.module
            and other.names
            and other.target in PLUGIN_API
            and f"{other.target}.{n}" == imp.target
            for other in imports_of(imp.module)
            for n in other.names
        ):
            bad.append(_where(imp))
    assert not bad, "\n".join(bad)


def test_orchestrator_never_imports_plugins() -> None:
    """Built-in plugins are found by entry point, as third-party ones are."""
    bad = [
        _where(imp)
        for imp in all_imports()
        if room(imp.module) != "plugins" and room(imp.target) == "plugins"
    ]
    assert not bad, "\n".join(bad)


def _room_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for imp in all_imports():
        a, b = room(imp.module), room(imp.target)
        if b and a != b and not imp.type_only:
            graph.setdefault(a, set()).add(b)
    return graph


def test_no_import_cycles_between_rooms() -> None:
    graph = _room_graph()
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            else:
                walk(nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, [start])
    assert not cycles, "\n".join(sorted(set(cycles)))


def test_the_checker_sees_imports() -> None:
    """The checks above are not vacuous: they see known edges."""
    graph = _room_graph()
    assert "luo" in graph["restore"]
    assert "restore" in graph["engine"]
    assert "orchestrator" in {imp.target for imp in imports_of("plugins.kexec")}


def test_every_error_is_in_the_tree_and_exported() -> None:
    """Each exception class of orchestrator/ is defined in errors.py (or, the
    kernel's, in luo/_errors.py), derives from OrchestratorError and is in
    orchestrator.__all__; private ones (``_Name``) stay inside their module."""
    import orchestrator

    homes = {"orchestrator.errors", "orchestrator.luo._errors"}
    bad = []
    for module, path in MODULES.items():
        if room(module) == "plugins":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            bases = {ast.unparse(base) for base in node.bases}
            if not any(b.endswith(("Error", "Exception", "Refusal")) for b in bases):
                continue
            if module not in homes:
                bad.append(f"{path.relative_to(ROOT)}: {node.name} (not in errors.py)")
            elif node.name not in orchestrator.__all__:
                bad.append(f"{node.name} is not exported by orchestrator")
    assert not bad, "\n".join(bad)
    for name in orchestrator.__all__:
        value = getattr(orchestrator, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            # TransientError is a mixin for retries, not an error of its own.
            assert value is orchestrator.TransientError or issubclass(
                value, orchestrator.OrchestratorError
            ), name
