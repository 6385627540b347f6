"""Imports flow one way: core helpers -> data (and the prediction format) -> model -> encoders -> evaluate |
train -> the model class (api) -> experiments (comparison, benchmark) -> CLI. Training and evaluation share a
layer and import neither other: the trainer is given its validation scoring as a callback, built above
both. Read from the source, lazy imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "perturbedvae"
LAYERS = {
    "perturbedvae": 0, "errors": 0, "checks": 0, "files": 0, "processes": 0, "yaml_files": 0, "vocabulary": 0,
    "verbosity": 0,
    "data": 1, "datasets": 1, "predictions": 1,
    "model": 2,
    "encoders": 3,
    "evaluate": 4, "train": 4,
    "api": 5,
    "comparison": 6, "benchmark": 6, "transfer": 6, "cell_split": 6,
    "cli": 7,
}
INDEPENDENT = (("train", "evaluate"), ("evaluate", "train"))
"""(importer, imported) packages of one layer that must not import each other."""


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "perturbedvae"


def _layer(module: str) -> int:
    return LAYERS[_top(module)]


def _package_imports() -> list[tuple[str, str]]:
    """(module, module it imports) for every perturbedvae import in the package."""
    pairs = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        pairs.extend((module, imported) for imported in sorted(_imports(path)))
    return pairs


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
    upward = [f"{module} imports {imported}" for module, imported in _package_imports() if _layer(imported) > _layer(module)]
    assert not upward, "\n".join(upward)


def test_training_and_evaluation_import_neither_other() -> None:
    crossing = [f"{module} imports {imported}" for module, imported in _package_imports()
                if (_top(module), _top(imported)) in INDEPENDENT]
    assert not crossing, "\n".join(crossing)
