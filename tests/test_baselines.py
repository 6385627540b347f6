import numpy as np
import pytest

from perturbedvae.data.conditions import CONTROL
from perturbedvae.data.de import compute_de_genes
from perturbedvae.data.loading import load_dataset
from perturbedvae.errors import SplitError
from perturbedvae.evaluate.baselines import (
    BASELINES,
    additive,
    dominance,
    fit_saturation,
    linear,
    no_change,
    predict_baselines,
    saturating_additive,
    single_gene_deltas,
    train_mean,
)
from tests.conftest import make_toy_adata

TRAIN = [CONTROL, "G0", "G1", "G2", "G0+G1"]
HELD_OUT = ["G1+G2"]


@pytest.fixture(scope="module")
def toy_data():
    return load_dataset(make_toy_adata(cells_per_condition=40))


def test_no_change_is_control_mean(toy_data):
    predicted = no_change(toy_data, TRAIN, HELD_OUT).means
    np.testing.assert_allclose(predicted.loc["G1+G2"], toy_data.control_mean)


def test_train_mean_uses_only_training_perturbations(toy_data):
    expected = toy_data.mean_profiles.loc[["G0", "G1", "G2", "G0+G1"]].to_numpy().mean(0)
    np.testing.assert_allclose(train_mean(toy_data, TRAIN, HELD_OUT).means.loc["G1+G2"], expected)


def test_additive_sums_single_changes(toy_data):
    profiles, control = toy_data.mean_profiles, toy_data.control_mean
    expected = control + (profiles.loc["G1"] - control) + (profiles.loc["G2"] - control)
    np.testing.assert_allclose(additive(toy_data, TRAIN, HELD_OUT).means.loc["G1+G2"], expected)
    # a gene without a training single adds nothing
    unseen = additive(toy_data, [CONTROL, "G0"], ["G1"]).means.loc["G1"]
    np.testing.assert_allclose(unseen, control)


def test_linear_fits_training_profiles_and_predicts_combos(toy_data):
    train = [CONTROL, "G0", "G1", "G2", "G0+G1"]
    fitted = linear(toy_data, train, ["G0", "G1"]).means
    observed = toy_data.mean_profiles.loc[["G0", "G1"]]
    residual = np.abs(fitted.to_numpy() - observed.to_numpy()).mean()
    spread = np.abs(observed.to_numpy() - toy_data.control_mean).mean()
    assert residual < 0.5 * spread
    combo = linear(toy_data, train, HELD_OUT).means.loc["G1+G2"].to_numpy()
    truth = toy_data.mean_profiles.loc["G1+G2"].to_numpy()
    assert np.corrcoef(combo - toy_data.control_mean, truth - toy_data.control_mean)[0, 1] > 0.5


def test_every_baseline_returns_requested_conditions_and_genes(toy_data):
    predictions = predict_baselines(toy_data, TRAIN, ["G1+G2", "G2"])
    assert set(predictions) == set(BASELINES)
    for prediction in predictions.values():
        assert list(prediction.means.index) == ["G1+G2", "G2"]
        assert list(prediction.means.columns) == toy_data.genes


def test_baselines_need_training_perturbations(toy_data):
    with pytest.raises(SplitError, match="no perturbed training"):
        train_mean(toy_data, [CONTROL], HELD_OUT)
    with pytest.raises(SplitError, match="absent"):
        additive(toy_data, [CONTROL, "G9"], HELD_OUT)


def test_additive_beats_no_change_on_real_norman_doubles(norman_data):
    """On real Norman doubles whose singles are measured, additivity explains much of the change."""
    doubles = ["KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+MAP2K6", "MAP2K3+SLC38A2", "MAPK1+TGFBR2"]
    train = [name for name in norman_data.condition_names if name not in doubles]
    observed = norman_data.mean_profiles.loc[doubles].to_numpy()
    errors = {
        name: ((BASELINES[name](norman_data, train, doubles).means.to_numpy() - observed) ** 2).mean()
        for name in ("no_change", "additive")
    }
    assert errors["additive"] < errors["no_change"]


def test_dominance_takes_the_larger_single_change_per_gene(toy_data):
    profiles, control = toy_data.mean_profiles, toy_data.control_mean
    delta_1, delta_2 = profiles.loc["G1"].to_numpy() - control, profiles.loc["G2"].to_numpy() - control
    expected = control + np.where(np.abs(delta_1) >= np.abs(delta_2), delta_1, delta_2)
    np.testing.assert_allclose(dominance(toy_data, TRAIN, HELD_OUT).means.loc["G1+G2"], expected)
    np.testing.assert_allclose(dominance(toy_data, TRAIN, ["G1"]).means.loc["G1"], profiles.loc["G1"])


def test_saturating_additive_subtracts_gamma_times_same_direction_overlap(toy_data):
    profiles, control = toy_data.mean_profiles, toy_data.control_mean
    deltas = single_gene_deltas(toy_data, TRAIN)
    gamma = fit_saturation(toy_data, TRAIN, deltas)
    delta_1, delta_2 = deltas["G1"], deltas["G2"]
    agree = (np.sign(delta_1) == np.sign(delta_2)) & (delta_1 != 0)
    overlap = np.where(agree, np.sign(delta_1) * np.minimum(np.abs(delta_1), np.abs(delta_2)), 0.0)
    expected = control + delta_1 + delta_2 - gamma * overlap
    np.testing.assert_allclose(saturating_additive(toy_data, TRAIN, HELD_OUT).means.loc["G1+G2"], expected)
    # singles are unchanged, and without training combinations gamma is 0: the additive prediction
    np.testing.assert_allclose(saturating_additive(toy_data, TRAIN, ["G2"]).means.loc["G2"], profiles.loc["G2"])
    singles_only = [CONTROL, "G0", "G1", "G2"]
    assert fit_saturation(toy_data, singles_only, single_gene_deltas(toy_data, singles_only)) == 0.0


def test_saturation_is_the_least_squares_coefficient_on_training_combination_de_genes(toy_data):
    deltas = single_gene_deltas(toy_data, TRAIN)
    gamma = fit_saturation(toy_data, TRAIN, deltas)
    genes = compute_de_genes(toy_data).top("G0+G1")
    control = toy_data.control_mean
    observed = toy_data.mean_profiles.loc["G0+G1"].to_numpy() - control

    def squared_error(value: float) -> float:
        stack = np.vstack([deltas["G0"], deltas["G1"]])
        signs = np.sign(stack)
        agree = (signs[0] == signs[1]) & (signs[0] != 0)
        overlap = np.where(agree, signs[0] * np.abs(stack).min(axis=0), 0.0)
        return float((((stack.sum(axis=0) - value * overlap) - observed)[genes] ** 2).sum())

    assert squared_error(gamma) <= min(squared_error(gamma - 0.05), squared_error(gamma + 0.05))


def test_saturating_additive_beats_additive_on_real_norman_doubles(norman_data):
    """Leave one double out: on every Norman double with both singles measured the fitted saturation helps."""
    doubles = ["KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+MAP2K6", "MAP2K3+SLC38A2", "MAPK1+TGFBR2"]
    de = compute_de_genes(norman_data)
    wins = 0
    for held_out in doubles:
        train = [name for name in norman_data.condition_names if name != held_out]
        gamma = fit_saturation(norman_data, train, single_gene_deltas(norman_data, train))
        assert 0.3 < gamma < 0.9
        observed = norman_data.mean_profiles.loc[held_out].to_numpy()[de.top(held_out)]
        errors = {
            name: float(((BASELINES[name](norman_data, train, [held_out]).means.to_numpy()[0][de.top(held_out)] - observed) ** 2).mean())
            for name in ("additive", "saturating_additive")
        }
        wins += errors["saturating_additive"] < errors["additive"]
    assert wins == len(doubles)
