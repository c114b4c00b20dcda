"""The package's modules form layers: no import circle (no daemon needed).

Every module of ``lockbroker`` is parsed with :mod:`ast` (nothing is
imported), and every import of another module of the package is an edge of
a graph: at module level, inside functions and methods, and under
``if TYPE_CHECKING:`` alike, since a circle that only type checkers or a
late call follow is still a circle. The forms counted are ``from . import
x``, ``from .x import y``, ``from lockbroker.x import y``, ``import
lockbroker.x`` and ``importlib.import_module`` / ``__import__`` of a
constant name. ``from .x import y`` names ``x`` (or ``x.y`` when that is a
module); loading a submodule's parent package first, which Python always
does, is not counted (else every module would circle through
``__init__``). The graph must have no cycle.
"""

from __future__ import annotations

import ast
import unittest
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

#: The ``lockbroker`` package directory.
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "lockbroker"
PACKAGE = "lockbroker"

#: One import: (importing module, imported module, line, where).
Edge = Tuple[str, str, int, str]


def module_names(package_dir: Path, package: str) -> Dict[str, Path]:
    """Every module of the package (subpackages too), by dotted name."""
    modules: Dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    """The package-internal imports of one module's syntax tree."""

    def __init__(self, name: str, is_package: bool, modules: Set[str], package: str) -> None:
        self.name = name
        # The package relative imports start from.
        self.base = name if is_package else name.rpartition(".")[0]
        self.modules = modules
        self.package = package
        self.edges: List[Edge] = []
        self._where: List[str] = []

    def _inside(self, what: str, node: ast.AST) -> None:
        self._where.append(what)
        self.generic_visit(node)
        self._where.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._inside("in %s()" % node.name, node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._inside("in %s()" % node.name, node)

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self._where.append("under TYPE_CHECKING")
        for child in node.body:
            self.visit(child)
        self._where.pop()
        for child in node.orelse:
            self.visit(child)

    def _add(self, target: Optional[str], line: int) -> None:
        if target is None or target == self.name:
            return
        if target != self.package and not target.startswith(self.package + "."):
            return
        # The longest existing module the name starts with: ``x.y`` where
        # ``y`` is an attribute of ``x`` names ``x``.
        while target not in self.modules and "." in target:
            target = target.rpartition(".")[0]
        if target in self.modules and target != self.name:
            self.edges.append((self.name, target, line, ", ".join(self._where) or "module level"))

    def _resolve(self, level: int, module: Optional[str]) -> Optional[str]:
        if level == 0:
            return module
        parts = self.base.split(".")
        if level - 1 >= len(parts):
            return None  # above the package: not ours
        base = ".".join(parts[: len(parts) - (level - 1)])
        return base + "." + module if module else base

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = self._resolve(node.level, node.module)
        if source is None:
            return
        # ``from . import x`` names the module x; ``from .x import y``
        # names x, unless y is itself a module (of a subpackage x).
        named = [source + "." + a.name if source + "." + a.name in self.modules else source for a in node.names]
        for target in dict.fromkeys(named):  # once each, in order
            self._add(target, node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if called in ("import_module", "__import__") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                text = first.value
                level = len(text) - len(text.lstrip("."))
                self._add(self._resolve(level, text[level:] or None), node.lineno)
        self.generic_visit(node)


def imports_of(
    source: str, name: str, modules: Set[str], package: str = PACKAGE, is_package: bool = False
) -> List[Edge]:
    """The package-internal imports in one module's source."""
    collector = _Collector(name, is_package, modules, package)
    collector.visit(ast.parse(source, filename=name))
    return collector.edges


def package_imports(package_dir: Path = PACKAGE_DIR, package: str = PACKAGE) -> List[Edge]:
    """Every package-internal import of every module of the package."""
    modules = module_names(package_dir, package)
    edges: List[Edge] = []
    for name, path in modules.items():
        source = path.read_text(encoding="utf-8")
        edges.extend(imports_of(source, name, set(modules), package, path.name == "__init__.py"))
    return edges


def find_cycle(edges: List[Edge]) -> Optional[List[Edge]]:
    """One cycle of the graph, as the imports that make it, or None."""
    graph: Dict[str, List[Edge]] = {}
    for edge in edges:
        graph.setdefault(edge[0], []).append(edge)
        graph.setdefault(edge[1], [])
    done: Set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        # Iterative depth-first search; ``path`` holds the edges to the node
        # being explored, ``on_path`` the nodes on it.
        path: List[Edge] = []
        on_path: Dict[str, int] = {start: 0}
        stack = [iter(graph[start])]
        while stack:
            edge = next(stack[-1], None)
            if edge is None:
                stack.pop()
                node = path.pop()[1] if path else start
                on_path.pop(node, None)
                done.add(node)
                continue
            target = edge[1]
            if target in on_path:
                return path[on_path[target]:] + [edge]
            if target in done:
                continue
            path.append(edge)
            on_path[target] = len(path)
            stack.append(iter(graph[target]))
    return None


def tangles(edges: List[Edge]) -> List[List[Edge]]:
    """The imports inside each group of modules that reach each other (each
    strongly connected component of more than one module)."""
    reach: Dict[str, Set[str]] = {}
    for importer, imported, _, _ in edges:
        reach.setdefault(importer, set()).add(imported)
        reach.setdefault(imported, set())
    changed = True
    while changed:  # transitive closure; the graph is a handful of modules
        changed = False
        for node, targets in reach.items():
            more = set().union(*(reach[t] for t in targets)) - targets
            if more:
                targets |= more
                changed = True
    groups: List[List[Edge]] = []
    seen: Set[str] = set()
    for node in sorted(reach):
        if node in seen:
            continue
        group = {other for other in reach[node] if node in reach[other]} | {node}
        seen |= group
        if len(group) > 1:
            groups.append([e for e in edges if e[0] in group and e[1] in group])
    return groups


def _edge_line(edge: Edge) -> str:
    return "  %s imports %s (line %d, %s)" % edge


def describe(cycle: List[Edge], edges: List[Edge]) -> str:
    lines = [" -> ".join([cycle[0][0]] + [edge[1] for edge in cycle])]
    lines.extend(_edge_line(edge) for edge in cycle)
    for group in tangles(edges):
        names = sorted({e[0] for e in group})
        lines.append("modules that import each other, directly or not: %s; their imports of each other:" % ", ".join(names))
        lines.extend(_edge_line(edge) for edge in group)
    return "\n".join(lines)


class CollectorTest(unittest.TestCase):
    """The collector sees every form of import (so a pass means something)."""

    MODULES = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.sub", "pkg.sub.e"}

    def test_every_form_and_place(self) -> None:
        source = (
            "from typing import TYPE_CHECKING\n"
            "import os, pkg.a\n"
            "from . import b as _b\n"
            "from .sub import e\n"
            "if TYPE_CHECKING:\n"
            "    from .c import Thing\n"
            "def f():\n"
            "    from pkg.d import g\n"
            "    import importlib\n"
            "    return importlib.import_module('.a', __package__)\n"
            "from .. import outside\n"
        )
        edges = imports_of(source, "pkg.x", self.MODULES, "pkg")
        self.assertEqual(
            [(e[1], e[2], e[3]) for e in edges],
            [
                ("pkg.a", 2, "module level"),
                ("pkg.b", 3, "module level"),
                ("pkg.sub.e", 4, "module level"),
                ("pkg.c", 6, "under TYPE_CHECKING"),
                ("pkg.d", 8, "in f()"),
                ("pkg.a", 10, "in f()"),
            ],
        )

    def test_names_from_the_package_itself(self) -> None:
        # ``from . import Name`` (not a module) imports the package's __init__.
        edges = imports_of("from . import Name\nimport pkg\n", "pkg.x", self.MODULES, "pkg")
        self.assertEqual([e[1] for e in edges], ["pkg", "pkg"])
        # In __init__ itself, ``from .a import y`` is relative to the package.
        edges = imports_of("from .a import y\n", "pkg", self.MODULES, "pkg", is_package=True)
        self.assertEqual([e[1] for e in edges], ["pkg.a"])

    def test_finds_a_cycle(self) -> None:
        edges: List[Edge] = [
            ("pkg.a", "pkg.b", 1, "module level"),
            ("pkg.b", "pkg.c", 1, "module level"),
            ("pkg.c", "pkg.a", 9, "in f()"),
            ("pkg.c", "pkg.d", 2, "module level"),
        ]
        cycle = find_cycle(edges)
        assert cycle is not None
        self.assertEqual([e[0] for e in cycle], ["pkg.a", "pkg.b", "pkg.c"])
        self.assertIsNone(find_cycle(edges[:2] + edges[3:]))


class LayeringTest(unittest.TestCase):
    def test_no_import_cycle(self) -> None:
        edges = package_imports()
        cycle = find_cycle(edges)
        if cycle is not None:
            self.fail("import cycle in the lockbroker package:\n" + describe(cycle, edges))

    def test_the_graph_is_the_package(self) -> None:
        modules = module_names(PACKAGE_DIR, PACKAGE)
        for name in ("lockbroker", "lockbroker.client", "lockbroker.state", "lockbroker.primitives"):
            self.assertIn(name, modules)
        edges = {(e[0], e[1]) for e in package_imports()}
        # Known imports are seen (a parser that saw nothing would find no cycle).
        self.assertIn(("lockbroker.errors", "lockbroker.protocol"), edges)
        self.assertIn(("lockbroker.state", "lockbroker.client"), edges)
        self.assertIn(("lockbroker", "lockbroker.state"), edges)


if __name__ == "__main__":
    unittest.main()
