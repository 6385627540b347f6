"""Evaluator, Predictions I/O, compare and write_metrics on toy data."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbedvae.data.de import compute_de_genes
from perturbedvae.data.loading import load_dataset
from perturbedvae.errors import DataError
from perturbedvae.evaluate import Evaluator, evaluate_named, write_metrics
from perturbedvae.evaluate.evaluator import METRICS
from perturbedvae.predictions import Predictions
from tests.conftest import make_toy_adata

GROUPS = {"single": ["G0", "G1", "G2"], "double": ["G0+G1", "G1+G2"]}
CONDITIONS = ["G0", "G1", "G2", "G0+G1", "G1+G2"]


@pytest.fixture(scope="module")
def toy_data():
    return load_dataset(make_toy_adata(cells_per_condition=40))


@pytest.fixture(scope="module")
def evaluator(toy_data):
    return Evaluator(toy_data, compute_de_genes(toy_data), GROUPS, max_cells=60)


def observed_means(data, conditions=CONDITIONS) -> Predictions:
    return Predictions(data.mean_profiles.loc[conditions].copy())


def control_means(data, conditions=CONDITIONS) -> Predictions:
    return Predictions(pd.DataFrame(np.tile(data.control_mean, (len(conditions), 1)), index=conditions, columns=data.genes))


def test_perfect_prediction_scores_perfectly(toy_data, evaluator):
    scores = evaluator.evaluate(observed_means(toy_data)).per_condition
    np.testing.assert_allclose(scores[["mse", "mse_de", "frac_opposite_direction_de", "rank"]], 0.0, atol=1e-12)
    np.testing.assert_allclose(scores[["pearson", "pearson_de", "pearson_delta", "pearson_delta_de", "r2"]], 1.0)


def test_no_change_prediction_scores_worse_everywhere(toy_data, evaluator):
    perfect = evaluator.evaluate(observed_means(toy_data)).overall
    no_change = evaluator.evaluate(control_means(toy_data)).overall
    for metric in ("mse", "mse_de", "rank", "nrmse", "mmd", "energy_distance"):
        assert no_change[metric] > perfect[metric], metric
    assert no_change["pearson_delta"] == 0.0  # constant delta: undefined correlation, reported 0 as GEARS


def test_per_subgroup_is_the_mean_over_its_conditions(toy_data, evaluator):
    result = evaluator.evaluate(control_means(toy_data))
    assert list(result.per_condition.columns) == [*METRICS, "subgroup"]
    for name, conditions in GROUPS.items():
        expected = result.per_condition.loc[conditions, list(METRICS)].mean()
        pd.testing.assert_series_equal(result.per_subgroup.loc[name, list(METRICS)], expected, check_names=False)
        assert result.per_subgroup.loc[name, "n_conditions"] == len(conditions)
    pd.testing.assert_series_equal(result.overall, result.per_condition[list(METRICS)].mean(), check_names=False)


def test_condition_in_two_subgroups_is_scored_once_overall(toy_data):
    evaluator = Evaluator(toy_data, compute_de_genes(toy_data), {"all": CONDITIONS, "double": ["G0+G1", "G1+G2"]}, max_cells=30)
    result = evaluator.evaluate(control_means(toy_data))
    assert len(result.per_condition) == 7
    assert result.per_subgroup["n_conditions"].to_dict() == {"all": 5, "double": 2}
    unique = result.per_condition[result.per_condition["subgroup"] == "all"]
    pd.testing.assert_series_equal(result.overall, unique[list(METRICS)].mean(), check_names=False)


def test_missing_predicted_condition_is_listed(toy_data, evaluator):
    with pytest.raises(DataError, match="lack 2 evaluated condition.*G0\\+G1, G1\\+G2"):
        evaluator.evaluate(observed_means(toy_data, ["G0", "G1", "G2"]))


def test_extra_predicted_conditions_are_ignored(toy_data, evaluator):
    more = observed_means(toy_data, [*CONDITIONS, "control"])
    assert evaluator.evaluate(more).overall["mse"] == 0.0


def test_gene_mismatch_lists_missing_and_extra_genes(toy_data, evaluator):
    means = toy_data.mean_profiles.loc[CONDITIONS].drop(columns=["G5"]).rename(columns={"G6": "NOTAGENE"})
    with pytest.raises(DataError, match="missing from the predictions.*G5, G6.*not in the data.*NOTAGENE"):
        evaluator.evaluate(Predictions(means))


def test_gene_order_does_not_matter(toy_data, evaluator):
    prediction = control_means(toy_data)
    reordered = Predictions(prediction.means.iloc[:, ::-1])
    pd.testing.assert_frame_equal(evaluator.evaluate(reordered).per_condition, evaluator.evaluate(prediction).per_condition)


def test_cell_metrics_are_deterministic_and_use_given_cells(toy_data, evaluator):
    prediction = control_means(toy_data)
    first, second = evaluator.evaluate(prediction), evaluator.evaluate(prediction)
    pd.testing.assert_frame_equal(first.per_condition, second.per_condition)
    # Predicted cells = the observed cells themselves: far closer than control-based pseudo-cells.
    observed_cells = toy_data.adata[toy_data.adata.obs["perturbedvae_condition"].isin(CONDITIONS)]
    cells = ad.AnnData(
        np.asarray(observed_cells.X),
        obs=pd.DataFrame(
            {"condition": observed_cells.obs["perturbedvae_condition"].astype(str).to_numpy()}, index=observed_cells.obs_names
        ),
        var=pd.DataFrame(index=toy_data.genes),
    )
    with_cells = evaluator.evaluate(Predictions(observed_means(toy_data).means, cells)).overall
    assert with_cells["energy_distance"] < 0.5 * first.overall["energy_distance"]
    assert with_cells["mmd"] < first.overall["mmd"]


def test_invalid_groups(toy_data):
    de = compute_de_genes(toy_data)
    with pytest.raises(DataError, match="control is not a perturbation"):
        Evaluator(toy_data, de, {"a": ["G0", "control"]})
    with pytest.raises(DataError, match="no cells in the data: G9"):
        Evaluator(toy_data, de, {"a": ["G0", "G9"]})
    with pytest.raises(DataError, match="every subgroup is empty"):
        Evaluator(toy_data, de, {"a": []})
    other = load_dataset(make_toy_adata(cells_per_condition=40, seed=5))
    with pytest.raises(DataError, match="computed on other data"):
        Evaluator(other, de, GROUPS)


def test_predictions_reject_nan_and_duplicates(toy_data):
    means = toy_data.mean_profiles.loc[["G0", "G1"]].copy()
    means.iloc[1, 3] = np.nan
    with pytest.raises(DataError, match="NaN or infinite values for: G1"):
        Predictions(means)
    with pytest.raises(DataError, match="more than once: G0"):
        Predictions(toy_data.mean_profiles.loc[["G0", "G0"]])


def test_from_anndata_canonicalises_conditions_and_reorders_genes(toy_data):
    genes = toy_data.genes
    rows = toy_data.mean_profiles.loc[["G0", "G0+G1", "control"]]
    adata = ad.AnnData(
        rows.to_numpy()[:, ::-1].astype(np.float32),
        obs=pd.DataFrame({"condition": ["G0+ctrl", "G1+G0", "ctrl"]}, index=["a", "b", "c"]),
        var=pd.DataFrame(index=genes[::-1]),
    )
    prediction = Predictions.from_anndata(adata, genes)
    assert prediction.cells is None
    assert sorted(prediction.conditions) == ["G0", "G0+G1", "control"]
    assert list(prediction.means.columns) == genes
    np.testing.assert_allclose(prediction.means.loc["G0+G1"], rows.loc["G0+G1"], rtol=1e-6)


def test_from_anndata_with_cells_averages_them(toy_data):
    genes = toy_data.genes
    matrix = np.arange(4 * len(genes), dtype=np.float32).reshape(4, len(genes))
    adata = ad.AnnData(matrix, obs=pd.DataFrame({"condition": ["G1+G0", "G0+G1", "G2", "G2"]}, index=list("abcd")), var=pd.DataFrame(index=genes))
    prediction = Predictions.from_anndata(adata, genes)
    assert prediction.cells is not None and prediction.cells.n_obs == 4
    assert list(prediction.cells.obs["condition"]) == ["G0+G1", "G0+G1", "G2", "G2"]
    np.testing.assert_allclose(prediction.means.loc["G0+G1"], matrix[:2].mean(axis=0))


def test_from_anndata_errors(toy_data):
    adata = ad.AnnData(np.zeros((1, 2), np.float32), obs=pd.DataFrame({"target": ["G0"]}, index=["a"]), var=pd.DataFrame(index=["G0", "G1"]))
    with pytest.raises(DataError, match="needs obs\\['condition'\\]"):
        Predictions.from_anndata(adata, toy_data.genes)
    adata.obs["condition"] = ["G0"]
    with pytest.raises(DataError, match="different genes"):
        Predictions.from_anndata(adata, toy_data.genes)


def test_h5ad_round_trip(toy_data, tmp_path):
    prediction = observed_means(toy_data)
    path = tmp_path / "predictions.h5ad"
    prediction.write_h5ad(path)
    loaded = Predictions.read_h5ad(path, toy_data.genes)
    pd.testing.assert_frame_equal(loaded.means.loc[CONDITIONS], prediction.means, check_exact=False, rtol=1e-6)
    with pytest.raises(DataError, match="no such file"):
        Predictions.read_h5ad(tmp_path / "absent.h5ad", toy_data.genes)


def test_evaluate_named_and_write_metrics(toy_data, evaluator, tmp_path):
    results, tidy = evaluate_named(evaluator, {"perfect": observed_means(toy_data), "no_change": control_means(toy_data)})
    assert list(tidy.columns) == ["model", "subgroup", "condition", "metric", "value"]
    assert len(tidy) == 2 * len(CONDITIONS) * len(METRICS)
    mse = tidy[(tidy.metric == "mse") & (tidy.model == "no_change")].set_index("condition")["value"]
    np.testing.assert_allclose(mse.loc[CONDITIONS], evaluator.evaluate(control_means(toy_data)).per_condition.loc[CONDITIONS, "mse"])
    assert results["perfect"]["overall"]["mse"] == 0.0
    assert results["no_change"]["per_subgroup"]["double"]["n_conditions"] == 2
    assert results["no_change"]["per_condition"]["G0"]["subgroups"] == ["single"]

    write_metrics(results, tidy, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == results
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out" / "metrics.csv"), tidy)
