"""Does a model recover the true sparse mechanism shifts? Metrics against simulated ground truth.

A latent space is only identifiable up to a permutation of its dimensions and a per-dimension
rescaling (including a sign flip), so estimated dimensions are first matched to true ones. Following
the nonlinear-ICA literature (mean correlation coefficient, MCC), a true dimension is summarised by its
shifts across the P perturbations, and dimensions are matched one-to-one by the Hungarian algorithm on
the absolute Pearson correlation of those columns. Mask recovery is then scored as F1 over the
(perturbation, dimension) entries a perturbation truly moves, in the matched dimensions. On a screen
simulated with a true latent graph, the learned DAG is scored the same way: each learned edge is carried
to the matched true dimensions, rescaled to their units, and edge recovery is the F1 over directed pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from perturbedvae.errors import DataError

UNMATCHED = -1
"""Matching entry of a true dimension with no estimated partner."""

CHANCE_PERMUTATIONS = 20


def _as_matrix(values: object, what: str) -> np.ndarray:
    try:
        matrix = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise DataError(f"{what} must be numbers ({error})") from None
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise DataError(f"{what} must be a non-empty [perturbations, latent dims] matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise DataError(f"{what} has NaN or infinite values; identifiability needs finite estimates")
    return matrix


def _abs_column_correlation(true: np.ndarray, estimated: np.ndarray) -> np.ndarray:
    """|Pearson correlation| of every true column with every estimated column; 0 where a column is constant."""
    true_centred = true - true.mean(axis=0)
    estimated_centred = estimated - estimated.mean(axis=0)
    true_norm = np.linalg.norm(true_centred, axis=0)
    estimated_norm = np.linalg.norm(estimated_centred, axis=0)
    products = true_centred.T @ estimated_centred
    denominator = np.outer(true_norm, estimated_norm)
    correlation = np.divide(products, denominator, out=np.zeros_like(products), where=denominator > 0)
    return np.abs(np.clip(correlation, -1.0, 1.0))


def mean_correlation_coefficient(true: np.ndarray, estimated: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean correlation coefficient (MCC) between true and estimated latent effects.

    Args:
        true: [P, K_true] true latent shifts of P perturbations.
        estimated: [P, K_est] estimated shifts of the same perturbations, in the same order.

    Returns:
        The mean |correlation| over true dimensions after optimal one-to-one matching, and the matching:
        an int array of length K_true giving the estimated dimension matched to each true dimension, or
        `UNMATCHED`. A true dimension that no perturbation moves (constant column) cannot be identified
        from perturbations, so it is left unmatched and out of the mean; a true dimension left without
        a partner because K_est < K_true counts as correlation 0.

    Raises:
        DataError: for shapes that disagree, non-finite values, or no true dimension that varies.
    """
    true = _as_matrix(true, "true effects")
    estimated = _as_matrix(estimated, "estimated effects")
    if true.shape[0] != estimated.shape[0]:
        raise DataError(
            f"true effects have {true.shape[0]} perturbations but estimated effects {estimated.shape[0]}; "
            "give both for the same perturbations in the same order"
        )
    varying = np.flatnonzero(true.std(axis=0) > 0)
    if varying.size == 0:
        raise DataError("no true latent dimension varies across perturbations, so none can be identified")
    correlation = _abs_column_correlation(true[:, varying], estimated)
    rows, columns = linear_sum_assignment(correlation, maximize=True)
    matching = np.full(true.shape[1], UNMATCHED, dtype=np.int64)
    matching[varying[rows]] = columns
    return float(correlation[rows, columns].sum() / varying.size), matching


def mask_recovery_f1(
    true_masks: np.ndarray, estimated_masks: np.ndarray, matching: np.ndarray, threshold: float = 0.5
) -> float:
    """F1 of recovering which (perturbation, true dimension) entries are active.

    Args:
        true_masks: [P, K_true] 0/1 true masks.
        estimated_masks: [P, K_est] estimated masks or mask probabilities in [0, 1].
        matching: From `mean_correlation_coefficient`: estimated dimension of each true dimension.
        threshold: A probability at or above it counts as active.

    True dimensions without a match contribute their active entries as misses; estimated dimensions
    matched to no true dimension are ignored (they may hold variation the truth does not have).
    Returns 1.0 when nothing is active in either.
    """
    true_active = _as_matrix(true_masks, "true masks") > 0.5
    probabilities = _as_matrix(estimated_masks, "estimated mask probabilities")
    matching = np.asarray(matching, dtype=np.int64)
    if probabilities.min() < 0 or probabilities.max() > 1:
        raise DataError("estimated mask probabilities must lie in [0, 1]; apply a sigmoid to logits first")
    if true_active.shape[0] != probabilities.shape[0] or matching.shape != (true_active.shape[1],):
        raise DataError(
            f"shapes disagree: true masks {true_active.shape}, estimated {probabilities.shape}, matching "
            f"{matching.shape}; the matching needs one entry per true dimension"
        )
    if matching.max() >= probabilities.shape[1] or matching.min() < UNMATCHED:
        raise DataError(f"matching refers to estimated dimensions outside 0..{probabilities.shape[1] - 1}")
    matched = matching != UNMATCHED
    estimated_active = np.zeros_like(true_active)
    estimated_active[:, matched] = probabilities[:, matching[matched]] >= threshold
    true_positives = int((true_active & estimated_active).sum())
    errors = int((true_active ^ estimated_active).sum())
    if true_positives + errors == 0:
        return 1.0
    return 2 * true_positives / (2 * true_positives + errors)


EDGE_THRESHOLD = 0.25
"""|weight| (in the true dimensions' units) at or above which an edge counts as present; the simulator's
true edges have |weight| ≥ 0.5 × `edge_weight`."""


def dimension_scales(true: np.ndarray, estimated: np.ndarray, matching: np.ndarray) -> np.ndarray:
    """Least-squares factor a_k with estimated[:, matching[k]] ≈ a_k · true[:, k] (signed; NaN if unmatched).

    Learned dimensions are the true ones only up to scale and sign; an edge weight between two of them
    is in their units, so comparing it with the true weight needs these factors.
    """
    scales = np.full(true.shape[1], np.nan)
    for dim, match in enumerate(matching):
        column = true[:, dim]
        if match != UNMATCHED and column @ column > 0:
            scales[dim] = float(column @ estimated[:, match] / (column @ column))
    return scales


def graph_recovery_f1(
    true_graph: np.ndarray, estimated_graph: np.ndarray, matching: np.ndarray, scales: np.ndarray,
    threshold: float = EDGE_THRESHOLD,
) -> dict[str, float]:
    """F1 of the directed edges of a learned latent DAG against the true one.

    Args:
        true_graph: [K_true, K_true] true adjacency (A[i, j]: edge i -> j).
        estimated_graph: [K_est, K_est] learned adjacency in the same convention.
        matching: Estimated dimension of each true dimension (`mean_correlation_coefficient`).
        scales: `dimension_scales` of the matched dimensions.
        threshold: |weight| in true units at or above which an edge counts as present.

    An edge i -> j of the truth is recovered when the learned edge matching(i) -> matching(j), divided by
    scale_j / scale_i (u_est = scale · u_true, so A_est = A_true · scale_j / scale_i), reaches the
    threshold; a reversed edge is a miss plus a false alarm. Pairs touching an unmatched dimension count
    their true edges as misses. Returns `edge_f1` (1.0 when neither graph has an edge), and the counts.
    """
    true_graph = _as_matrix(true_graph, "true graph")
    estimated_graph = _as_matrix(estimated_graph, "estimated graph")
    matching = np.asarray(matching, dtype=np.int64)
    k = true_graph.shape[0]
    if true_graph.shape != (k, k) or estimated_graph.shape[0] != estimated_graph.shape[1] or matching.shape != (k,):
        raise DataError(
            f"graphs must be square with one matching entry per true dimension: true {true_graph.shape}, "
            f"estimated {estimated_graph.shape}, matching {matching.shape}"
        )
    matched = (matching != UNMATCHED) & np.isfinite(scales) & (np.abs(scales) > 0)
    in_true_units = np.zeros_like(true_graph)
    index = np.flatnonzero(matched)
    block = estimated_graph[np.ix_(matching[index], matching[index])]
    in_true_units[np.ix_(index, index)] = block * scales[index][:, None] / scales[index][None, :]
    off_diagonal = ~np.eye(k, dtype=bool)
    true_edges = (np.abs(true_graph) > 0) & off_diagonal
    found = (np.abs(in_true_units) >= threshold) & off_diagonal
    hits = int((true_edges & found).sum())
    errors = int((true_edges ^ found).sum())
    return {
        "edge_f1": 1.0 if hits + errors == 0 else 2 * hits / (2 * hits + errors),
        "n_true_edges": int(true_edges.sum()),
        "n_estimated_edges": int(found.sum()),
    }


def chance_mcc(true: np.ndarray, estimated: np.ndarray, permutations: int = CHANCE_PERMUTATIONS, seed: int = 0) -> float:
    """MCC expected by chance: the mean MCC after shuffling which perturbation each estimated row belongs to.

    With few perturbations the best matching of unrelated columns already scores high (about 0.5 for
    12 perturbations and 10 dimensions), so an MCC means little without this reference.
    """
    rng = np.random.default_rng(seed)
    estimated = _as_matrix(estimated, "estimated effects")
    scores = [mean_correlation_coefficient(true, estimated[rng.permutation(len(estimated))])[0] for _ in range(permutations)]
    return float(np.mean(scores))


def _aligned(values: object, perturbations: Sequence[str], what: str) -> np.ndarray:
    """Rows of `values` in the ground truth's perturbation order; a DataFrame is aligned by its index."""
    if isinstance(values, pd.DataFrame):
        missing = [name for name in perturbations if name not in values.index]
        if missing:
            raise DataError(f"{what} has no row for perturbation(s) {', '.join(missing[:5])}; index rows by gene name")
        values = values.loc[list(perturbations)].to_numpy()
    matrix = _as_matrix(values, what)
    if matrix.shape[0] != len(perturbations):
        raise DataError(
            f"{what} has {matrix.shape[0]} rows but the ground truth has {len(perturbations)} perturbations; "
            "give one row per perturbation in uns['ground_truth']['perturbations'] order, or a DataFrame indexed by gene"
        )
    return matrix


def identifiability_report(
    ground_truth: Mapping[str, object], estimated_effects: object, estimated_mask_probs: object, threshold: float = 0.5,
    estimated_graph: object | None = None,
) -> dict[str, object]:
    """MCC and mask F1 of a model's per-perturbation latent shifts against simulated ground truth.

    Args:
        ground_truth: `adata.uns['ground_truth']` of a simulated dataset (see `data.synthetic.simulate`),
            as written or after an h5ad round trip.
        estimated_effects: [P, K_est] estimated latent shift of each single perturbation (the masked
            effect, e.g. m * e), rows in ground-truth order, or a DataFrame indexed by gene name.
        estimated_mask_probs: [P, K_est] mask probabilities, aligned the same way.
        threshold: Mask probability counted as active.
        estimated_graph: [K_est, K_est] learned latent DAG; with it (and a truth that has a `graph`),
            the report adds `edge_f1`, `n_true_edges` and `n_estimated_edges` (see `graph_recovery_f1`).

    Returns:
        `mcc`, `mcc_chance` (see `chance_mcc`), `mask_f1`, `matching` (estimated dim of each true dim, -1 if none), `per_dim_correlation`
        (|corr| of each matched true dim, NaN if unmatched), and the sizes compared.
    """
    for key in ("perturbations", "masks", "effects"):
        if key not in ground_truth:
            raise DataError(f"ground truth has no {key!r}; pass adata.uns['ground_truth'] of a simulated dataset")
    perturbations = [str(name) for name in ground_truth["perturbations"]]
    true_masks = _as_matrix(ground_truth["masks"], "ground-truth masks")
    true_shifts = true_masks * _as_matrix(ground_truth["effects"], "ground-truth effects")
    effects = _aligned(estimated_effects, perturbations, "estimated effects")
    mask_probs = _aligned(estimated_mask_probs, perturbations, "estimated mask probabilities")
    if effects.shape != mask_probs.shape:
        raise DataError(f"estimated effects {effects.shape} and mask probabilities {mask_probs.shape} differ in shape")
    mcc, matching = mean_correlation_coefficient(true_shifts, effects)
    correlation = _abs_column_correlation(true_shifts, effects)
    per_dim = [float(correlation[dim, match]) if match != UNMATCHED else float("nan") for dim, match in enumerate(matching)]
    graph = {}
    if estimated_graph is not None and "graph" in ground_truth:
        scales = dimension_scales(true_shifts, effects, matching)
        graph = graph_recovery_f1(ground_truth["graph"], estimated_graph, matching, scales)
    return {
        "mcc": mcc,
        "mcc_chance": chance_mcc(true_shifts, effects),
        "mask_f1": mask_recovery_f1(true_masks, mask_probs, matching, threshold),
        "matching": matching.tolist(),
        "per_dim_correlation": per_dim,
        "n_perturbations": len(perturbations),
        "n_latent_true": true_shifts.shape[1],
        "n_latent_estimated": effects.shape[1],
        **graph,
    }
