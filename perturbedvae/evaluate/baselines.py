"""The baselines every result is shown beside.

Each baseline sees only the training conditions of a split and predicts mean log-normalized profiles
for the requested conditions in the same `Predictions` format models produce, so one evaluator scores
them all. The additive baseline matters most: Ahlmann-Eltze, Huber & Anders (Nature Methods 2025) found
no deep model beating it on held-out Norman doubles. `dominance` and `saturating_additive` are the
two simplest non-additive rules: a model that claims to learn genetic interactions must beat them too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from perturbedvae.data.conditions import CONTROL, genes_of
from perturbedvae.data.de import compute_de_genes
from perturbedvae.data.loading import PerturbationData
from perturbedvae.data.splits import Split
from perturbedvae.errors import ConfigError, SplitError, did_you_mean
from perturbedvae.evaluate import metrics
from perturbedvae.predictions import Predictions

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
    return _frame(_delta_rows(data, conditions, deltas, lambda stack: stack.sum(axis=0)), conditions, data)


def dominance(data: PerturbationData, train: Sequence[str], conditions: Sequence[str]) -> Predictions:
    """Per gene, the change of the condition's single whose change is larger in absolute value.

    The combination behaves like its strongest single on every gene (epistatic dominance). For a single it
    is the additive prediction; a gene without a training single contributes no change.
    """
    deltas = single_gene_deltas(data, train)
    return _frame(_delta_rows(data, conditions, deltas, _largest_in_magnitude), conditions, data)


def saturating_additive(data: PerturbationData, train: Sequence[str], conditions: Sequence[str]) -> Predictions:
    """Additive, minus γ times the overlap of singles that move a gene the same way.

    μ꜀ + Σ_g Δ_g − γ·s, where on each gene s = sign · min_g |Δ_g| when every single of the condition moves
    it in the same direction (sign), else 0: two activations of one pathway add less than their sum.
    The single coefficient γ is fitted by least squares on the top-20 DE genes (GEARS' t-test ranking) of
    the training combinations whose genes all have training singles (γ = 0, the additive prediction, when
    there is none): on all genes the fit is dominated by unresponsive genes whose same-sign noise overlaps
    (on Norman LODO folds γ came out 0.75–1.16 that way, 0.48–0.71 on DE genes, which predicted better on
    5 of 5 held-out doubles). Singles are unchanged.
    """
    deltas = single_gene_deltas(data, train)
    gamma = fit_saturation(data, train, deltas)
    additive_rows = _delta_rows(data, conditions, deltas, lambda stack: stack.sum(axis=0))
    overlap_rows = _delta_rows(data, conditions, deltas, _same_direction_overlap) - data.control_mean
    return _frame(additive_rows - gamma * overlap_rows, conditions, data)


def fit_saturation(data: PerturbationData, train: Sequence[str], deltas: dict[str, np.ndarray], n_de_genes: int = 20) -> float:
    """Least-squares γ of `saturating_additive` on the training combinations' DE genes (0 without any)."""
    combos = [name for name in train if len(genes_of(name)) > 1 and all(gene in deltas for gene in genes_of(name))]
    if not combos:
        return 0.0
    de = compute_de_genes(data, n_top=n_de_genes)
    on_de = metrics.gene_mask([de.top(name) for name in combos], len(data.genes))
    observed = data.mean_profiles.loc[combos].to_numpy() - data.control_mean
    residual = observed - (_delta_rows(data, combos, deltas, lambda stack: stack.sum(axis=0)) - data.control_mean)
    overlap = (_delta_rows(data, combos, deltas, _same_direction_overlap) - data.control_mean) * on_de
    denominator = float((overlap**2).sum())
    return 0.0 if denominator == 0.0 else float(-(overlap * residual).sum() / denominator)


def _largest_in_magnitude(stack: np.ndarray) -> np.ndarray:
    """Per column, the entry of the [singles, genes] stack with the largest absolute value."""
    return np.take_along_axis(stack, np.abs(stack).argmax(axis=0)[None, :], axis=0)[0]


def _same_direction_overlap(stack: np.ndarray) -> np.ndarray:
    """Per column, sign · min |Δ| where every single moves the gene the same way (else 0); 0 for one single."""
    if len(stack) < 2:
        return np.zeros(stack.shape[1])
    signs = np.sign(stack)
    agree = (signs == signs[0]).all(axis=0) & (signs[0] != 0)
    return np.where(agree, signs[0] * np.abs(stack).min(axis=0), 0.0)


def _delta_rows(
    data: PerturbationData,
    conditions: Sequence[str],
    deltas: dict[str, np.ndarray],
    combine: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """[conditions, genes] control mean + `combine` of the stacked single deltas of each condition's genes."""
    zero = np.zeros(len(data.genes))
    rows = [data.control_mean + combine(np.vstack([deltas.get(gene, zero) for gene in genes_of(name)])) for name in conditions]
    return np.vstack(rows) if rows else np.empty((0, len(data.genes)))


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
    "dominance": dominance,
    "saturating_additive": saturating_additive,
}
"""Every baseline by the name reports use."""


def predict_baselines(data: PerturbationData, train: Sequence[str], conditions: Sequence[str]) -> dict[str, Predictions]:
    """Predictions of every baseline for `conditions`, trained on the `train` conditions only."""
    return {name: baseline(data, train, conditions) for name, baseline in BASELINES.items()}


class Baseline:
    """A baseline as a `Predictor`: `Baseline("additive").fit(data, split).predict(["A+B"])`.

    The same two calls as the PerturbedVAE model class, so the evaluator, notebooks and reports treat
    every model alike. Conditions are read in the data's spelling and answered under canonical names.
    """

    def __init__(self, name: str) -> None:
        if name not in BASELINES:
            raise ConfigError(f"unknown baseline {name!r}{did_you_mean(name, BASELINES, listing='baselines')}")
        self.name = name
        self._fitted: tuple[PerturbationData, list[str]] | None = None

    def __repr__(self) -> str:
        return f"Baseline({self.name!r})"

    def fit(self, data: PerturbationData, split: Split) -> Baseline:
        """Keep the split's training conditions (every baseline is a closed-form rule of their profiles)."""
        split.check_matches(data)
        self._fitted = (data, list(split.train))
        return self

    def can_predict(self, condition: str) -> bool:
        return True

    def predict(self, conditions: Sequence[str]) -> Predictions:
        if self._fitted is None:
            raise ConfigError(f"fit the {self.name} baseline first: Baseline({self.name!r}).fit(data, split)")
        data, train = self._fitted
        canonical = list(dict.fromkeys(data.syntax.canonical(text) for text in conditions))
        return BASELINES[self.name](data, train, canonical)


def all_baselines() -> dict[str, Baseline]:
    """Every baseline, unfitted, by the name reports use."""
    return {name: Baseline(name) for name in BASELINES}
