"""Each metric on cases small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from perturbedvae.evaluate import metrics


def test_mse_known_value_and_mask():
    predicted = np.array([[1.0, 2.0, 3.0]])
    observed = np.array([[1.0, 2.0, 5.0]])
    assert metrics.mse(predicted, observed) == pytest.approx([4.0 / 3.0])
    assert metrics.mse(predicted, observed, np.array([[True, True, False]])) == pytest.approx([0.0])
    assert metrics.mse(predicted, observed, np.array([[False, True, True]])) == pytest.approx([2.0])


def test_pearson_known_values():
    observed = np.array([1.0, 2.0, 3.0])
    assert metrics.pearson(observed, observed) == pytest.approx([1.0])
    assert metrics.pearson(-observed, observed) == pytest.approx([-1.0])
    # centred x = (-1, 0, 1), y = (-1, 1, 0): r = 1 / sqrt(2 * 2)
    assert metrics.pearson(observed, np.array([1.0, 3.0, 2.0])) == pytest.approx([0.5])


def test_pearson_of_constant_profile_is_zero_like_gears():
    assert metrics.pearson(np.full(4, 2.0), np.arange(4.0)) == pytest.approx([0.0])


def test_pearson_rows_with_gene_sets_of_different_sizes_match_corrcoef():
    rng = np.random.default_rng(0)
    predicted, observed = rng.normal(size=(3, 12)), rng.normal(size=(3, 12))
    gene_sets = [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10], list(range(12))]
    result = metrics.pearson(predicted, observed, metrics.gene_mask(gene_sets, 12))
    expected = [np.corrcoef(predicted[row, genes], observed[row, genes])[0, 1] for row, genes in enumerate(gene_sets)]
    np.testing.assert_allclose(result, expected)


def test_gene_mask_marks_given_indices():
    mask = metrics.gene_mask([[0, 2], [1]], 3)
    np.testing.assert_array_equal(mask, [[True, False, True], [False, True, False]])


def test_pearson_delta_sign_follows_direction_of_change():
    control = np.array([1.0, 2.0, 3.0, 4.0])
    change = np.array([0.5, -1.0, 0.0, 2.0])
    assert metrics.pearson_delta(control + change, control + 2 * change, control) == pytest.approx([1.0])
    assert metrics.pearson_delta(control - change, control + change, control) == pytest.approx([-1.0])
    # Predicting control exactly has no correlation with the change (GEARS: NaN -> 0).
    assert metrics.pearson_delta(control, control + change, control) == pytest.approx([0.0])


def test_frac_opposite_direction_counts_only_sign_flips():
    control = np.zeros(4)
    predicted = np.array([1.0, -1.0, 0.0, 2.0])
    observed = np.array([1.0, 1.0, 1.0, -1.0])
    # sign pairs: agree, flip, zero vs up (not opposite), flip
    assert metrics.frac_opposite_direction(predicted, observed, control, np.ones(4, bool)) == pytest.approx([0.5])
    assert metrics.frac_opposite_direction(predicted, observed, control, np.array([True, False, True, False])) == pytest.approx([0.0])


def test_r2_clipped_known_values():
    observed = np.array([1.0, 2.0, 3.0])
    assert metrics.r2_clipped(observed, observed) == pytest.approx([1.0])
    assert metrics.r2_clipped(np.array([1.0, 2.0, 4.0]), observed) == pytest.approx([0.5])  # 1 - 1/2
    assert metrics.r2_clipped(np.full(3, 2.0), observed) == pytest.approx([0.0])
    assert metrics.r2_clipped(np.array([10.0, -5.0, 0.0]), observed) == pytest.approx([0.0])  # negative, clipped


def test_normalized_rmse_known_values():
    observed = np.array([[1.0, 2.0], [3.0, 0.0]])
    assert metrics.normalized_rmse(observed, observed) == pytest.approx(0.0)
    assert metrics.normalized_rmse(np.zeros_like(observed), observed) == pytest.approx(1.0)
    assert metrics.normalized_rmse(2 * observed, observed) == pytest.approx(1.0)
    assert metrics.normalized_rmse(observed + 1.0, observed) == pytest.approx(np.sqrt(1.0 / (14.0 / 4.0)))


def test_mmd_zero_for_identical_samples_and_known_for_two_points():
    sample = np.random.default_rng(1).normal(size=(20, 5))
    assert metrics.mmd(sample, sample.copy()) == pytest.approx(0.0, abs=1e-12)
    distance = 3.0
    expected = 2 * sum(1 - np.exp(-(distance**2) / bandwidth) for bandwidth in metrics.DISCREPANCY_VAE_BANDWIDTHS)
    assert metrics.mmd(np.zeros((1, 1)), np.full((1, 1), distance)) == pytest.approx(expected)


def test_mmd_grows_with_the_shift_between_samples():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 10)), rng.normal(size=(40, 10))
    values = [metrics.mmd(x, y + shift) for shift in (0.0, 2.0, 6.0)]
    assert 0 <= values[0] < values[1] < values[2]


def test_discrepancy_vae_bandwidths():
    assert len(metrics.DISCREPANCY_VAE_BANDWIDTHS) == 10
    assert metrics.DISCREPANCY_VAE_BANDWIDTHS[0] == pytest.approx(31.25)
    assert metrics.DISCREPANCY_VAE_BANDWIDTHS[-1] == pytest.approx(16000.0)


def test_energy_distance_known_values():
    sample = np.random.default_rng(3).normal(size=(15, 4))
    assert metrics.energy_distance(sample, sample.copy()) == pytest.approx(0.0, abs=1e-9)
    assert metrics.energy_distance(np.array([[0.0]]), np.array([[3.0]])) == pytest.approx(6.0)
    # E|x - y| = 1, E|x - x'| = (0 + 2 + 2 + 0) / 4 = 1, E|y - y'| = 0  ->  2 - 1 - 0
    assert metrics.energy_distance(np.array([[0.0], [2.0]]), np.array([[1.0]])) == pytest.approx(1.0)


def test_energy_distance_positive_for_different_distributions():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 3))
    assert metrics.energy_distance(x, rng.normal(size=(50, 3)) + 1.0) > 0.5
    assert metrics.energy_distance(x, rng.normal(scale=3.0, size=(50, 3))) > 0.5


def test_mean_over_cell_batches_uses_full_batches_of_paired_cells():
    sizes = []

    def record(predicted, observed):
        sizes.append((len(predicted), len(observed)))
        return float(predicted[0, 0])

    cells = np.arange(70.0)[:, None]
    assert metrics.mean_over_cell_batches(record, cells, cells[:80], batch_size=32) == pytest.approx(16.0)  # (0 + 32) / 2
    assert sizes == [(32, 32), (32, 32)]
    sizes.clear()
    metrics.mean_over_cell_batches(record, cells[:10], cells, batch_size=32)
    assert sizes == [(10, 10)]


def test_rank_zero_for_perfect_predictions():
    observed = np.random.default_rng(5).normal(size=(30, 8))
    np.testing.assert_array_equal(metrics.rank_score(observed, observed), np.zeros(30))


def test_rank_hand_case():
    observed = np.array([[0.0], [10.0], [20.0]])
    predicted = np.array([[11.0], [10.5], [20.0]])
    # obs 0: own pred at 11, others at 10.5 and 20 -> one closer; obs 1: own closest; obs 2: own closest
    np.testing.assert_allclose(metrics.rank_score(predicted, observed), [1 / 3, 0.0, 0.0])


def test_rank_about_half_for_shuffled_or_collapsed_predictions():
    rng = np.random.default_rng(6)
    observed = rng.normal(size=(300, 20))
    shuffled = observed[rng.permutation(300)]
    assert metrics.rank_score(shuffled, observed).mean() == pytest.approx(0.5, abs=0.06)
    collapsed = np.tile(observed.mean(axis=0), (300, 1))
    np.testing.assert_allclose(metrics.rank_score(collapsed, observed), 0.5 * 299 / 300)


def test_rank_ties_predictions_equal_up_to_rounding():
    """Collapsed predictions computed along other paths differ in their last bits; they are still ties."""
    rng = np.random.default_rng(3)
    observed = rng.normal(size=(40, 200))
    base = observed.mean(axis=0)
    collapsed = np.vstack([(base * (1.0 + 1e-15 * rng.standard_normal())) for _ in range(40)])
    assert len({row.tobytes() for row in collapsed}) > 1  # the rows really differ in their last bits
    np.testing.assert_allclose(metrics.rank_score(collapsed, observed), 0.5 * 39 / 40, rtol=1e-12)
