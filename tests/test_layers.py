"""The layer rules of ../shared/DESIGN.md, enforced on every module's imports (module level and inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# folder -> (package, forbidden import prefixes, prefixes allowed only inside functions (lazily))
LAYERS = {
    "core": ("dwiflow.core",
             ("pydra", "fileformats", "nibabel", "bids", "yaml", "matplotlib", "dwiflow.tasks", "dwiflow.workflows",
              "dwiflow.bids_specs", "dwiflow.cli"),
             ("cvxpy",)),
    "tasks": ("dwiflow.tasks", ("dwiflow.workflows", "dwiflow.cli"), ()),
    "workflows": ("dwiflow.workflows", ("dwiflow.core", "dwiflow.cli"), ()),
    "bids_specs": ("dwiflow.bids_specs", ("dwiflow.core", "dwiflow.tasks", "dwiflow.workflows", "dwiflow.cli"), ()),
    # the front doors parse arguments and call tasks/workflows; of core they use only the error type
    "dwiflow": ("dwiflow", ("dwiflow.core.",), ()),
}
FRONT_DOOR_ALLOWED = ("dwiflow.core.errors",)


def imports_of(source: str, package: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in ``source``; relative imports resolved in ``package``."""
    tree = ast.parse(source)
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                found.extend((f"{module}.{alias.name}" if alias.name != "*" else module, top) for alias in child.names)
            visit(child, nested)

    visit(tree, True)
    return found


def violations(source: str, layer: str) -> list[str]:
    """Imports of ``source`` (a module of ``layer``) that the DESIGN.md table forbids."""
    package, forbidden, lazy_only = LAYERS[layer]
    bad = []
    for module, top in imports_of(source, package):
        if layer == "dwiflow" and module.startswith(FRONT_DOOR_ALLOWED):
            continue
        if any(module == f or module.startswith(f.rstrip(".") + ".") or (f.endswith(".") and module.startswith(f))
               for f in forbidden):
            bad.append(f"imports {module}")
        elif top and any(module == f or module.startswith(f + ".") for f in lazy_only):
            bad.append(f"imports {module} at module level (only lazily, inside a function)")
    return bad


def modules() -> list[tuple[str, Path]]:
    out = []
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            out.append((layer, path))
    return out


def test_every_module_keeps_to_its_layer():
    problems = [f"{path.relative_to(REPO)}: {v}" for layer, path in modules()
                for v in violations(path.read_text(), layer)]
    assert problems == []
    assert len(modules()) > 40  # the walk saw the whole package


@pytest.mark.parametrize("layer, source, expected", [
    ("workflows", "from dwiflow.core.tensor import TensorModel\n", "imports dwiflow.core.tensor.TensorModel"),
    ("workflows", "def f():\n    import dwiflow.core.csd\n", "imports dwiflow.core.csd"),
    ("core", "import nibabel as nib\n", "imports nibabel"),
    ("core", "from pydra.compose import python\n", "imports pydra.compose.python"),
    ("core", "import cvxpy\n", "imports cvxpy at module level"),
    ("core", "from ..tasks import io\n", "imports dwiflow.tasks.io"),
    ("bids_specs", "from dwiflow.tasks.registry import stages\n", "imports dwiflow.tasks.registry.stages"),
    ("tasks", "from dwiflow.workflows.recon import ReconRun\n", "imports dwiflow.workflows.recon.ReconRun"),
    ("dwiflow", "from dwiflow.core.csd import CsdModel\n", "imports dwiflow.core.csd.CsdModel"),
])
def test_a_violating_import_is_caught(layer, source, expected):
    """The checker itself: each deliberately violating import is reported."""
    assert [v for v in violations(source, layer) if v.startswith(expected)], violations(source, layer)


@pytest.mark.parametrize("layer, source", [
    ("core", "def solve():\n    import cvxpy\n"),  # CVXPY lazily, inside a solver
    ("tasks", "from dwiflow.core.csd import CsdModel\n"),
    ("workflows", "from dwiflow.tasks.registry import stages\n"),
    ("dwiflow", "from dwiflow.core.errors import DwiflowInputError\n"),
])
def test_allowed_imports_pass(layer, source):
    assert violations(source, layer) == []
