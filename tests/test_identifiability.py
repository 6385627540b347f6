"""Identifiability metrics: invariant to permutation, scale and sign; low for unrelated estimates."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbedvae.data.synthetic import GROUND_TRUTH_KEY, SimulationConfig, simulate
from perturbedvae.errors import DataError
from perturbedvae.evaluate.identifiability import (
    UNMATCHED,
    chance_mcc,
    dimension_scales,
    graph_recovery_f1,
    identifiability_report,
    mask_recovery_f1,
    mean_correlation_coefficient,
)


def _sparse_truth(rng: np.random.Generator, perturbations: int, latent: int) -> tuple[np.ndarray, np.ndarray]:
    masks = (rng.random((perturbations, latent)) < 0.3).astype(int)
    masks[np.arange(perturbations), rng.integers(latent, size=perturbations)] = 1
    return masks, masks * rng.normal(0, 2, size=(perturbations, latent))


def _permuted_rescaled(effects: np.ndarray, rng: np.random.Generator, extra_dims: int = 0):
    """A copy of the truth in shuffled dims, each rescaled with a random sign, plus unrelated dims."""
    latent = effects.shape[1]
    order = rng.permutation(latent + extra_dims)
    scales = rng.uniform(0.2, 5.0, size=latent) * rng.choice([-1, 1], size=latent)
    padded = np.hstack([effects * scales, rng.normal(size=(effects.shape[0], extra_dims))])
    estimated = np.empty_like(padded)
    estimated[:, order] = padded
    return estimated, order[:latent]


@pytest.mark.parametrize("extra_dims", [0, 4])
def test_mcc_is_one_for_a_permuted_rescaled_sign_flipped_copy(extra_dims):
    rng = np.random.default_rng(0)
    masks, effects = _sparse_truth(rng, 40, 6)
    estimated, true_to_estimated = _permuted_rescaled(effects, rng, extra_dims)
    mcc, matching = mean_correlation_coefficient(effects, estimated)
    assert mcc == pytest.approx(1.0)
    np.testing.assert_array_equal(matching, true_to_estimated)


def test_mcc_is_low_for_independent_effects():
    rng = np.random.default_rng(1)
    _, effects = _sparse_truth(rng, 300, 8)
    _, unrelated = _sparse_truth(rng, 300, 8)
    mcc, matching = mean_correlation_coefficient(effects, unrelated)
    assert mcc < 0.5
    assert sorted(matching) == list(range(8))


def test_chance_mcc_falls_with_more_perturbations():
    rng = np.random.default_rng(6)
    _, effects = _sparse_truth(rng, 200, 6)
    estimates = effects + rng.normal(0, 0.1, effects.shape)
    few, many = chance_mcc(effects[:12], estimates[:12]), chance_mcc(effects, estimates)
    assert many < 0.3 < few
    assert mean_correlation_coefficient(effects, estimates)[0] > 0.95


def test_mcc_degrades_with_noise():
    rng = np.random.default_rng(2)
    _, effects = _sparse_truth(rng, 100, 5)
    scores = [mean_correlation_coefficient(effects, effects + rng.normal(0, noise, effects.shape))[0] for noise in (0.1, 1.0, 5.0)]
    assert scores[0] > scores[1] > scores[2]


def test_mcc_skips_dimensions_no_perturbation_moves_and_counts_missing_ones_as_zero():
    rng = np.random.default_rng(3)
    _, effects = _sparse_truth(rng, 30, 4)
    effects[:, 2] = 0.0
    mcc, matching = mean_correlation_coefficient(effects, effects)
    assert mcc == pytest.approx(1.0)
    assert matching[2] == UNMATCHED and list(matching[[0, 1, 3]]) == [0, 1, 3]
    # Only two estimated dims for three identifiable true dims: the third scores 0.
    mcc, matching = mean_correlation_coefficient(effects, effects[:, [0, 1]])
    assert mcc == pytest.approx(2 / 3)
    assert list(matching) == [0, 1, UNMATCHED, UNMATCHED]


def test_mask_f1_is_one_for_permuted_masks_and_lower_for_random_ones():
    rng = np.random.default_rng(4)
    masks, effects = _sparse_truth(rng, 60, 6)
    estimated, _ = _permuted_rescaled(effects, rng, extra_dims=2)
    _, matching = mean_correlation_coefficient(effects, estimated)
    estimated_masks = (estimated != 0).astype(float)
    assert mask_recovery_f1(masks, estimated_masks, matching) == pytest.approx(1.0)
    probabilities = np.where(estimated_masks > 0, 0.9, 0.1)
    assert mask_recovery_f1(masks, probabilities, matching) == pytest.approx(1.0)
    assert mask_recovery_f1(masks, probabilities, matching, threshold=0.95) == 0.0
    random_masks = rng.random(estimated_masks.shape)
    assert mask_recovery_f1(masks, random_masks, matching) < 0.6


def test_mask_f1_counts_misses_and_false_alarms():
    true = np.array([[1, 0], [0, 1], [1, 1]])
    estimated = np.array([[1, 1], [0, 0], [1, 1]])  # 3 hits, 1 false alarm, 1 miss
    assert mask_recovery_f1(true, estimated, np.array([0, 1])) == pytest.approx(2 * 3 / (2 * 3 + 2))
    # An unmatched true dimension turns its active entries into misses: 2 hits, 0 false alarms, 2 misses.
    assert mask_recovery_f1(true, estimated, np.array([0, UNMATCHED])) == pytest.approx(2 * 2 / (2 * 2 + 2))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: mean_correlation_coefficient(np.ones((5, 2)), np.ones((4, 2))), "5 perturbations"),
        (lambda: mean_correlation_coefficient(np.ones((5, 2)), np.ones((5, 2))), "no true latent dimension varies"),
        (lambda: mean_correlation_coefficient(np.ones(5), np.ones((5, 2))), "matrix"),
        (lambda: mean_correlation_coefficient(np.eye(3), np.full((3, 2), np.nan)), "NaN"),
        (lambda: mean_correlation_coefficient(np.eye(2), [["a", "b"], ["c", "d"]]), "must be numbers"),
        (lambda: mask_recovery_f1(np.eye(3), np.eye(3) * 2, np.arange(3)), r"\[0, 1\]"),
        (lambda: mask_recovery_f1(np.eye(3), np.eye(3), np.arange(2)), "one entry per true dimension"),
        (lambda: mask_recovery_f1(np.eye(3), np.eye(3), np.array([0, 1, 5])), "outside"),
    ],
)
def test_bad_inputs_raise_data_errors(call, message):
    with pytest.raises(DataError, match=message):
        call()


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory) -> dict:
    """Ground truth of a simulated screen after an h5ad round trip, as a user would read it."""
    config = SimulationConfig(n_genes=40, n_latent=5, n_perturbations=30, n_combinations=0,
                              cells_per_condition=2, n_control_cells=5, mask_prob=0.3)
    path = tmp_path_factory.mktemp("sim") / "sim.h5ad"
    simulate(config).write_h5ad(path)
    return ad.read_h5ad(path).uns[GROUND_TRUTH_KEY]


def test_report_on_simulated_truth(ground_truth):
    rng = np.random.default_rng(5)
    shifts = ground_truth["masks"] * ground_truth["effects"]
    estimated, _ = _permuted_rescaled(shifts, rng, extra_dims=3)
    probabilities = (estimated != 0).astype(float)
    report = identifiability_report(ground_truth, estimated, probabilities)
    assert report["mcc"] == pytest.approx(1.0) and report["mask_f1"] == pytest.approx(1.0)
    assert (report["n_perturbations"], report["n_latent_true"], report["n_latent_estimated"]) == (30, 5, 8)
    assert len(report["matching"]) == len(report["per_dim_correlation"]) == 5

    names = list(ground_truth["perturbations"])
    shuffled = rng.permutation(len(names))
    as_frames = [pd.DataFrame(values[shuffled], index=[names[i] for i in shuffled]) for values in (estimated, probabilities)]
    assert identifiability_report(ground_truth, *as_frames)["mcc"] == pytest.approx(1.0)

    noise = identifiability_report(ground_truth, rng.normal(size=(30, 5)), rng.random((30, 5)))
    assert noise["mcc"] < report["mcc"] and noise["mask_f1"] < 0.7
    # An unrelated estimate scores about what shuffling its rows scores; the perfect one far above it.
    assert abs(noise["mcc"] - noise["mcc_chance"]) < 0.15 and report["mcc_chance"] < 0.5


def test_report_rejects_misaligned_estimates(ground_truth):
    with pytest.raises(DataError, match="30 perturbations"):
        identifiability_report(ground_truth, np.ones((29, 5)), np.ones((29, 5)))
    frame = pd.DataFrame(np.ones((2, 5)), index=["GENE000", "GENE001"])
    with pytest.raises(DataError, match="no row for perturbation"):
        identifiability_report(ground_truth, frame, frame)
    with pytest.raises(DataError, match="no 'masks'"):
        identifiability_report({"perturbations": ["A"], "effects": [[1.0]]}, np.ones((1, 1)), np.ones((1, 1)))


def _chain_truth() -> tuple[np.ndarray, np.ndarray]:
    """Effects of 30 perturbations on 4 nodes and the DAG 0 -> 1 -> 3, 0 -> 2."""
    rng = np.random.default_rng(7)
    _, effects = _sparse_truth(rng, 30, 4)
    graph = np.zeros((4, 4))
    graph[0, 1], graph[1, 3], graph[0, 2] = 0.8, -0.6, 0.5
    return effects, graph


def _relabelled(effects, graph, order, scales):
    """The same model with its nodes permuted (true node k -> estimated node order[k]) and rescaled."""
    estimated_effects = np.empty_like(effects)
    estimated_effects[:, order] = effects * scales
    estimated_graph = np.zeros_like(graph)
    estimated_graph[np.ix_(order, order)] = graph * scales[None, :] / scales[:, None]
    return estimated_effects, estimated_graph


def test_edge_f1_is_one_for_a_permuted_rescaled_copy_of_the_graph():
    effects, graph = _chain_truth()
    order, scales = np.array([2, 0, 3, 1]), np.array([3.0, -0.5, 2.0, 0.25])
    estimated_effects, estimated_graph = _relabelled(effects, graph, order, scales)
    mcc, matching = mean_correlation_coefficient(effects, estimated_effects)
    assert mcc == pytest.approx(1.0)
    np.testing.assert_allclose(dimension_scales(effects, estimated_effects, matching), scales)
    result = graph_recovery_f1(graph, estimated_graph, matching, dimension_scales(effects, estimated_effects, matching))
    assert result == {"edge_f1": pytest.approx(1.0), "n_true_edges": 3, "n_estimated_edges": 3}


def test_edge_f1_counts_reversed_missing_and_extra_edges():
    effects, graph = _chain_truth()
    matching, scales = np.arange(4), np.ones(4)
    reversed_edge = graph.copy()
    reversed_edge[0, 1], reversed_edge[1, 0] = 0.0, 0.8  # one miss and one false alarm, 2 hits
    assert graph_recovery_f1(graph, reversed_edge, matching, scales)["edge_f1"] == pytest.approx(4 / 6)
    weak = graph.copy()
    weak[0, 3] = 0.1  # below the threshold: not an edge
    assert graph_recovery_f1(graph, weak, matching, scales)["edge_f1"] == pytest.approx(1.0)
    # A weight that is small in the estimate's units can be large in the truth's: scales matter.
    assert graph_recovery_f1(graph, weak, matching, np.array([4.0, 1.0, 1.0, 1.0]))["n_estimated_edges"] == 4
    assert graph_recovery_f1(np.zeros((4, 4)), np.zeros((4, 4)), matching, scales)["edge_f1"] == 1.0
    with pytest.raises(DataError, match="square"):
        graph_recovery_f1(graph, np.zeros((4, 3)), matching, scales)


def test_report_scores_the_graph_of_a_simulated_graph_screen():
    config = SimulationConfig(n_genes=40, n_latent=5, n_perturbations=30, n_combinations=10, cells_per_condition=2,
                              n_control_cells=5, mask_prob=0.3, composition="graph", edge_prob=0.5)
    truth = simulate(config).uns[GROUND_TRUTH_KEY]
    noise_shifts = truth["masks"] * truth["effects"]
    report = identifiability_report(truth, noise_shifts, truth["masks"].astype(float), estimated_graph=truth["graph"])
    assert report["edge_f1"] == pytest.approx(1.0) and report["n_true_edges"] == int((truth["graph"] != 0).sum()) > 0
    empty = identifiability_report(truth, noise_shifts, truth["masks"].astype(float), estimated_graph=np.zeros((5, 5)))
    assert empty["edge_f1"] == 0.0
    assert "edge_f1" not in identifiability_report(truth, noise_shifts, truth["masks"].astype(float))
