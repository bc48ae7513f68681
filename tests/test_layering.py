"""The package's role folders import downward only, and no module reaches itself through its imports.

Every import counts, at module level or inside a function: a function-local import is not a way
around a cycle. Layers, lowest first; a module may import its own layer and the ones below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import fxprune

PACKAGE = Path(fxprune.__file__).resolve().parent
LAYERS = [
    ("fxprune.errors",),
    ("fxprune.ir", "fxprune.budgets", "fxprune.cache", "fxprune.modules"),
    ("fxprune.rules",),
    ("fxprune.backends",),
    ("fxprune.frontends", "fxprune.solvers"),
    ("fxprune.passes",),
    ("fxprune.training",),
    ("fxprune.api", "fxprune.reports", "fxprune.saving", "fxprune.huggingface", "fxprune.yolo", "fxprune.testing",
     "fxprune.plots"),
    ("fxprune.cli", "fxprune"),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("fxprune",) + path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fxprune modules ``name`` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _layer(name: str) -> int:
    matches = [(len(prefix), index) for index, layer in enumerate(LAYERS) for prefix in layer
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} belongs to no layer: add it to LAYERS in {__file__}"
    return max(matches)[1]


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        graph.add_edges_from((name, target) for target in _imports(name, path, modules))
    return graph


def test_every_module_belongs_to_a_layer():
    for name in _modules():
        _layer(name)


def test_no_module_imports_upward():
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, b in import_graph().edges if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    cycles = [" -> ".join(cycle + cycle[:1]) for cycle in nx.simple_cycles(import_graph())]
    assert not cycles, "\n".join(cycles[:10])


def test_a_function_local_relative_import_is_seen(tmp_path):
    """The parser finds an import hidden in a function, relative or absolute, and flags it as upward."""
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from ..passes import rewrite\n    import fxprune.api\n")
    modules = {"fxprune.ir.x": source, "fxprune.passes.rewrite": source, "fxprune.api": source}
    found = _imports("fxprune.ir.x", source, modules)
    assert found == {"fxprune.passes.rewrite", "fxprune.api"}
    assert all(_layer(target) > _layer("fxprune.ir.x") for target in found)
