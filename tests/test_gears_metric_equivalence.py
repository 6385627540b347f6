"""Our DE genes and GEARS-style metrics equal GEARS' own on identical inputs (the real Norman subset).

GEARS is run as published (`gears.data_utils.get_DE_genes` + `get_dropout_non_zero_genes` on an AnnData in
GEARS' layout, then `gears.inference.compute_metrics`, `deeper_analysis`, `non_dropout_analysis` on
per-cell predictions), and compared with `compute_de_genes` + `Evaluator` on the same cells.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbedvae.data.conditions import CONTROL, genes_of
from perturbedvae.data.de import compute_de_genes
from perturbedvae.evaluate.evaluator import Evaluator
from perturbedvae.predictions import Predictions

gears_data_utils = pytest.importorskip("gears.data_utils")
gears_inference = pytest.importorskip("gears.inference")

# GEARS averages float32 tensors, we average in float64: allow float32 rounding, nothing more.
RTOL, ATOL = 1e-4, 1e-6


def gears_spelling(condition: str) -> str:
    genes = genes_of(condition)
    if not genes:
        return "ctrl"
    return f"{genes[0]}+ctrl" if len(genes) == 1 else "+".join(genes)


@pytest.fixture(scope="module")
def gears_adata(norman_data):
    obs = pd.DataFrame(
        {"condition": [gears_spelling(name) for name in norman_data.conditions], "cell_type": "K562"},
        index=norman_data.adata.obs_names,
    )
    var = pd.DataFrame({"gene_name": norman_data.genes}, index=norman_data.genes)
    adata = ad.AnnData(X=norman_data.adata.X.copy(), obs=obs, var=var)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = gears_data_utils.get_DE_genes(adata, skip_calc_de=False)
        return gears_data_utils.get_dropout_non_zero_genes(adata)


@pytest.fixture(scope="module")
def full_name(gears_adata) -> dict[str, str]:
    """GEARS condition (`A+ctrl`) -> its DE key (`K562_A+ctrl_1+1`)."""
    return dict(gears_adata.obs[["condition", "condition_name"]].values)


@pytest.fixture(scope="module")
def de(norman_data):
    return compute_de_genes(norman_data)


@pytest.fixture(scope="module")
def perturbed(norman_data) -> list[str]:
    return [name for name in norman_data.condition_names if name != CONTROL]


def test_de_top20_lists_equal_gears(norman_data, de, gears_adata, full_name, perturbed):
    genes = np.asarray(norman_data.genes)
    for condition in perturbed:
        key = full_name[gears_spelling(condition)]
        gears_ranked = list(gears_adata.uns["rank_genes_groups_cov_all"][key])
        assert list(genes[de.top(condition)]) == gears_ranked[:20], condition
        assert list(genes[de.non_dropout[condition]]) == list(gears_adata.uns["top_non_dropout_de_20"][key]), condition
        assert list(genes[de.ranked[condition]]) == gears_ranked, condition


def noisy_truth(norman_data, conditions, rng) -> dict[str, np.ndarray]:
    """Each condition's own cells plus Gaussian noise: a good but imperfect prediction."""
    cells = {}
    for condition in conditions:
        block = norman_data.adata.X[norman_data.cell_indices(condition)].toarray()
        cells[condition] = (block + rng.normal(0.0, 0.3, block.shape)).astype(np.float32)
    return cells


def shifted_control(norman_data, conditions, rng) -> dict[str, np.ndarray]:
    """Control cells shifted by another condition's response: a wrong prediction with mixed signs."""
    control = norman_data.adata.X[norman_data.cell_indices(CONTROL)].toarray()
    means = norman_data.mean_profiles
    cells = {}
    for position, condition in enumerate(conditions):
        other = conditions[(position + 5) % len(conditions)]
        shift = (means.loc[other] - means.loc[CONTROL]).to_numpy()
        size = len(norman_data.cell_indices(condition))
        chosen = control[rng.choice(len(control), size=size, replace=len(control) < size)]
        cells[condition] = (chosen + 1.5 * shift).astype(np.float32)
    return cells


def gears_results(predicted_cells, norman_data, gears_adata, full_name) -> dict[str, np.ndarray]:
    """GEARS' `evaluate()` output layout: per-cell pred/truth, their top-20 DE columns, pert_cat."""
    pert_cat, pred, truth, pred_de, truth_de = [], [], [], [], []
    var_names = gears_adata.var_names
    for condition, cells in predicted_cells.items():
        spelled = gears_spelling(condition)
        observed = norman_data.adata.X[norman_data.cell_indices(condition)].toarray()
        de_idx = np.where(var_names.isin(gears_adata.uns["rank_genes_groups_cov_all"][full_name[spelled]][:20]))[0]
        assert len(cells) == len(observed), "GEARS predicts one cell per observed cell"
        pert_cat += [spelled] * len(cells)
        pred.append(cells)
        truth.append(observed)
        pred_de.append(cells[:, de_idx])
        truth_de.append(observed[:, de_idx])
    return {
        "pert_cat": np.asarray(pert_cat),
        "pred": np.concatenate(pred),
        "truth": np.concatenate(truth),
        "pred_de": np.concatenate(pred_de),
        "truth_de": np.concatenate(truth_de),
    }


@pytest.mark.parametrize("make_prediction", [noisy_truth, shifted_control])
def test_metrics_equal_gears(make_prediction, norman_data, de, gears_adata, full_name, perturbed):
    predicted_cells = make_prediction(norman_data, perturbed, np.random.default_rng(3))
    means = pd.DataFrame(
        np.stack([cells.astype(np.float64).mean(axis=0) for cells in predicted_cells.values()]),
        index=list(predicted_cells),
        columns=norman_data.genes,
    )
    ours = Evaluator(norman_data, de, {"all": perturbed}).evaluate(Predictions(means)).per_condition

    test_res = gears_results(predicted_cells, norman_data, gears_adata, full_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, gears_basic = gears_inference.compute_metrics(test_res)
        gears_deeper = gears_inference.deeper_analysis(gears_adata, test_res)
        gears_non_dropout = gears_inference.non_dropout_analysis(gears_adata, test_res)

    pairs = {
        "mse": (gears_basic, "mse"),
        "mse_de": (gears_basic, "mse_de"),
        "pearson": (gears_basic, "pearson"),
        "pearson_de": (gears_basic, "pearson_de"),
        "pearson_delta": (gears_deeper, "pearson_delta"),
        "pearson_delta_de": (gears_deeper, "pearson_delta_de"),
        "frac_opposite_direction_de": (gears_non_dropout, "frac_opposite_direction_top20_non_dropout"),
    }
    for ours_name, (table, gears_name) in pairs.items():
        expected = np.array([table[gears_spelling(condition)][gears_name] for condition in perturbed], dtype=np.float64)
        np.testing.assert_allclose(ours.loc[perturbed, ours_name].to_numpy(), expected, rtol=RTOL, atol=ATOL, err_msg=ours_name)
    # The comparison means something only if the metrics vary across conditions.
    assert ours["pearson_delta"].std() > 0.01
