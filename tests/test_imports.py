"""The package reads top to bottom: no module imports one that imports it back, not even
lazily inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import dpbp

PACKAGE = Path(dpbp.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the dpbp modules it imports anywhere in its body}."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from dpbp import cmdline` imports the submodule: like `import dpbp.cmdline`,
                # no edge to the package (whose __init__ runs first either way); a name that is
                # no submodule (`from dpbp import __version__`) is one
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = subs + ([node.module] if any(t not in modules for t in subs) else [])
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_cycle_through_the_package_init_is_found():
    """dpbp/__init__ may import a submodule lazily (dpbp.fit) only because no module imports
    a *name* from the package: one that did would close a cycle, and the graph shows it."""
    graph = import_graph()
    assert "dpbp.api" in graph["dpbp"]  # __init__'s lazy dpbp.fit
    assert "dpbp" not in graph["dpbp.cli"]  # `from dpbp import cmdline` is the submodule
    graph["dpbp.cli"].add("dpbp")  # as `from dpbp import __version__` in cli.py would add
    assert find_cycle(graph) is not None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "dpbp.train" in graph and graph["dpbp.tick"]  # the graph was read
    assert find_cycle(graph) is None
