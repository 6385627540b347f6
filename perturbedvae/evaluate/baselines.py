"""The four baselines every result is shown beside.

Each baseline sees only the training conditions of a split and predicts mean log-normalized profiles
for the requested conditions in the same `Predictions` format models produce, so one evaluator scores
them all. The additive baseline matters most: Ahlmann-Eltze, Huber & Anders (Nature Methods 2025) found
no deep model beating it on held-out Norman doubles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from perturbedvae.data.conditions import CONTROL, genes_of
from perturbedvae.data.loading import PerturbationData
from perturbedvae.errors import SplitError
from perturbedvae.evaluate.predictions import Predictions

BaselineFn = Callable[[PerturbationData, Sequence[str], Sequence[str]], Predictions]


def _training_profiles(data: PerturbationData, train: Sequence[str]) -> pd.DataFrame:
    """Mean profiles of the perturbed training conditions (control excluded)."""
    names = [name for name in train if name != CONTROL]
    missing = sorted(set(names) - set(data.mean_profiles.index))
    if missing:
        raise SplitError(f"training conditions absent from the data: {', '.join(missing[:10])}")
    if not names:
        raise SplitError("the split has no perturbed training condition; baselines need at least one")
    return data.mean_profiles.loc[names]


def _frame(rows: np.ndarray, conditions: Sequence[str], data: PerturbationData) -> Predictions:
    return Predictions(means=pd.DataFrame(np.asarray(rows, dtype=np.float64), index=list(conditions), columns=data.genes))


def no_change(data: PerturbationData, train: Sequence[str], conditions: Sequence[str]) -> Predictions:
    """Predict the control mean for every condition: the floor any model must clear."""
    return _frame(np.tile(data.control_mean, (len(conditions), 1)), conditions, data)


def train_mean(data: PerturbationData, train: Sequence[str], conditions: Sequence[str]) -> Predictions:
    """Predict the mean of the training perturbation profiles (GEARS issue #82: nearly matches GEARS)."""
    profile = _training_profiles(data, train).to_numpy().mean(axis=0)
    return _frame(np.tile(profile, (len(conditions), 1)), conditions, data)


def single_gene_deltas(data: PerturbationData, train: Sequence[str]) -> dict[str, np.ndarray]:
    """Change from control of every single-gene training condition, keyed by gene."""
    profiles = _training_profiles(data, train)
    control = data.control_mean
    return {genes_of(name)[0]: profiles.loc[name].to_numpy() - control for name in profiles.index if len(genes_of(name)) == 1}


def additive(data: PerturbationData, train: Sequence[str], conditions: Sequence[str]) -> Predictions:
    """Control mean plus the sum of the training single-gene changes of the condition's genes.

    A gene without a training single contributes no change, so a single the model never saw is predicted
    as control (the no-change prediction).
    """
    deltas = single_gene_deltas(data, train)
    zero = np.zeros(len(data.genes))
    rows = [data.control_mean + sum((deltas.get(gene, zero) for gene in genes_of(name)), zero) for name in conditions]
    return _frame(np.vstack(rows) if rows else np.empty((0, len(data.genes))), conditions, data)


def linear(
    data: PerturbationData,
    train: Sequence[str],
    conditions: Sequence[str],
    n_components: int = 10,
    ridge: float = 0.1,
) -> Predictions:
    """The linear baseline of Ahlmann-Eltze et al.: Y ≈ G W Pᵀ + b, ridge-regularised.

    Y holds the training profiles (genes × conditions), b their row means, G the first `n_components`
    principal axes of Y − b over genes. The paper takes a perturbation's embedding from G's row of the
    perturbed gene, which needs the gene to be measured; in panels like the Norman subset most perturbed
    genes are not, so a gene's embedding here is its training single's PCA score, (y_g − b)ᵀG, and a
    combination's embedding is the sum over its genes (unseen genes add nothing). W solves
    (GᵀG + λI) W (PᵀP + λI) = Gᵀ(Y − b)P, and a condition with embedding p is predicted as b + G W p.
    """
    profiles = _training_profiles(data, train)
    y = profiles.to_numpy().T
    b = y.mean(axis=1, keepdims=True)
    centred = y - b
    k = max(1, min(n_components, min(centred.shape) - 1 if min(centred.shape) > 1 else 1))
    u, _, _ = np.linalg.svd(centred, full_matrices=False)
    g = u[:, :k]
    gene_embedding = {
        genes_of(name)[0]: centred[:, column] @ g
        for column, name in enumerate(profiles.index)
        if len(genes_of(name)) == 1
    }

    def embed(name: str) -> np.ndarray:
        return sum((gene_embedding.get(gene, np.zeros(k)) for gene in genes_of(name)), np.zeros(k))

    p = np.vstack([embed(name) for name in profiles.index])
    left = g.T @ g + ridge * np.eye(k)
    right = p.T @ p + ridge * np.eye(k)
    w = np.linalg.solve(left, g.T @ centred @ p) @ np.linalg.inv(right)
    rows = [(b[:, 0] + g @ w @ embed(name)) for name in conditions]
    return _frame(np.vstack(rows) if rows else np.empty((0, len(data.genes))), conditions, data)


BASELINES: dict[str, BaselineFn] = {
    "no_change": no_change,
    "train_mean": train_mean,
    "additive": additive,
    "linear": linear,
}
"""Every baseline by the name reports use."""


def predict_baselines(data: PerturbationData, train: Sequence[str], conditions: Sequence[str]) -> dict[str, Predictions]:
    """Predictions of every baseline for `conditions`, trained on the `train` conditions only."""
    return {name: baseline(data, train, conditions) for name, baseline in BASELINES.items()}
