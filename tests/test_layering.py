"""Import layering of the package: the module graph, built from the source with `ast`, has no
cycle where the architecture says it runs one way.

Every ``import`` counts as an arrow, also one under ``if TYPE_CHECKING:`` or inside a function:
a module must be readable knowing only the modules below it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import kvaware_scorer

ROOT = Path(kvaware_scorer.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        parts = package.split(".")
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    # NOTE: ``from pkg import sub`` imports the submodule; ``from mod import name`` the module.
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (the nearest existing module of each name)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = _imported(node, module, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):
                subs = [n for n in names[:-1] if n in files]
                names = subs or names[-1:]
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: Mapping[str, Iterable[str]], modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module among `modules` (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return found


def _within(graph: Mapping[str, object], *prefixes: str) -> set[str]:
    return {m for m in graph if any(m == p or m.startswith(p + ".") for p in prefixes)}


def test_graph_sees_type_checking_and_function_imports() -> None:
    graph = import_graph()
    # the package facade imports its submodules; a function-level import is an arrow too
    assert "kvaware_scorer.scheduler.pipeline" in graph["kvaware_scorer.scheduler"]
    assert "kvaware_scorer.scheduler.types" in graph["kvaware_scorer.scheduler.pipeline"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}, {"a", "b", "c"}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}, {"a", "b"}) == []


def test_scheduler_package_is_layered() -> None:
    graph = import_graph()
    # NOTE: the package's __init__ re-exports every submodule; no submodule imports it back.
    modules = _within(graph, "kvaware_scorer.scheduler")
    assert len(modules) > 10
    assert cycles(graph, modules) == []


def test_write_path_runs_one_way() -> None:
    graph = import_graph()
    modules = _within(graph, "kvaware_scorer.events", "kvaware_scorer.indexer")
    assert "kvaware_scorer.indexer" in modules
    assert cycles(graph, modules) == []


def test_sim_package_is_layered() -> None:
    graph = import_graph()
    # NOTE: the live pod hands the HTTP layer its state types; the server never imports back.
    modules = _within(graph, "kvaware_scorer.sim")
    assert "kvaware_scorer.sim.server" in modules
    assert cycles(graph, modules) == []
