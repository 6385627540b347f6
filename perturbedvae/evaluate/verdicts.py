"""Paired verdicts: is a model better than a baseline on the same held-out combinations and seeds?

Means over a handful of combinations hide which way each comparison went. A verdict pairs the model's
score with the baseline's on every (combination, seed) both were scored on, and reports the mean
difference (model − baseline, so negative is better for errors), wins / ties / losses in the metric's
direction, and a bootstrap 95% interval of the mean difference. The bootstrap resamples whole
combinations (their seeds stay together): seeds of one combination share its cells and DE genes, so
they are not independent evidence, and resampling pairs would make the interval too narrow.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from perturbedvae.evaluate.metrics import LOWER_IS_BETTER

TIE_TOLERANCE = 1e-9
"""Differences within this (relative to the scores' size) are ties: baselines that agree on a
combination, or a model that reproduces one, differ there only by rounding."""

VERDICT_COLUMNS = ["model", "baseline", "metric", "mean_difference", "ci_low", "ci_high", "wins", "ties", "losses", "n_pairs"]


def paired_verdicts(
    tidy: pd.DataFrame,
    models: Sequence[str],
    baselines: Sequence[str],
    metrics: Sequence[str],
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (model, baseline, metric) with the paired statistics described in the module docstring.

    Args:
        tidy: Columns model, combination, seed, metric, value (the benchmark's table).
        models, baselines: Names in `tidy["model"]` to compare, every model against every baseline.
        metrics: Metrics to compare on.
        n_bootstrap: Bootstrap resamples of combinations.
        seed: Seed of the bootstrap.
    """
    rows = []
    for metric in metrics:
        scores = tidy[tidy["metric"] == metric].pivot_table(index=["combination", "seed"], columns="model", values="value")
        for model in models:
            for baseline in baselines:
                if model not in scores or baseline not in scores:
                    continue
                pairs = scores[[model, baseline]].dropna()
                rows.append({"model": model, "baseline": baseline, "metric": metric,
                             **_paired_statistics(pairs[model], pairs[baseline], metric, n_bootstrap, seed)})
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def _paired_statistics(model: pd.Series, baseline: pd.Series, metric: str, n_bootstrap: int, seed: int) -> dict:
    difference = model - baseline
    scale = np.maximum(np.abs(model.to_numpy()), np.abs(baseline.to_numpy()))
    tied = np.abs(difference.to_numpy()) <= TIE_TOLERANCE * np.maximum(scale, 1.0)
    better = difference.to_numpy() < 0 if metric in LOWER_IS_BETTER else difference.to_numpy() > 0
    low, high = bootstrap_interval(difference, n_bootstrap, seed)
    return {
        "mean_difference": float(difference.mean()) if len(difference) else np.nan,
        "ci_low": low,
        "ci_high": high,
        "wins": int((better & ~tied).sum()),
        "ties": int(tied.sum()),
        "losses": int((~better & ~tied).sum()),
        "n_pairs": len(difference),
    }


def bootstrap_interval(difference: pd.Series, n_bootstrap: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of `difference` (indexed by combination, seed), resampling combinations.

    Each resample draws as many combinations as there are, with replacement, and averages the pairs of
    the drawn combinations (a combination drawn twice counts twice). NaN for no pairs.
    """
    if difference.empty:
        return np.nan, np.nan
    by_combination = difference.groupby(level="combination")
    sums = by_combination.sum().to_numpy()
    counts = by_combination.size().to_numpy()
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(sums), size=(n_bootstrap, len(sums)))
    means = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))
