"""The noise floor: the error a perfect predictor of a condition's mean would still show.

An observed mean profile is itself an estimate from a finite number of cells. Splitting a condition's
cells into two random halves and comparing the half means shows how much of any error is sampling
noise. For n cells with per-gene variance σ², the half means differ by 2σ²/(n/2) = 4σ²/n in expected
squared error, while a perfect predictor of the true mean differs from the full-sample mean by σ²/n:
so the squared-error floor is a quarter of the half-vs-half MSE. For the correlation of changes from
control, the half-vs-half correlation r is a split-half reliability; Spearman–Brown gives the
reliability of the full sample, ρ = 2r / (1 + r), and the correlation of a perfect predictor with the
noisy full-sample change is √ρ (the ceiling of pearson_delta). Averaged over `n_repeats` seeded splits.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbedvae.data.de import DEGenes
from perturbedvae.data.loading import PerturbationData
from perturbedvae.evaluate import metrics

NOISE_FLOOR_METRICS: tuple[str, ...] = ("mse", "mse_de", "pearson_delta", "pearson_delta_de")


def noise_floor(
    data: PerturbationData, conditions: Sequence[str], de: DEGenes, n_repeats: int = 20, seed: int = 0
) -> pd.DataFrame:
    """Per condition (rows), the floor of each of NOISE_FLOOR_METRICS (columns), on the same DE genes as the metrics.

    Conditions with fewer than 4 cells get NaN (two halves of at least two cells are needed).
    """
    rows = {}
    control = data.control_mean
    for condition in conditions:
        cells = data.cell_indices(condition)
        if len(cells) < 4:
            rows[condition] = {name: np.nan for name in NOISE_FLOOR_METRICS}
            continue
        block = data.expression[np.sort(cells)]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        block = block.astype(np.float64)
        rng = np.random.default_rng([seed, zlib.crc32(condition.encode())])
        halves = [rng.permutation(len(block)) for _ in range(n_repeats)]
        first = np.vstack([block[order[: len(order) // 2]].mean(axis=0) for order in halves])
        second = np.vstack([block[order[len(order) // 2 :]].mean(axis=0) for order in halves])
        de_mask = metrics.gene_mask([de.top(condition)] * n_repeats, block.shape[1])
        rows[condition] = {
            "mse": float(metrics.mse(first, second).mean() / 4.0),
            "mse_de": float(metrics.mse(first, second, de_mask).mean() / 4.0),
            "pearson_delta": _ceiling(metrics.pearson_delta(first, second, control)),
            "pearson_delta_de": _ceiling(metrics.pearson_delta(first, second, control, de_mask)),
        }
    return pd.DataFrame.from_dict(rows, orient="index")[list(NOISE_FLOOR_METRICS)]


def _ceiling(half_correlations: np.ndarray) -> float:
    """√ of the Spearman–Brown full-sample reliability of the mean half-vs-half correlation (0 if not positive)."""
    r = float(np.mean(half_correlations))
    return float(np.sqrt(2.0 * r / (1.0 + r))) if r > 0 else 0.0
