"""Genetic interactions of held-out doubles: does a model predict how a pair departs from additivity?

The additive baseline is hard to beat on doubles (Ahlmann-Eltze et al. 2025), so the interesting part of
a double is what the sum of its singles misses. With δ = condition mean − control mean (log-normalized)
and the *observed* singles δ_A, δ_B (training data for every held-out double of the doubles split):

- non-additive residual ε = δ_AB − (δ_A + δ_B), and its size ‖ε‖₂ on the double's top-N DE genes. It
  is 0 for a perfectly additive pair. A prediction's residual is δ̂_AB − (δ_A + δ_B), i.e. how its
  double differs from the additive baseline's, so the additive baseline always predicts 0.
- Norman et al. (Science 2019)'s GI magnitude: fit δ_AB ≈ c_A δ_A + c_B δ_B by least squares (no
  intercept) and report √(c_A² + c_B²). An additive pair has c_A = c_B = 1, magnitude √2; larger values
  mean synergy, smaller mean buffering or suppression. Fitted on the same DE genes.

Scores are compared across doubles: the Pearson correlation of predicted and observed scores says
whether a model ranks the pairs' interactions right; per double, the Pearson correlation of predicted and
observed residual vectors says whether it predicts which genes interact, and in which direction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from perturbedvae.data.conditions import genes_of
from perturbedvae.data.de import DEGenes
from perturbedvae.data.loading import PerturbationData
from perturbedvae.errors import DataError
from perturbedvae.evaluate.metrics import pearson
from perturbedvae.predictions import Predictions

GI_SCORES: tuple[str, ...] = ("residual_norm", "norman_magnitude")
"""Per-double interaction scores, each compared between prediction and observation."""


def additivity_residual(double_delta: np.ndarray, single_a_delta: np.ndarray, single_b_delta: np.ndarray) -> np.ndarray:
    """ε = δ_AB − (δ_A + δ_B), elementwise (rows are doubles, columns genes)."""
    return np.asarray(double_delta, np.float64) - (np.asarray(single_a_delta, np.float64) + np.asarray(single_b_delta, np.float64))


def residual_norm(residual: np.ndarray) -> np.ndarray:
    """‖ε‖₂ of each row (the genes passed in are the genes scored)."""
    return np.sqrt((np.atleast_2d(np.asarray(residual, np.float64)) ** 2).sum(axis=1))


def norman_magnitude(double_delta: np.ndarray, single_a_delta: np.ndarray, single_b_delta: np.ndarray) -> float:
    """√(c_A² + c_B²) of the least-squares fit δ_AB ≈ c_A δ_A + c_B δ_B over the given genes (one double)."""
    design = np.column_stack([np.asarray(single_a_delta, np.float64), np.asarray(single_b_delta, np.float64)])
    coefficients, *_ = np.linalg.lstsq(design, np.asarray(double_delta, np.float64), rcond=None)
    return float(np.hypot(*coefficients))


def interaction_table(
    data: PerturbationData,
    predictions: Mapping[str, Predictions],
    doubles: Sequence[str],
    de: DEGenes,
) -> pd.DataFrame:
    """Observed and predicted GI scores of every two-gene condition in `doubles`, per named prediction.

    Conditions with another number of genes are ignored. Both singles must be observed in `data`.

    Returns:
        Tidy frame: model, condition, score (a GI_SCORES name or `residual_pearson`), observed, predicted.
        `residual_pearson` has the per-double correlation of residual vectors as `predicted` and 1 as
        `observed` (a perfect prediction).

    Raises:
        DataError: a double whose single is missing from the data, or a prediction lacking a double.
    """
    pairs = [name for name in doubles if len(genes_of(name)) == 2]
    profiles, control = data.mean_profiles, data.control_mean
    missing = sorted({gene for name in pairs for gene in genes_of(name) if gene not in profiles.index})
    if missing:
        raise DataError(f"GI scores need the observed single of every gene of a double; no cells for {', '.join(missing)}")
    rows = []
    for name in pairs:
        genes = de.top(name)
        gene_a, gene_b = genes_of(name)
        delta_a = profiles.loc[gene_a].to_numpy()[genes] - control[genes]
        delta_b = profiles.loc[gene_b].to_numpy()[genes] - control[genes]
        observed = profiles.loc[name].to_numpy()[genes] - control[genes]
        observed_residual = additivity_residual(observed, delta_a, delta_b)
        observed_scores = {"residual_norm": float(residual_norm(observed_residual)[0]), "norman_magnitude": norman_magnitude(observed, delta_a, delta_b)}
        for model, prediction in predictions.items():
            if name not in prediction.means.index:
                raise DataError(f"predictions {model!r} lack the double {name!r}; predict every scored double")
            predicted = prediction.means.loc[name, data.genes].to_numpy()[genes] - control[genes]
            predicted_residual = additivity_residual(predicted, delta_a, delta_b)
            predicted_scores = {
                "residual_norm": float(residual_norm(predicted_residual)[0]),
                "norman_magnitude": norman_magnitude(predicted, delta_a, delta_b),
                "residual_pearson": float(pearson(predicted_residual, observed_residual)[0]),
            }
            for score, value in predicted_scores.items():
                rows.append({"model": model, "condition": name, "score": score, "observed": observed_scores.get(score, 1.0), "predicted": value})
    return pd.DataFrame(rows, columns=["model", "condition", "score", "observed", "predicted"])


def interaction_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per model: Pearson r over doubles of predicted vs observed GI_SCORES, and mean residual_pearson.

    A model whose predicted score is the same for every double (the additive baseline's residual norm is
    always 0) has no defined correlation: NaN, which reports print as a dash.
    """
    records = []
    for model, group in table.groupby("model", sort=False):
        record: dict[str, float | str | int] = {"model": model}
        for score in GI_SCORES:
            scores = group[group["score"] == score]
            record[f"{score}_pearson"] = _correlation(scores["predicted"].to_numpy(), scores["observed"].to_numpy())
        record["mean_residual_pearson"] = float(group.loc[group["score"] == "residual_pearson", "predicted"].mean())
        record["n_doubles"] = int(group["condition"].nunique())
        records.append(record)
    return pd.DataFrame(records)


def _correlation(predicted: np.ndarray, observed: np.ndarray) -> float:
    if len(predicted) < 3 or np.ptp(predicted) == 0 or np.ptp(observed) == 0:
        return float("nan")
    return float(np.corrcoef(predicted, observed)[0, 1])
