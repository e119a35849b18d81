"""No import cycles inside the dinotrain package.

A cycle makes a module work only when imported in a lucky order, and hides which of two modules is the
lower layer. The graph is read from the source with `ast` (no module is imported): every `import` and
`from ... import`, at module level or inside functions, between dinotrain modules. Importing
`dinotrain.a.b` also runs the package `dinotrain.a`, so that is an edge too (except to the importer's
own packages, which are already running).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dinotrain"

# Imports excused from the rule, each (importer, imported) with the cycle it closes; an entry whose import is
# gone fails the test, so the list can only shrink. Empty since the redesign of issue 23: keep it so.
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(importer: str, is_package: bool, module: str | None, level: int) -> str:
    """The absolute name of `from <level dots><module> import ...` written in `importer`."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _with_packages(target: str, importer: str, modules: set[str]) -> set[str]:
    """`target` and the packages above it that importing it runs (not the importer's own packages)."""
    parts = target.split(".")
    found = set()
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name in modules and not (importer == name or importer.startswith(name + ".")):
            found.add(name)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the dinotrain modules it imports, anywhere in its source."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.module, node.level)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]  # y may be a submodule
            for target in targets:
                edges |= _with_packages(target, name, modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # iterative would be longer; the package is far from the recursion limit
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first, within the component)."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:  # v closes the cycle: walk its parents back to start
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle found in the component {sorted(component)}")


def _cycle_text(cycle: list[str]) -> str:
    return " -> ".join(cycle)


def test_dinotrain_has_no_import_cycle():
    graph = import_graph()
    assert "dinotrain.data.loader" in graph and "dinotrain.distributed.checkpoint" in graph  # the walk found them
    stale = [f"{a} -> {b}" for a, b in ALLOWED if b not in graph.get(a, set())]
    assert not stale, f"allowed imports that no longer exist (remove them from ALLOWED): {stale}"
    pruned = {a: {b for b in targets if (a, b) not in ALLOWED} for a, targets in graph.items()}
    cycles = find_cycles(pruned)
    assert not cycles, "import cycles in dinotrain:\n" + "\n".join(_cycle_text(c) for c in cycles)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "dinotrain"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_graph_sees_every_kind_of_import(tmp_path):
    root = _package(tmp_path, {
        "a.py": "import dinotrain.b\n",
        "b.py": "def f():\n    from dinotrain.sub import c\n",  # function level, a submodule as the name
        "sub/__init__.py": "from .c import X\n",
        "sub/c.py": "from ..d import Y\nX = 1\n",  # relative, two levels
        "d.py": "from dinotrain import sub as _\nY = 2\n",  # from-import of a package
        "e.py": "import os\nfrom torch import nn\n",  # outside the package: no edge
    })
    graph = import_graph(root)
    assert graph["dinotrain.a"] == {"dinotrain.b"}
    assert graph["dinotrain.b"] == {"dinotrain.sub", "dinotrain.sub.c"}
    assert graph["dinotrain.sub"] == {"dinotrain.sub.c"}
    assert graph["dinotrain.sub.c"] == {"dinotrain.d"}
    assert graph["dinotrain.d"] == {"dinotrain.sub"}
    assert graph["dinotrain.e"] == set()


@pytest.mark.parametrize("files, expected", [
    ({"a.py": "import dinotrain.b\n", "b.py": "def f():\n    import dinotrain.a\n"},
     ["dinotrain.a", "dinotrain.b", "dinotrain.a"]),
    ({"p/__init__.py": "from .x import X\n", "p/x.py": "X = 1\n", "q.py": "from dinotrain.p.x import X\n"}, None),
    ({"p/__init__.py": "from dinotrain.q import Q\n", "p/x.py": "X = 1\n", "q.py": "from dinotrain.p.x import X\n"},
     ["dinotrain.p", "dinotrain.q", "dinotrain.p"]),  # importing p.x runs p's __init__, which imports q
])
def test_cycles_are_found_and_named(tmp_path, files, expected):
    cycles = find_cycles(import_graph(_package(tmp_path, files)))
    assert cycles == ([expected] if expected else [])
