"""Metrics of predicted versus observed perturbation responses, as pure numpy functions.

Profile metrics take `(n_conditions, n_genes)` arrays of mean log-normalized profiles, one row per
condition, and return one value per row. A boolean `mask` of the same shape restricts a row to a gene set
(e.g. its top-20 DE genes); sets may differ in size between rows, so no loop over conditions is needed.
Distribution metrics take two `(n_cells, n_genes)` samples and return one number.

Definitions follow the publications whose numbers we compare with: GEARS (`gears/inference.py`) for
mse / pearson / delta / direction metrics, discrepancy-VAE (`uhlerlab/discrepancy_vae`) for normalized RMSE,
clipped R² and the 10-kernel MMD, scPerturb for the energy distance and PerturBench for the rank metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

DISCREPANCY_VAE_BANDWIDTHS: tuple[float, ...] = tuple(1000.0 / 2**5 * 2.0**i for i in range(10))
"""Gaussian kernel bandwidths of discrepancy-VAE's MMD (`fix_sigma=1000, kernel_num=10, kernel_mul=2`):
1000 / 2^5 · 2^i for i = 0..9, i.e. 31.25 to 16000, with k(x, y) = exp(−‖x − y‖² / bandwidth)."""

CELL_BATCH_SIZE = 32

LOWER_IS_BETTER: frozenset[str] = frozenset({"mse", "mse_de", "frac_opposite_direction_de", "nrmse", "rank", "mmd", "energy_distance"})
"""Metrics where a smaller value is better; the others (Pearson correlations, r2) are larger-better."""
"""discrepancy-VAE computes its per-cell metrics on batches of 32 cells and averages them."""


def _rows(values: np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array[None, :] if array.ndim == 1 else array


def _weights(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    return np.ones(shape) if mask is None else np.broadcast_to(_rows(mask), shape).astype(np.float64)


def gene_mask(gene_sets: Sequence[Sequence[int]], n_genes: int) -> np.ndarray:
    """Boolean `(len(gene_sets), n_genes)` mask with row i true at the indices in `gene_sets[i]`."""
    mask = np.zeros((len(gene_sets), n_genes), dtype=bool)
    for row, indices in enumerate(gene_sets):
        mask[row, np.asarray(indices, dtype=np.int64)] = True
    return mask


def mse(predicted: np.ndarray, observed: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Mean squared error per row: mean over genes g in the mask of (ŷ_g − y_g)²  (GEARS `mse`, `mse_de`)."""
    predicted, observed = _rows(predicted), _rows(observed)
    weights = _weights(mask, observed.shape)
    return (weights * (predicted - observed) ** 2).sum(axis=1) / weights.sum(axis=1)


def pearson(predicted: np.ndarray, observed: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Pearson correlation across the genes of each row: r = Σ(ŷ−ŷ̄)(y−ȳ) / √(Σ(ŷ−ŷ̄)² Σ(y−ȳ)²).

    A constant row makes r undefined; GEARS reports 0 then, and so do we, so that the numbers agree.
    """
    predicted, observed = _rows(predicted), _rows(observed)
    weights = _weights(mask, observed.shape)
    count = weights.sum(axis=1, keepdims=True)
    centred_predicted = weights * (predicted - (weights * predicted).sum(axis=1, keepdims=True) / count)
    centred_observed = weights * (observed - (weights * observed).sum(axis=1, keepdims=True) / count)
    numerator = (centred_predicted * centred_observed).sum(axis=1)
    denominator = np.sqrt((centred_predicted**2).sum(axis=1) * (centred_observed**2).sum(axis=1))
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, 0.0)


def pearson_delta(
    predicted: np.ndarray, observed: np.ndarray, control: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """Pearson correlation of the changes from control: r(ŷ − μ_c, y − μ_c)  (GEARS `pearson_delta(_de)`).

    Plain pearson is dominated by each gene's baseline level, which any model gets right by copying
    control; the delta version only rewards predicting the response.
    """
    control = np.asarray(control, dtype=np.float64)
    return pearson(_rows(predicted) - control, _rows(observed) - control, mask)


def frac_opposite_direction(
    predicted: np.ndarray, observed: np.ndarray, control: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """Fraction of masked genes changed in the opposite direction: #(|sign(ŷ−μ_c) − sign(y−μ_c)| = 2) / #mask.

    GEARS' `frac_opposite_direction_top20_non_dropout` when the mask is the non-dropout top-20 DE genes.
    """
    control = np.asarray(control, dtype=np.float64)
    weights = _weights(mask, _rows(observed).shape)
    opposite = np.abs(np.sign(_rows(predicted) - control) - np.sign(_rows(observed) - control)) == 2
    return (weights * opposite).sum(axis=1) / weights.sum(axis=1)


def r2_clipped(predicted: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Coefficient of determination of each mean profile, clipped at 0 (discrepancy-VAE's R²).

    R² = max(0, 1 − Σ_g (y_g − ŷ_g)² / Σ_g (y_g − ȳ)²), with the observed profile as reference. (The
    discrepancy-VAE notebook passes the prediction as `y_true` to sklearn; we use the observed profile,
    the orientation that measures how much observed variation the prediction explains.) A constant
    observed row scores 1 if predicted exactly, else 0, as in sklearn.
    """
    predicted, observed = _rows(predicted), _rows(observed)
    residual = ((observed - predicted) ** 2).sum(axis=1)
    total = ((observed - observed.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    safe = np.where(total > 0, total, 1.0)
    score = np.where(total > 0, 1.0 - residual / safe, np.where(residual == 0, 1.0, 0.0))
    return np.maximum(score, 0.0)


def normalized_rmse(predicted: np.ndarray, observed: np.ndarray) -> float:
    """Normalized RMSE of paired samples: √( mean((ŷ − y)²) / mean(y²) )  (discrepancy-VAE).

    Computed over all entries; 0 is perfect, 1 is what predicting all zeros scores.
    """
    predicted, observed = np.asarray(predicted, np.float64), np.asarray(observed, np.float64)
    return float(np.sqrt(np.mean((predicted - observed) ** 2) / np.mean(observed**2)))


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    squared = (x**2).sum(axis=1)[:, None] + (y**2).sum(axis=1)[None, :] - 2.0 * x @ y.T
    return np.maximum(squared, 0.0)


def mmd(x: np.ndarray, y: np.ndarray, bandwidths: Sequence[float] = DISCREPANCY_VAE_BANDWIDTHS) -> float:
    """Maximum mean discrepancy with a sum of Gaussian kernels (biased V-statistic, as discrepancy-VAE).

    MMD² = mean K(X, X) + mean K(Y, Y) − 2 mean K(X, Y), with K(a, b) = Σ_s exp(−‖a − b‖² / s) over the
    bandwidths s. For equal sample sizes this is discrepancy-VAE's `mean(XX + YY − XY − YX)`.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
        squared = _squared_distances(a, b)
        return float(sum(np.exp(-squared / bandwidth).mean() for bandwidth in bandwidths))

    return kernel_mean(x, x) + kernel_mean(y, y) - 2.0 * kernel_mean(x, y)


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance E = 2·E‖x − y‖ − E‖x − x'‖ − E‖y − y'‖ with Euclidean norms (V-statistic).

    Zero for identical samples, positive for samples from different distributions.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def mean_distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(_squared_distances(a, b)).mean())

    return 2.0 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y)


def mean_over_cell_batches(
    metric: Callable[[np.ndarray, np.ndarray], float],
    predicted_cells: np.ndarray,
    observed_cells: np.ndarray,
    batch_size: int = CELL_BATCH_SIZE,
) -> float:
    """Average of `metric` over consecutive batches of `batch_size` paired rows (discrepancy-VAE).

    Rows are paired by position up to the smaller sample; a last partial batch is dropped unless it is
    the only one, so every score comes from batches of the same size.
    """
    n_cells = min(len(predicted_cells), len(observed_cells))
    if n_cells == 0:
        raise ValueError("mean_over_cell_batches needs at least one cell on each side")
    starts = range(0, max(n_cells - batch_size, 0) + 1, batch_size)
    size = min(batch_size, n_cells)
    return float(np.mean([metric(predicted_cells[i : i + size], observed_cells[i : i + size]) for i in starts]))


def rank_score(predicted: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """PerturBench's rank metric: how many other conditions' predictions lie closer to an observed profile.

    For observed profile y_p, order all N predictions ŷ_q by Euclidean distance ‖ŷ_q − y_p‖; the score is
    the 0-based position of ŷ_p divided by N, ties counting half (the average rank, where PerturBench
    shuffles). 0 means the matching prediction is the closest; ≈ 0.5 means predictions do not tell
    conditions apart (e.g. a model predicting the same profile for everything). Euclidean distance is
    unchanged by subtracting the control mean, so this is also the rank on deltas.

    Distances equal up to floating-point rounding are ties: identical predictions computed along other
    paths differ in their last bits, and comparing those bits would order them by noise.
    """
    predicted, observed = _rows(predicted), _rows(observed)
    squared = _squared_distances(observed, predicted)
    own = np.diag(squared)[:, None]
    scale = (observed**2).sum(axis=1)[:, None] + (predicted**2).sum(axis=1)[None, :] + np.diag(squared)[:, None]
    tied_mask = np.abs(squared - own) <= _RANK_TIE_RTOL * scale
    closer = ((squared < own) & ~tied_mask).sum(axis=1)
    tied = tied_mask.sum(axis=1) - 1
    return (closer + 0.5 * tied) / len(observed)


_RANK_TIE_RTOL = 1e-9
"""Relative tolerance of the rank metric's ties, against ‖y‖² + ‖ŷ‖² (the rounding scale of a squared distance)."""
