"""perturbedvae: predict single-cell responses to genetic perturbations.

Data -> encoder -> head -> trainer -> evaluator, imports flowing one way. The user's API:

    import perturbedvae as pv
    data = pv.load_dataset("norman2019_subset")      # or an .h5ad path, or an AnnData in memory
    split = pv.splits.doubles(data, seed=1)
    model = pv.PerturbedVAE(data, split).train(max_epochs=20)
    results, tidy = pv.evaluate_models(data, split, {"PerturbedVAE": model})   # beside every baseline

Names are imported on first use, so `import perturbedvae` (and the CLI) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, str | None]] = {
    "load_dataset": ("perturbedvae.api.data", "load_dataset"),
    "splits": ("perturbedvae.api.splits", None),
    "PerturbedVAE": ("perturbedvae.api.model", "PerturbedVAE"),
    "Baseline": ("perturbedvae.evaluate.baselines", "Baseline"),
    "all_baselines": ("perturbedvae.evaluate.baselines", "all_baselines"),
    "evaluate_models": ("perturbedvae.evaluate.beside_baselines", "evaluate_predictors"),
    "Predictions": ("perturbedvae.predictions", "Predictions"),
    "Split": ("perturbedvae.data.splits", "Split"),
}

__all__ = ["Baseline", "PerturbedVAE", "Predictions", "Split", "__version__", "all_baselines", "evaluate_models", "load_dataset", "splits"]


def __getattr__(name: str) -> Any:
    """Import an exported name on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'perturbedvae' has no attribute {name!r}")
    module_name, attribute = _EXPORTS[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
