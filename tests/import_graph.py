"""The project's import graph, read from the source (every import statement, at module level or inside a function),
for the architecture tests: ``python tests/import_graph.py`` prints any import cycle.

A module ``a.b.c`` depends on each module it imports and, since importing ``a.b.c`` runs them, on the packages
above what it imports (``a.b`` and ``a``); ``from a.b import c`` names the module ``a.b.c`` when there is one. A
package that imports its own modules by discovery (``pkgutil.iter_modules``, as ``pf_ray.learners`` does) depends
on each of them.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pf_ray", "trainables", "search_algs")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages (a package is its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against this module's package
            base = module.split(".")
            base = base if is_package else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        return [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
    return []


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports (with their parent packages)."""
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in _imported(node, module, path.name == "__init__.py"):
                if name not in files:
                    continue  # not ours, or "from package import function"
                parts = name.split(".")
                edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        if path.name == "__init__.py" and "pkgutil.iter_modules" in path.read_text():  # imports its modules by name
            edges.update(name for name in files if name.rpartition(".")[0] == module)
        edges.discard(module)
        # a module's own packages run before it anyway: importing them is no edge back
        edges -= {".".join(module.split(".")[:i]) for i in range(1, len(module.split(".")))}
        graph[module] = {edge for edge in edges if edge in files}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for edge in sorted(graph.get(node, ())):
            if edge not in index:
                visit(edge)
                low[node] = min(low[node], low[edge])
            elif edge in on_stack:
                low[node] = min(low[node], index[edge])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def path_within(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the component's first module, as a list of modules (first == last)."""
    members = set(component)
    start = component[0]
    parents = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for edge in sorted(graph[node] & members):
            if edge == start:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if edge not in parents:
                parents[edge] = node
                queue.append(edge)
    return component


if __name__ == "__main__":
    graph = import_graph()
    found = cycles(graph)
    for component in found:
        print(f"{len(component)} modules in a cycle, e.g. " + " -> ".join(path_within(graph, component)))
    print(f"{len(found)} import cycle(s) among {len(graph)} modules")
    sys.exit(1 if found else 0)
