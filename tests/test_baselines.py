import numpy as np
import pytest

from perturbedvae.data.conditions import CONTROL
from perturbedvae.data.loading import load_dataset
from perturbedvae.errors import SplitError
from perturbedvae.evaluate.baselines import BASELINES, additive, linear, no_change, predict_baselines, train_mean
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
