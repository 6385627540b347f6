"""Seurat v3 highly-variable-gene statistics of raw counts in two chunked passes, for backed data.

scanpy's `highly_variable_genes(flavor="seurat_v3")` needs the count matrix in memory. The statistic
itself only needs per-gene sums: pass one gives each gene's mean and variance, a loess fit of
log10 variance on log10 mean (span 0.3, degree 2, as scanpy and Seurat) gives the expected standard
deviation, and pass two sums each gene's counts clipped at mean + sqrt(n_cells) x expected sd, and
their squares. The normalized variance is the variance of the standardized, clipped counts; genes are
ranked by it. Tested to select the genes scanpy selects in memory.
"""

from __future__ import annotations

import numpy as np

from perturbedvae.data.matrix import ExpressionRows

LOESS_SPAN = 0.3


def seurat_v3_normalized_variances(counts: ExpressionRows, span: float = LOESS_SPAN) -> np.ndarray:
    """Per gene, the variance of its standardized counts clipped Seurat-style (higher = more variable)."""
    from skmisc.loess import loess

    n_cells = counts.shape[0]
    sums, sum_squares = counts.group_sums(np.zeros(n_cells, dtype=np.int64), 1, squares=True, progress="gene variances")
    mean = sums[0] / n_cells
    variance = (sum_squares[0] / n_cells - mean**2) * n_cells / (n_cells - 1)
    not_constant = variance > 0
    fitted = np.zeros_like(mean)
    model = loess(np.log10(mean[not_constant]), np.log10(variance[not_constant]), span=span, degree=2)
    model.fit()
    fitted[not_constant] = model.outputs.fitted_values
    expected_sd = np.sqrt(10**fitted)
    clip = expected_sd * np.sqrt(n_cells) + mean
    clipped_sums, clipped_squares = _clipped_sums(counts, clip)
    return (n_cells * mean**2 + clipped_squares - 2 * clipped_sums * mean) / ((n_cells - 1) * expected_sd**2)


def top_genes(normalized_variances: np.ndarray, n_top_genes: int) -> np.ndarray:
    """Boolean mask of the `n_top_genes` most variable genes (ranks as scanpy computes them)."""
    ranks = np.argsort(np.argsort(-normalized_variances))
    return ranks < n_top_genes


def _clipped_sums(counts: ExpressionRows, clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_genes = counts.shape[1]
    sums, squares = np.zeros(n_genes), np.zeros(n_genes)
    for _, block in counts.chunks():
        if counts.is_sparse:
            values = np.minimum(block.data.astype(np.float64), clip[block.indices])
            sums += np.bincount(block.indices, weights=values, minlength=n_genes)
            squares += np.bincount(block.indices, weights=values**2, minlength=n_genes)
        else:
            values = np.minimum(np.asarray(block, dtype=np.float64), clip)
            sums += values.sum(axis=0)
            squares += (values**2).sum(axis=0)
    return sums, squares
