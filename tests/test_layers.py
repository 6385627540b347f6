"""Imports flow one way: core helpers -> data -> model -> encoders -> evaluate -> train -> the model class
(api) -> experiments (comparison, benchmark) -> CLI. Read from the source, lazy imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "perturbedvae"
LAYERS = {
    "perturbedvae": 0, "errors": 0, "files": 0, "processes": 0, "yaml_files": 0, "vocabulary": 0, "verbosity": 0,
    "data": 1, "datasets": 1,
    "model": 2,
    "encoders": 3,
    "evaluate": 4,
    "train": 5,
    "api": 6,
    "comparison": 7, "benchmark": 7, "transfer": 7, "cell_split": 7,
    "cli": 8,
}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else LAYERS["perturbedvae"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("perturbedvae"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("perturbedvae"))
    return names


def test_every_module_has_a_layer() -> None:
    tops = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in PACKAGE.rglob("*.py")}
    assert tops - {"__init__"} <= set(LAYERS), f"give {sorted(tops - set(LAYERS) - {'__init__'})} a layer in this test"


def test_no_module_imports_a_higher_layer() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        for imported in _imports(path):
            if _layer(imported) > _layer(module):
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(upward)
