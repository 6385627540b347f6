"""Is the invariant latent invariant? Two measurements on posterior means z_inv of cells.

- `condition_probe`: how well a linear classifier tells the cells' conditions apart from z_inv, as the
  balanced accuracy of a nearest-class-mean classifier on standardised z_inv, cross-validated over
  stratified folds. Chance is 1 / number of conditions; an invariant latent stays near it.
- `alignment_null`: the alignment penalty's statistic on z_inv (median-heuristic bandwidths) beside its
  permutation null (condition labels shuffled over cells). Pooled: the MMD² between control and perturbed
  cells; per condition (`conditions` given): `condition_alignment_penalty`, the statistic of
  `alignment: mmd_per_condition`. A penalty whose value sits inside its null cannot tell the groups
  apart and so cannot act on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from perturbedvae.model.alignment import alignment_penalty, condition_alignment_penalty, gaussian_kernel, median_scale


@dataclass(frozen=True)
class ProbeResult:
    balanced_accuracy: float
    chance: float
    n_conditions: int


@dataclass(frozen=True)
class AlignmentNull:
    mmd: float
    null_95: float
    p_value: float


def condition_probe(z: np.ndarray, labels: np.ndarray, n_folds: int = 5, seed: int = 0) -> ProbeResult:
    """Cross-validated balanced accuracy of predicting `labels` from `z` [cells, K] (nearest class mean).

    Conditions with fewer cells than folds are left out (they cannot be stratified).
    """
    labels = np.asarray(labels).astype(str)
    names, counts = np.unique(labels, return_counts=True)
    keep = np.isin(labels, names[counts >= n_folds])
    z, labels = np.asarray(z, dtype=np.float64)[keep], labels[keep]
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError("the probe needs at least two conditions with enough cells")
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=np.int64)
    for name in classes:  # stratified: each condition's cells spread evenly over the folds
        rows = rng.permutation(np.flatnonzero(labels == name))
        folds[rows] = np.arange(len(rows)) % n_folds
    predicted = np.empty(len(labels), dtype=object)
    for fold in range(n_folds):
        train, test = folds != fold, folds == fold
        mean, scale = z[train].mean(axis=0), z[train].std(axis=0) + 1e-12
        standard = (z - mean) / scale
        centroids = np.vstack([standard[train & (labels == name)].mean(axis=0) for name in classes])
        distances = ((standard[test][:, None, :] - centroids[None]) ** 2).sum(axis=-1)
        predicted[test] = classes[distances.argmin(axis=1)]
    recalls = [np.mean(predicted[labels == name] == name) for name in classes]
    return ProbeResult(float(np.mean(recalls)), 1.0 / len(classes), len(classes))


def alignment_null(
    z: np.ndarray, is_control: np.ndarray, n_permutations: int = 100, seed: int = 0, conditions: np.ndarray | None = None
) -> AlignmentNull:
    """The alignment statistic of `z` [cells, K] beside the same statistic with the cells' labels shuffled.

    Without `conditions`: the pooled MMD² of control vs perturbed rows. With `conditions` [cells] (any
    labels; the controls' rows are those of `is_control`): the per-condition penalty, and the shuffle
    moves each cell's condition and control flag together, so the null keeps the conditions' sizes.
    """
    points = torch.as_tensor(np.asarray(z), dtype=torch.float32)
    flags = torch.as_tensor(np.asarray(is_control), dtype=torch.bool)
    # Shuffling the labels leaves the points, so every statistic reads blocks of one kernel matrix: the
    # kernel's exponentials were almost all of the test's cost when each permutation recomputed them.
    kernel = gaussian_kernel(points, points, median_scale(points))
    if conditions is None:
        def statistic(order: torch.Tensor) -> float:
            return float(alignment_penalty(points, flags[order], adaptive=True, kernel=kernel))
    else:
        _, codes = np.unique(np.asarray(conditions).astype(str), return_inverse=True)
        labels = torch.as_tensor(codes, dtype=torch.long)

        def statistic(order: torch.Tensor) -> float:
            return float(condition_alignment_penalty(points, flags[order], labels[order], kernel=kernel))
    observed = statistic(torch.arange(len(flags)))
    rng = np.random.default_rng(seed)
    null = np.array([statistic(torch.as_tensor(rng.permutation(len(flags)))) for _ in range(n_permutations)])
    return AlignmentNull(observed, float(np.quantile(null, 0.95)), float((1 + (null >= observed).sum()) / (1 + n_permutations)))
