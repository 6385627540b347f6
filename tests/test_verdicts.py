"""Paired verdicts and the noise floor, checked by hand on small cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from perturbedvae.data.de import compute_de_genes
from perturbedvae.data.loading import load_dataset
from perturbedvae.evaluate.noise_floor import noise_floor
from perturbedvae.evaluate.verdicts import bootstrap_interval, paired_verdicts
from tests.conftest import make_toy_adata


def _tidy(values: dict[str, dict[tuple[str, int], float]], metric: str = "mse_de") -> pd.DataFrame:
    rows = [{"model": model, "combination": combination, "seed": seed, "metric": metric, "value": value}
            for model, scores in values.items() for (combination, seed), value in scores.items()]
    return pd.DataFrame(rows)


def test_wins_ties_losses_follow_the_metrics_direction():
    model = {("A", 1): 0.1, ("A", 2): 0.3, ("B", 1): 0.2, ("B", 2): 0.2}
    baseline = {("A", 1): 0.2, ("A", 2): 0.2, ("B", 1): 0.2, ("B", 2): 0.4}
    for metric, expected in (("mse_de", (2, 1, 1)), ("pearson_delta_de", (1, 1, 2))):
        verdict = paired_verdicts(_tidy({"m": model, "b": baseline}, metric), ["m"], ["b"], [metric]).iloc[0]
        assert (verdict["wins"], verdict["ties"], verdict["losses"]) == expected
        assert verdict["n_pairs"] == 4
        assert verdict["mean_difference"] == pytest.approx((-0.1 + 0.1 + 0.0 - 0.2) / 4)


def test_bootstrap_resamples_whole_combinations():
    index = pd.MultiIndex.from_tuples([("A", 1), ("A", 2), ("B", 1), ("B", 2)], names=["combination", "seed"])
    constant_within = pd.Series([1.0, 1.0, 3.0, 3.0], index=index)
    low, high = bootstrap_interval(constant_within, n_bootstrap=4000, seed=1)
    # resampling two combinations can only give means 1, 2 or 3
    assert low == pytest.approx(1.0) and high == pytest.approx(3.0)
    assert bootstrap_interval(constant_within, seed=1) == bootstrap_interval(constant_within, seed=1)
    same = pd.Series([0.5] * 4, index=index)
    assert bootstrap_interval(same) == pytest.approx((0.5, 0.5))


def test_noise_floor_of_gaussian_cells_is_the_sampling_variance_of_the_mean():
    """Cells around a fixed profile with per-gene sd σ: a perfect predictor still errs by σ²/n on average."""
    adata = make_toy_adata(cells_per_condition=200, seed=4)
    data = load_dataset(adata)
    condition = "G0+G1"
    floor = noise_floor(data, [condition], compute_de_genes(data), n_repeats=40)
    cells = data.expression[data.cell_indices(condition)]
    cells = np.asarray(cells.toarray() if hasattr(cells, "toarray") else cells)
    expected = float(cells.var(axis=0, ddof=1).mean() / len(cells))
    assert floor.at[condition, "mse"] == pytest.approx(expected, rel=0.25)
    assert 0.0 < floor.at[condition, "pearson_delta_de"] <= 1.0
