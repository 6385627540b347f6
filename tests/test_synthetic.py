"""The simulator: seeded, shaped as asked, counts, sparse masks, additive combinations, h5ad-safe."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from perturbedvae.data.conditions import CONTROL, genes_of
from perturbedvae.data.loading import load_dataset
from perturbedvae.data.synthetic import GROUND_TRUTH_KEY, SimulationConfig, simulate, simulate_to_file, simulated_truth
from perturbedvae.errors import ConfigError

SMALL = dict(n_genes=60, n_latent=6, n_perturbations=8, n_combinations=10, cells_per_condition=12, n_control_cells=40)


@pytest.fixture(scope="module")
def small_adata() -> ad.AnnData:
    return simulate(SimulationConfig(**SMALL))


def _dense(adata: ad.AnnData) -> np.ndarray:
    return adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)


def test_same_seed_reproduces_and_other_seed_differs(small_adata):
    again = simulate(SimulationConfig(**SMALL))
    other = simulate(SimulationConfig(**SMALL, seed=1))
    np.testing.assert_array_equal(_dense(again), _dense(small_adata))
    np.testing.assert_array_equal(again.uns[GROUND_TRUTH_KEY]["masks"], small_adata.uns[GROUND_TRUTH_KEY]["masks"])
    assert not np.array_equal(_dense(other), _dense(small_adata))
    assert not np.array_equal(other.uns[GROUND_TRUTH_KEY]["effects"], small_adata.uns[GROUND_TRUTH_KEY]["effects"])


def test_more_cells_keep_the_same_mechanisms(small_adata):
    bigger = simulate(SimulationConfig(**{**SMALL, "cells_per_condition": 30}))
    for key in ("masks", "effects"):
        np.testing.assert_array_equal(bigger.uns[GROUND_TRUTH_KEY][key], small_adata.uns[GROUND_TRUTH_KEY][key])


def test_shapes_and_conditions(small_adata):
    config = SimulationConfig(**SMALL)
    n_conditions = config.n_perturbations + config.n_combinations
    assert small_adata.shape == (config.n_control_cells + n_conditions * config.cells_per_condition, config.n_genes)
    assert small_adata.obsm["z_inv"].shape == (small_adata.n_obs, config.n_latent)
    truth = small_adata.uns[GROUND_TRUTH_KEY]
    assert truth["masks"].shape == truth["effects"].shape == (config.n_perturbations, config.n_latent)
    conditions = small_adata.obs["condition"].astype(str)
    counts = conditions.value_counts()
    assert counts[CONTROL] == config.n_control_cells
    assert len(counts) == 1 + n_conditions
    assert (counts.drop(CONTROL) == config.cells_per_condition).all()
    doubles = [name for name in counts.index if len(genes_of(name)) == 2]
    assert len(doubles) == config.n_combinations == len(set(doubles))
    assert sorted(doubles) == sorted(truth["interactions"]["combinations"])
    for name in counts.index:
        assert name == CONTROL or "+".join(sorted(genes_of(name))) == name


def test_counts_are_non_negative_integers(small_adata):
    assert sp.issparse(small_adata.X) and small_adata.X.dtype == np.float32
    values = _dense(small_adata)
    assert values.min() >= 0 and np.all(values == np.round(values))
    assert values.sum(axis=1).min() > 0


def test_library_sizes_follow_the_configured_mean():
    adata = simulate(SimulationConfig(**SMALL, library_size_mean=500.0))
    totals = _dense(adata).sum(axis=1)
    assert 400 < totals.mean() < 600


def test_perturbed_genes_are_measured(small_adata):
    perturbations = list(small_adata.uns[GROUND_TRUTH_KEY]["perturbations"])
    assert set(perturbations) <= set(small_adata.var_names)
    assert sorted(small_adata.var_names[small_adata.var["perturbed"]]) == sorted(perturbations)
    conditions = set(small_adata.obs["condition"].astype(str)) - {CONTROL}
    assert {gene for name in conditions for gene in genes_of(name)} == set(perturbations)


def test_masks_are_sparse_at_the_configured_rate():
    config = SimulationConfig(n_genes=2000, n_latent=20, n_perturbations=2000, n_combinations=0,
                              cells_per_condition=1, n_control_cells=1, mask_prob=0.1)
    masks = simulate(config).uns[GROUND_TRUTH_KEY]["masks"]
    assert set(np.unique(masks)) <= {0, 1}
    assert masks.sum(axis=1).min() >= 1
    # Forcing one active dimension lifts the rate by P(no dim active) / K = 0.9**20 / 20, about 0.006.
    expected = 0.1 + 0.9**20 / 20
    assert abs(masks.mean() - expected) < 0.01


def test_zero_mask_prob_moves_exactly_one_dimension():
    masks = simulate(SimulationConfig(**SMALL, mask_prob=0.0)).uns[GROUND_TRUTH_KEY]["masks"]
    assert (masks.sum(axis=1) == 1).all()


def _condition_shift(adata: ad.AnnData, name: str) -> np.ndarray:
    rows = (adata.obs["condition"] == name).to_numpy()
    shifts = adata.obsm["z"][rows] - adata.obsm["z_inv"][rows]
    np.testing.assert_allclose(shifts, np.broadcast_to(shifts[0], shifts.shape), atol=1e-5)
    return shifts[0]


def _single_shift(adata: ad.AnnData, gene: str) -> np.ndarray:
    truth = adata.uns[GROUND_TRUTH_KEY]
    index = list(truth["perturbations"]).index(gene)
    return truth["masks"][index] * truth["effects"][index]


@pytest.mark.parametrize("strength", [0.0, 1.5])
def test_combination_shift_is_sum_of_singles_plus_interaction(strength):
    adata = simulate(SimulationConfig(**SMALL, interaction_strength=strength))
    truth = adata.uns[GROUND_TRUTH_KEY]
    np.testing.assert_allclose(_condition_shift(adata, CONTROL), 0.0, atol=1e-6)
    for gene in truth["perturbations"]:
        np.testing.assert_allclose(_condition_shift(adata, gene), _single_shift(adata, gene), atol=1e-5)
    interactions = truth["interactions"]
    for name, interaction in zip(interactions["combinations"], interactions["shifts"]):
        additive = sum(_single_shift(adata, gene) for gene in genes_of(name))
        np.testing.assert_allclose(_condition_shift(adata, name), additive + interaction, atol=1e-5)
    assert (np.abs(interactions["shifts"]).max() > 1e-6) == (strength > 0)


def _solved_by_linear_algebra(truth, genes: list[str]) -> np.ndarray:
    """u = s (I − A·diag(1 − M))⁻¹ for the condition perturbing `genes`, without the simulator's loop."""
    rows = [list(truth["perturbations"]).index(gene) for gene in genes]
    shift = (truth["masks"][rows] * truth["effects"][rows]).sum(axis=0)
    kept = truth["graph"] * (1 - truth["masks"][rows].max(axis=0))[None, :]
    return np.linalg.solve((np.eye(len(shift)) - kept).T, shift)


def test_graph_composition_solves_the_scm_with_the_targets_edges_cut():
    adata = simulate(SimulationConfig(**{**SMALL, "n_combinations": 15}, composition="graph", edge_prob=0.6))
    truth = adata.uns[GROUND_TRUTH_KEY]
    graph = truth["graph"]
    assert np.allclose(np.tril(graph), 0.0) and (graph != 0).sum() > 0
    assert np.abs(graph[graph != 0]).min() >= 0.5
    for name in [*truth["perturbations"], *truth["interactions"]["combinations"]]:
        np.testing.assert_allclose(_condition_shift(adata, name), _solved_by_linear_algebra(truth, genes_of(name)), atol=1e-5)
    # A single also moves the nodes downstream of its targets; some combinations are not the sum of
    # their singles, and the recorded non-additive shift is exactly their difference.
    noise = truth["masks"] * truth["effects"]
    moved = [np.abs(_condition_shift(adata, gene) - row).max() for gene, row in zip(truth["perturbations"], noise)]
    assert max(moved) > 0.1
    interactions = truth["interactions"]
    assert np.abs(interactions["shifts"]).max() > 0.1
    for name, interaction in zip(interactions["combinations"], interactions["shifts"]):
        singles = sum(_condition_shift(adata, gene) for gene in genes_of(name))
        np.testing.assert_allclose(_condition_shift(adata, name) - singles, interaction, atol=1e-5)


def test_additive_composition_has_no_graph_and_keeps_its_draws():
    additive = simulate(SimulationConfig(**SMALL))
    assert np.all(additive.uns[GROUND_TRUTH_KEY]["graph"] == 0)
    with_graph = simulate(SimulationConfig(**SMALL, composition="graph", edge_prob=0.0))
    np.testing.assert_array_equal(_dense(additive), _dense(with_graph))


def test_expression_change_grows_with_the_latent_shift():
    adata = simulate(SimulationConfig(**{**SMALL, "cells_per_condition": 40, "n_control_cells": 200}))
    data = load_dataset(adata)
    perturbed = data.condition_names[1:]
    mean_abs_delta = np.abs(data.mean_profiles.loc[perturbed].to_numpy() - data.control_mean).mean(axis=1)
    shift_norms = [np.linalg.norm(_condition_shift(adata, name)) for name in perturbed]
    assert np.corrcoef(shift_norms, mean_abs_delta)[0, 1] > 0.7
    # Two control groups of the same sizes differ only by sampling noise; perturbations move far more.
    control = data.adata[data.cell_indices(CONTROL)].X.toarray()
    noise = np.abs(control[:40].mean(axis=0) - control[40:].mean(axis=0)).mean()
    assert np.median(mean_abs_delta) > 2 * noise


def test_h5ad_round_trip_and_loading(tmp_path, small_adata):
    path = simulate_to_file(tmp_path / "sub" / "sim.h5ad", **SMALL)
    read = ad.read_h5ad(path)
    np.testing.assert_array_equal(_dense(read), _dense(small_adata))
    truth, original = read.uns[GROUND_TRUTH_KEY], small_adata.uns[GROUND_TRUTH_KEY]
    assert list(truth["perturbations"]) == list(original["perturbations"])
    for key in ("masks", "effects"):
        np.testing.assert_array_equal(truth[key], original[key])
    np.testing.assert_array_equal(truth["interactions"]["shifts"], original["interactions"]["shifts"])
    assert list(truth["interactions"]["combinations"]) == list(original["interactions"]["combinations"])
    assert SimulationConfig(**truth["config"]) == SimulationConfig(**SMALL)
    np.testing.assert_array_equal(read.obsm["z_inv"], small_adata.obsm["z_inv"])

    data = load_dataset(path)
    assert data.is_counts
    assert set(data.condition_names) == set(small_adata.obs["condition"].astype(str))


def test_simulate_to_file_refuses_to_overwrite(tmp_path):
    path = simulate_to_file(tmp_path / "sim.h5ad", **SMALL)
    with pytest.raises(ConfigError, match="overwrite=True"):
        simulate_to_file(path, **SMALL)
    simulate_to_file(path, overwrite=True, **{**SMALL, "seed": 4})
    assert ad.read_h5ad(path).uns[GROUND_TRUTH_KEY]["config"]["seed"] == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_genes": 0}, "n_genes must be at least 1"),
        ({"n_genes": 5}, "n_perturbations"),
        ({"n_combinations": 1000}, "distinct pairs"),
        ({"mask_prob": 1.5}, "mask_prob"),
        ({"dispersion": 0.0}, "dispersion must be greater than 0"),
        ({"n_latent": 2.5}, "n_latent must be an integer"),
        ({"effect_scale": float("nan")}, "effect_scale must be a finite number"),
        ({"interaction_strength": -1.0}, "interaction_strength must be at least 0"),
        ({"n_cels": 3}, "unknown simulation setting"),
        ({"composition": "sum"}, "composition must be one of"),
        ({"edge_prob": 2.0}, r"edge_prob must lie in \[0, 1\]"),
    ],
)
def test_bad_config_values_name_the_problem(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        simulate_to_file(tmp_path / "sim.h5ad", **overrides)
    assert not (tmp_path / "sim.h5ad").exists()


def test_output_must_be_h5ad(tmp_path):
    with pytest.raises(ConfigError, match=r"\.h5ad"):
        simulate_to_file(tmp_path / "sim.csv", **SMALL)


def test_simulated_truth_is_the_truth_the_cells_were_drawn_from():
    config = SimulationConfig(n_genes=30, n_latent=3, n_perturbations=6, n_combinations=3, cells_per_condition=200, seed=4)
    adata, truth = simulate(config), simulated_truth(config)
    np.testing.assert_array_equal(truth.masks, adata.uns["ground_truth"]["masks"])
    np.testing.assert_array_equal(truth.effects, adata.uns["ground_truth"]["effects"])
    # Its decoder gives the cells' expected shares: pooled over a condition's cells, counts follow them.
    cells = (adata.obs["condition"] == truth.perturbations[0]).to_numpy()
    expected = truth.expression_fractions(adata.obsm["z"][cells].astype(np.float64)).mean(axis=0)
    observed = np.asarray(adata.X[cells].sum(axis=0)).ravel() / adata.X[cells].sum()
    assert np.corrcoef(expected, observed)[0, 1] > 0.95
