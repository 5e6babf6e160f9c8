"""The import graph follows the layers in docs/ARCHITECTURE.md: cli on top, then the workflows (infer,
train, ssl, explain, index, cytomine), then the parts they share (tiles, models, results, engine), then
the readers (slide, qupath). Nothing imports a layer above it, train and ssl share only through engine,
and the light modules (what `pathapp --help` and `pathapp info` load) never import torch or timm at
module level. Read from the source with ast, so a new module is checked the day it lands."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pathapp"

LAYERS = [
    {"__main__"},
    {"cli"},
    {"infer", "train", "ssl", "explain", "index", "cytomine", "segment"},
    {"tiles", "models", "results", "engine"},
    {"slide", "qupath"},
    {"atomic", "errors", "__init__"},
]
LEVEL = {pkg: n for n, layer in enumerate(LAYERS) for pkg in layer}
# Packages of one layer that may call each other, in this direction only (no cycles).
SIDEWAYS = {
    ("explain", "infer"), ("index", "infer"), ("cytomine", "infer"), ("segment", "infer"),
    ("cytomine", "train"), ("explain", "train"), ("index", "train"), ("segment", "train"),
    ("train", "infer"),
    ("results", "tiles"), ("tiles", "models"), ("results", "models"), ("models", "engine"), ("tiles", "engine"),
    ("qupath", "slide"),
}
FORBIDDEN = {("train", "ssl"), ("ssl", "train")}
HEAVY = {"torch", "timm", "torchvision"}
LIGHT = [
    "cli/**/*.py", "slide/**/*.py", "tiles/**/*.py", "qupath/**/*.py", "engine/__init__.py",
    "engine/distributed.py", "engine/workers.py", "models/loader.py", "models/registry.py",
    "infer/options.py", "infer/__init__.py", "__init__.py", "__main__.py", "atomic.py", "errors.py",
    # what `pathapp infer` loads before it forks the child that plans and reads the first slide (infer.ahead)
    "models/header.py", "infer/ahead.py", "infer/planner.py", "infer/pipeline.py", "infer/lease.py",
    "results/**/*.py",
]


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _package(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level?) for every import of pathapp or a third-party module.
    Imports under `if TYPE_CHECKING:` are for annotations only and are left out."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, child.lineno, top))
            elif isinstance(child, ast.ImportFrom) and child.level:
                raise AssertionError(f"{path}:{child.lineno}: use absolute imports (pathapp.…)")
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, True)
    return found


def _edges() -> list[tuple[str, str, str]]:
    edges = []
    for path in _modules():
        src = _package(path)
        for module, line, _ in _imports(path):
            parts = module.split(".")
            if parts[0] == "pathapp" and len(parts) > 1:
                edges.append((src, parts[1], f"{path.relative_to(SRC)}:{line}"))
    return edges


def test_every_package_has_a_layer():
    packages = {_package(p) for p in _modules()}
    assert packages - LEVEL.keys() == set(), "add new packages to LAYERS here and in docs/ARCHITECTURE.md"


def test_no_import_reaches_up_or_across_without_leave():
    bad = []
    for src, dst, where in _edges():
        if src == dst:
            continue
        if (src, dst) in FORBIDDEN:
            bad.append(f"{where}: {src} -> {dst} (share through engine)")
        elif LEVEL[dst] < LEVEL[src] or (LEVEL[dst] == LEVEL[src] and (src, dst) not in SIDEWAYS):
            bad.append(f"{where}: {src} -> {dst}")
    assert bad == []


def test_sideways_imports_have_no_cycles():
    assert {(a, b) for a, b in SIDEWAYS if (b, a) in SIDEWAYS} == set()


@pytest.mark.parametrize("pattern", LIGHT)
def test_light_modules_import_no_torch_at_module_level(pattern):
    paths = sorted(SRC.glob(pattern))
    assert paths, pattern
    heavy = [
        f"{p.relative_to(SRC)}:{line} imports {module}"
        for p in paths
        for module, line, top in _imports(p)
        if top and module.split(".")[0] in HEAVY
    ]
    assert heavy == []


def test_the_checker_sees_a_violation(tmp_path):
    """The walker finds module-level and nested imports and skips TYPE_CHECKING blocks."""
    f = tmp_path / "m.py"
    f.write_text(
        "from typing import TYPE_CHECKING\nimport torch\nif TYPE_CHECKING:\n    import timm\n"
        "def f():\n    from pathapp.cli import main\n"
    )
    assert _imports(f) == [("typing", 1, True), ("torch", 2, True), ("pathapp.cli", 6, False)]
