"""The layers point down: no import cycle among tqstar's modules, and the ground modules import only ground.

Every import counts, also those inside functions (a lazy import still couples two modules), and
importing `tqstar.a.b` also runs the package `tqstar.a`. See docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tqstar"
GROUND = {"tqstar", "tqstar.errors", "tqstar.stats", "tqstar.files", "tqstar.hub", "tqstar.methods", "tqstar.data.hh"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """tqstar modules `name` imports (anywhere in the file), with the packages those imports run."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            if not target.startswith("tqstar"):
                continue
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            # importing tqstar.a.b runs tqstar.a first: count the packages, but not the importer's own
            parts = target.split(".")
            for depth in range(1, len(parts) + 1):
                dependency = ".".join(parts[:depth])
                if dependency in known and dependency != name and not (name + ".").startswith(dependency + "."):
                    found.add(dependency)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_walker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_walker_reads_relative_and_lazy_imports():
    edges = graph()
    assert "tqstar.decoding.engine" in edges["tqstar.decode"]  # a lazy `from .decoding.engine import Decoder`
    assert "tqstar.errors" in edges["tqstar.config"]


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_ground_modules_import_only_ground():
    edges = graph()
    for name in sorted(GROUND & set(edges)):
        upward = sorted(edges[name] - GROUND)
        assert not upward, f"{name} is a ground module but imports {upward}"
