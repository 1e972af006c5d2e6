"""The package's layers import one way: no import cycle between subpackages, at module or function level.

Every ``import`` in ``flora_graph/**/*.py`` counts, wherever it sits (module level, inside a
function, inside ``try``), except under ``if TYPE_CHECKING:``, which never runs. Units are the
subpackages (``flora_graph.ir``, ``flora_graph.ops``, ...) and the top-level modules
(``flora_graph.cli``, ``flora_graph.model_export``, ...); an edge ``a -> b`` means some module
of ``a`` imports some module of ``b``. The root ``flora_graph/__init__.py`` is the entry
point that loads the op library; it is not a unit.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2] / "flora_graph"
# The intended order, lowest first: a unit may import only units before it (or itself).
LAYERS = [
    {"errors", "_lazy", "cli_types", "storage"},
    {"ir"},
    {"ops"},
    {"flora"},
    {"adapters"},
    {"frontend", "passes", "runtimes", "models"},
    {"bench", "quantized_checkpoints", "model_export", "serving", "torch_jit", "demo", "llm_demo"},
    {"training"},
    {"cli"},
]


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "flora_graph" or len(parts) < 2:
        return None
    return parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (``TYPE_CHECKING`` blocks excluded)."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _unit_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    modules = {_module_name(p) for p in ROOT.rglob("*.py")}
    for path in ROOT.rglob("*.py"):
        src = _unit(_module_name(path))
        if src is None:
            continue
        g.add_node(src)
        for name in _imports(path):
            dst = _unit(name)
            if dst is None or dst == src:
                continue
            if name not in modules and name.rpartition(".")[0] not in modules:
                continue
            g.add_edge(src, dst, example=f"{_module_name(path)} imports {name}")
    return g


def test_no_import_cycle_between_subpackages() -> None:
    g = _unit_graph()
    cycles = list(nx.simple_cycles(g))
    described = [" -> ".join([*c, c[0]]) + f"  ({g.edges[c[-1], c[0]]['example']})" for c in cycles]
    assert not cycles, "import cycles between subpackages:\n" + "\n".join(described)


def test_units_import_only_lower_layers() -> None:
    rank = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    g = _unit_graph()
    unknown = sorted(set(g) - set(rank))
    assert not unknown, f"units missing from LAYERS: {unknown}"
    upward = [f"{a} -> {b} ({d['example']})" for a, b, d in g.edges(data=True) if rank[b] > rank[a]]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_the_checker_sees_function_level_imports_and_skips_type_checking() -> None:
    src = ROOT / "ops" / "registry.py"  # imports ComputationNode only under TYPE_CHECKING
    got = _imports(src)
    assert "flora_graph.ir.ops" in got and "flora_graph.ir.node" not in got
    inner = ROOT / "ops" / "_onnx.py"  # imports onnx.numpy_helper inside tensor_attr()
    assert "onnx" in _imports(inner)
