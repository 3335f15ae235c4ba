"""The package's layers import only downward, and no module imports itself round a circle.

Every ``import`` and ``from … import`` of the package's modules counts — at module level, inside
functions and under ``TYPE_CHECKING`` alike. The layer order is written once, here (the README's
"Architecture" section draws the same picture).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "zimage_trt"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Bottom to top. A layer imports only layers before it; names in one tuple are siblings, which
# do not import each other. Each sub-package is a layer; "base" is the package's top-level
# modules (version, atomic file writes, text tables), which import nothing of the package.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("base",),
    ("sampling",),
    ("models",),
    ("workflow",),
    ("engines",),
    ("runtime",),
    ("calibration",),
    ("build_engines",),
    ("bench", "serving"),
    ("cli",),
)
# ComfyUI's math alone: besides itself, sampling imports these and the standard library.
SAMPLING_IMPORTS = {"torch", "numpy", "scipy", "torchsde"}


@dataclass
class ImportGraph:
    """Module → {module it imports: first line}, and which modules are packages."""

    edges: dict[str, dict[str, int]] = field(default_factory=dict)
    packages: set[str] = field(default_factory=set)

    def layer(self, module: str) -> str:
        """``zimage_trt.engines.folder`` → ``engines``; top-level modules → ``base``."""
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and ".".join(parts[:2]) in self.packages else "base"


def rank(layer: str) -> int:
    for i, names in enumerate(LAYERS):
        if layer in names:
            return i
    raise AssertionError(f"layer {layer!r} is not in LAYERS: add it where it belongs")


def _imports(path: Path, module: str, modules: set[str]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in the file, resolved to the package's modules;
    other libraries come back as they are named."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upward
                parts = module.split(".")
                anchor = parts[: len(parts) - node.level + is_package]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                child = f"{base}.{alias.name}"
                yield (child if child in modules else base), node.lineno


def import_graph(root: Path) -> ImportGraph:
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = ImportGraph(packages={m for m, p in files.items() if p.name == "__init__.py"})
    for module, path in files.items():
        edges = graph.edges.setdefault(module, {})
        for target, line in _imports(path, module, set(files)):
            edges.setdefault(target, line)
    return graph


def violations(graph: ImportGraph) -> list[str]:
    """Imports from a lower layer to a higher one or to a sibling, and sampling's imports of
    anything but itself and its few libraries."""
    found = []
    for module, edges in graph.edges.items():
        here = graph.layer(module)
        for target, line in edges.items():
            top = target.split(".")[0]
            if top != PACKAGE:
                if here == "sampling" and top not in SAMPLING_IMPORTS | sys.stdlib_module_names:
                    found.append(
                        f"{module}:{line} imports {target} (sampling: ComfyUI's math only)"
                    )
                continue
            there = graph.layer(target)
            if here == "sampling" and there != "sampling":
                found.append(f"{module}:{line} imports {target} (sampling imports only itself)")
            elif there != here and rank(there) >= rank(here):
                way = "a sibling" if rank(there) == rank(here) else "a higher layer"
                found.append(f"{module}:{line} imports {target}, {way} ({here} → {there})")
    return sorted(found)


def circles(graph: ImportGraph) -> list[list[str]]:
    """The import cycles: Tarjan's strongly connected components of two or more modules, and
    modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.edges[node]:
            if target not in graph.edges:  # another library
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1 or node in graph.edges[node]:
                found.append(sorted(component))

    for node in sorted(graph.edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_belongs_to_a_layer() -> None:
    graph = import_graph(ROOT)
    assert len(graph.edges) > 60  # the whole package was read
    assert {graph.layer(m) for m in graph.edges} >= {"sampling", "models", "runtime", "cli"}
    for module in graph.edges:
        rank(graph.layer(module))


def test_layers_import_only_downward() -> None:
    assert violations(import_graph(ROOT)) == []


def test_no_import_circles() -> None:
    assert circles(import_graph(ROOT)) == []


def test_the_checks_catch_upward_sibling_and_circular_imports(tmp_path: Path) -> None:
    """A made-up package with one of each fault, imports hidden in a function and under
    TYPE_CHECKING: the checks above must name every one."""
    pkg = tmp_path / PACKAGE
    files = {
        "__init__.py": "",
        "text_table.py": "",
        "sampling/__init__.py": "",
        "sampling/noise.py": "import yaml\nfrom zimage_trt import text_table\n",
        "models/__init__.py": "",
        "models/a.py": "def f():\n    from zimage_trt.runtime import pipeline\n",
        "models/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from zimage_trt.models import c\n",
        "models/c.py": "from . import b\n",
        "bench/__init__.py": "from zimage_trt.serving import app\n",
        "serving/__init__.py": "",
        "serving/app.py": "",
        "runtime/__init__.py": "",
        "runtime/pipeline.py": "import zimage_trt.models.a\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert violations(graph) == [
        "zimage_trt.bench:1 imports zimage_trt.serving.app, a sibling (bench → serving)",
        "zimage_trt.models.a:2 imports zimage_trt.runtime.pipeline, a higher layer "
        "(models → runtime)",
        "zimage_trt.sampling.noise:1 imports yaml (sampling: ComfyUI's math only)",
        "zimage_trt.sampling.noise:2 imports zimage_trt.text_table (sampling imports only itself)",
    ]
    assert circles(graph) == [
        ["zimage_trt.models.a", "zimage_trt.runtime.pipeline"],
        ["zimage_trt.models.b", "zimage_trt.models.c"],
    ]
