"""One trained variant and seed, as the model class gives it back, and what a comparison keeps of each variant."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from perturbedvae.api.latents import LatentViews
from perturbedvae.api.model import PerturbedVAE
from perturbedvae.predictions import Predictions
from perturbedvae.train.config import ExperimentConfig


@dataclass
class TestPredictions:
    """A trained model and its predictions of its predictable test conditions, grouped by test subgroup."""

    model: PerturbedVAE
    predictions: Predictions
    groups: dict[str, list[str]]

    @property
    def run_info(self) -> dict[str, Any]:
        """The run's `run_info.json`: throughput, epochs, best epoch, latent diagnostics."""
        return self.model.state.run_info

    def training_log(self) -> pd.DataFrame:
        """One row per epoch: epoch, loss and the validation scores as `val_<metric>`."""
        return pd.DataFrame([{"epoch": r["epoch"], "loss": r["loss"], **{f"val_{k}": v for k, v in (r.get("val") or {}).items()}}
                             for r in self.model.history])


def train_and_predict(config: ExperimentConfig) -> TestPredictions | None:
    """Train one experiment's run directory and predict its test conditions (None on non-main processes).

    Test conditions with a gene outside the head's perturbation vocabulary are left out of the groups.
    """
    model = PerturbedVAE.train_run(config)
    if model is None:
        return None
    groups = {name: [c for c in members if model.can_predict(c)] for name, members in model.split.test_subgroups.items()}
    conditions = sorted({c for members in groups.values() for c in members})
    return TestPredictions(model, model.predict(conditions), groups)


@dataclass
class VariantResult:
    """One variant's runs: predictions per seed, resources, logs and the first seed's latent views."""

    predictions: dict[int, Predictions] = field(default_factory=dict)
    groups: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    run_infos: dict[int, dict[str, Any]] = field(default_factory=dict)
    logs: list[pd.DataFrame] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_is_lifetime: bool = False
    views: LatentViews | None = None


__all__ = ["TestPredictions", "VariantResult", "train_and_predict"]
