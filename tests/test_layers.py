"""The layers run one way, cli -> ops -> formats -> nn, and no module imports itself back through others.

Every module of the ditkit package is read with `ast` (nothing is imported): every import statement counts,
module-level or inside a function, absolute or relative. An import of `ditkit.a.b` is an edge to the module
`ditkit.a.b` (to the package `ditkit.a` only where `b` is a name defined in it, not a module);
`importlib.import_module` counts where its argument is a literal string (a computed name cannot be read).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("nn", "formats", "ops", "cli")  # lowest first: a module may import its own layer and those below

# Known import cycles whose fix is under way elsewhere: (importer, imported) edges left out of the cycle check.
# Each entry names its reason; test_allowed_edges_are_still_needed fails once an entry can go.
ALLOWED_CYCLE_EDGES: dict[tuple[str, str], str] = {
    ("ditkit.ops.distill.feedback", "ditkit.ops.distill"): "Job lives in ops/distill/__init__.py, which imports the "
                                                           "step modules; a module of its own would end the cycle",
    ("ditkit.ops.distill.recover", "ditkit.ops.distill"): "as ops.distill.feedback: Job",
    ("ditkit.ops.distill.steps", "ditkit.ops.distill"): "as ops.distill.feedback: Job",
}


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(("ditkit", *parts))


def ditkit_modules(root: Path) -> dict[str, Path]:
    return {module_name(root, path): path for top in LAYERS for path in sorted((root / top).rglob("*.py"))}


def literal_import_module(node: ast.AST) -> str | None:
    """"ditkit.x.y" of `importlib.import_module("ditkit.x.y")` (a computed name cannot be read)."""
    if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.args[0].value
    return None


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The ditkit modules that `name` (the file at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from ..x import y` in ditkit.a.b.c is ditkit.a.x
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in known:  # `from ditkit.nn import judge`: the module ditkit.nn.judge
                    out.add(sub)
                elif source in known:
                    out.add(source)
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            targets = [t for t in [literal_import_module(node)] if t]
        for target in targets:
            while target and target not in known:  # `import ditkit.ops.x.y` runs ditkit.ops.x.y
                target = target.rpartition(".")[0]
            if target:
                out.add(target)
    out.discard(name)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = ditkit_modules(root)
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def layer(module: str) -> str:
    return module.split(".")[1]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted(f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, targets in graph.items() for b in targets
                  if rank[layer(b)] > rank[layer(a)])


def cycles(graph: dict[str, set[str]], allowed=()) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    allowed = set(allowed)
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):  # iterative over edges would be longer; the package is a few hundred modules deep at most
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if (v, w) in allowed:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_walk_sees_the_package(graph):
    assert {"ditkit.cli.main", "ditkit.ops.quantize", "ditkit.formats.bundle", "ditkit.nn.judge"} <= set(graph)
    # relative, absolute and function-level imports are all edges
    assert "ditkit.formats.layouts.base" in graph["ditkit.formats.layouts.pipeline"]
    assert "ditkit.nn.quantized" in graph["ditkit.ops.quantize"]
    assert "ditkit.formats.feedback" in graph["ditkit.formats.layouts"]  # imported inside load_bundle


def test_layers_run_one_way(graph):
    """cli -> ops -> formats -> nn: formats never imports ops or cli, ops never cli, nn none of them."""
    assert layer_violations(graph) == []


def test_no_import_cycles(graph):
    assert cycles(graph, ALLOWED_CYCLE_EDGES) == []


def test_allowed_edges_are_still_needed(graph):
    for (a, b), why in ALLOWED_CYCLE_EDGES.items():
        assert b in graph.get(a, ()), f"{a} no longer imports {b} ({why}): delete its ALLOWED_CYCLE_EDGES entry"
        rest = {k: v for k, v in ALLOWED_CYCLE_EDGES.items() if k != (a, b)}
        assert cycles(graph, rest), f"{a} -> {b} is no longer part of a cycle ({why}): delete its entry"


def test_the_checks_catch_a_violation(tmp_path):
    """A formats module importing ops, inside a function, relatively; nn importing cli by a literal name."""
    for top, files in {"nn": {"__init__.py": "import importlib\nCLI = importlib.import_module('ditkit.cli.c')\n"},
                       "formats": {"__init__.py": "", "a.py": "def f():\n    from ..ops import b\n"},
                       "ops": {"__init__.py": "", "b.py": "from ditkit.formats.a import f\n"},
                       "cli": {"__init__.py": "", "c.py": ""}}.items():
        (tmp_path / top).mkdir()
        for name, text in files.items():
            (tmp_path / top / name).write_text(text)
    g = import_graph(tmp_path)
    assert layer_violations(g) == ["ditkit.formats.a (formats) imports ditkit.ops.b (ops)",
                                   "ditkit.nn (nn) imports ditkit.cli.c (cli)"]
    assert cycles(g) == [["ditkit.formats.a", "ditkit.ops.b"]]
