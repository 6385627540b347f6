"""The notebook API: `pv.load_dataset`, `pv.splits`, `pv.PerturbedVAE` (train, predict, save, load) and
the one interface it shares with the baselines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from accelerate.state import AcceleratorState

import perturbedvae as pv
from perturbedvae.api.validation import ConditionScorer
from perturbedvae.cli import main
from perturbedvae.data.splits import make_split
from perturbedvae.errors import CheckpointError, ConditionError, ConfigError, DataError
from perturbedvae.evaluate.evaluator import evaluate_named
from perturbedvae.predictions import Predictor
from perturbedvae.train.config import load_config
from perturbedvae.train.runs import MODEL_NAME, predict_conditions
from tests.conftest import make_toy_adata

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic_tiny.yaml"
TOY_REPRESENTATION = {"kind": "expression", "n_components": 10}


@pytest.fixture
def toy():
    """An AnnData that never touched a file, its data and a doubles split (one held-out double)."""
    adata = make_toy_adata(cells_per_condition=30)
    data = pv.load_dataset(adata)
    return adata, data, pv.splits.doubles(data, seed=1)


def _toy_model(data, split, **options) -> pv.PerturbedVAE:
    return pv.PerturbedVAE(data, split, representation=TOY_REPRESENTATION, n_latent=4, n_hidden=16, **options)


def test_load_dataset_takes_an_anndata_a_path_or_a_name(norman_path: Path, norman_data) -> None:
    import anndata as ad

    adata = ad.read_h5ad(norman_path)
    in_memory = pv.load_dataset(adata[adata.obs["dataset"] == "norman19"].copy())
    from_path = pv.load_dataset(str(norman_path), obs_filter={"dataset": "norman19"})
    by_name = pv.load_dataset("norman2019_subset")
    assert in_memory.fingerprint == from_path.fingerprint == by_name.fingerprint == norman_data.fingerprint
    assert pv.load_dataset(by_name) is by_name
    with pytest.raises(DataError, match="did you mean norman2019_subset"):
        pv.load_dataset("norman2019_subst")


def test_split_helpers_are_the_schemes_with_norman_defaults(norman_data) -> None:
    doubles = pv.splits.doubles(norman_data, seed=1)
    assert doubles.test == ["KLF1+TGFBR2", "MAP2K3+MAP2K6"] and len(doubles.val) == 1
    assert doubles.to_dict() == make_split(norman_data, "doubles", 1, test_fraction=0.4, val_fraction=0.34, unseen_combos="train").to_dict()
    assert pv.splits.gears(norman_data, seed=2).to_dict() == make_split(norman_data, "gears", 2).to_dict()
    assert pv.splits.lodo(norman_data, 0).test == [pv.splits.lodo(norman_data, 0).test[0]]


def test_options_are_checked_when_the_model_is_built(toy) -> None:
    _, data, split = toy
    with pytest.raises(ConfigError, match="did you mean model.n_latent"):
        pv.PerturbedVAE(data, split, n_latnt=4)
    with pytest.raises(ConfigError, match="representation 'umap'"):
        pv.PerturbedVAE(data, split, representation="umap")
    model = _toy_model(data, split)
    with pytest.raises(ConfigError, match="not trained yet"):
        model.predict(split.test)
    with pytest.raises(ConfigError, match="train.lr"):
        model.train(lr=-1.0)


def test_an_in_memory_anndata_trains_twice_in_one_process_with_another_precision(toy) -> None:
    _, data, split = toy
    model = _toy_model(data, split).train(max_epochs=2)
    assert [record["epoch"] for record in model.history] == [1, 2]
    first = model.predict(split.test).means
    model.train(max_epochs=1, mixed_precision="bf16")  # Accelerate refused a second precision in one process
    assert model.state.run_info["mixed_precision"] == "bf16" and len(model.history) == 1
    assert not np.allclose(first.to_numpy(), model.predict(split.test).means.to_numpy())
    again = model.train(max_epochs=2, mixed_precision="no").predict(split.test).means
    np.testing.assert_allclose(again.to_numpy(), first.to_numpy(), atol=1e-6)  # same seed, same head


def test_predict_speaks_the_datas_spelling_and_refuses_unknown_genes(toy) -> None:
    _, data, split = toy
    model = _toy_model(data, split).train(max_epochs=1)
    predictions = model.predict(["G1+G0", "G0+G1", "G2+ctrl"], per_cell=True)
    assert predictions.conditions == ["G0+G1", "G2"]
    assert set(predictions.cells.obs["condition"]) == {"G0+G1", "G2"}
    with pytest.raises(ConditionError, match="G3"):
        model.predict(["G3"])
    assert model.can_predict("G1+G0") and not model.can_predict("G3")


def test_a_saved_model_moved_elsewhere_loads_and_predicts_with_only_the_data(toy, tmp_path: Path) -> None:
    adata, data, split = toy
    model = _toy_model(data, split).train(max_epochs=2)
    expected = model.predict(split.test, sample_seed=3)
    model.save(tmp_path / "saved")
    with pytest.raises(ConfigError, match="not empty"):
        model.save(tmp_path / "saved")
    moved = tmp_path / "elsewhere" / "model"
    shutil.move(tmp_path / "saved", moved)
    manifest = json.loads((moved / "perturbedvae_model.json").read_text())
    assert manifest["format"] == "perturbedvae-model" and manifest["format_version"] == 1
    assert {path.name for path in moved.iterdir()} >= {"head", "config.yaml", "split.json", "representation.npz"}

    loaded = pv.PerturbedVAE.load(moved, pv.load_dataset(adata))
    predicted = loaded.predict(split.test, sample_seed=3)
    np.testing.assert_allclose(predicted.means.to_numpy(), expected.means.to_numpy(), atol=1e-6)
    np.testing.assert_allclose(predicted.cells.X, expected.cells.X, atol=1e-6)
    assert loaded.history == model.history and loaded.config == model.config

    with pytest.raises(DataError, match="1 of the model's 30 genes missing"):
        pv.PerturbedVAE.load(moved, pv.load_dataset(adata[:, adata.var_names[:-1]].copy()))
    with pytest.raises(DataError, match="another order"):
        pv.PerturbedVAE.load(moved, pv.load_dataset(adata[:, adata.var_names[::-1]].copy()))
    no_controls = adata[~adata.obs_names.isin(adata.obs_names[:5])].copy()
    with pytest.raises(DataError, match="control cells are not in the data"), pytest.warns(UserWarning, match="fingerprint"):
        pv.PerturbedVAE.load(moved, pv.load_dataset(no_controls))
    (moved / "perturbedvae_model.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        pv.PerturbedVAE.load(moved, data)


def test_a_saved_encoder_model_keeps_a_copy_of_its_card(toy, tmp_path: Path) -> None:
    adata, _, _ = toy
    adata.obsm["X_emb"] = np.random.default_rng(0).normal(size=(adata.n_obs, 6)).astype(np.float32)
    data = pv.load_dataset(adata)
    split = pv.splits.doubles(data, seed=1)
    card = tmp_path / "cards" / "mine.yaml"
    card.parent.mkdir()
    card.write_text("kind: precomputed\nobsm_key: X_emb\n")
    representation = {"kind": "encoder", "adapter": str(card), "cache_dir": str(tmp_path / "cache")}
    model = pv.PerturbedVAE(data, split, representation=representation, n_latent=4, n_hidden=16).train(max_epochs=1)
    expected = model.predict(split.test).means
    model.save(tmp_path / "saved")
    shutil.rmtree(card.parent)
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "saved", moved)
    assert (moved / "adapter_card.yaml").read_text() == "kind: precomputed\nobsm_key: X_emb\n"
    loaded = pv.PerturbedVAE.load(moved, data)
    assert loaded.config.representation.adapter == str(moved.resolve() / "adapter_card.yaml")
    np.testing.assert_allclose(loaded.predict(split.test).means.to_numpy(), expected.to_numpy(), atol=1e-6)


def test_models_and_baselines_share_one_interface(toy) -> None:
    _, data, split = toy
    model = _toy_model(data, split)
    additive = pv.Baseline("additive")
    assert isinstance(model, Predictor) and isinstance(additive, Predictor)
    for predictor in (model, additive):
        assert predictor.fit(data, split, **({"max_epochs": 1} if predictor is model else {})) is predictor
        assert predictor.predict(["G1+G0"]).conditions == ["G0+G1"]
    results, tidy = pv.evaluate_models(data, split, {"PerturbedVAE": model, "my_additive": additive})
    scores = tidy[tidy.metric == "mse_de"].set_index("model")["value"]
    assert scores["my_additive"] == pytest.approx(scores["additive"])  # the same rule, fitted the same way
    assert {"PerturbedVAE", "no_change", "dominance"} <= set(results)
    with pytest.raises(ConfigError, match="did you mean additive"):
        pv.Baseline("additiv")


def _notebook_metrics(config_path: Path, overrides: list[str]) -> pd.DataFrame:
    """Test metrics of the notebook model trained from the config the CLI reads, scored as the CLI scores."""
    config = load_config(config_path, overrides)
    model = pv.PerturbedVAE.from_config(config).train()
    split = model.split
    scorer = ConditionScorer(model.state.datamodule, split.test, split.test_subgroups, config.data.de_method,
                             config.data.n_de_genes, model.state.controls)
    _, tidy = evaluate_named(scorer.evaluator, {MODEL_NAME: model.predict(scorer.conditions)})
    return tidy


def _run_metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


def _assert_same_metrics(left: pd.DataFrame, right: pd.DataFrame) -> None:
    keys = ["model", "subgroup", "condition", "metric"]
    joined = left.merge(right, on=keys, suffixes=("_left", "_right"))
    assert len(joined) == len(left) == len(right) > 0
    np.testing.assert_allclose(joined["value_left"], joined["value_right"], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_the_cli_and_the_notebook_class_give_identical_metrics(tmp_path: Path) -> None:
    overrides = [f"output.run_dir={tmp_path / 'cli'}", "train.epochs=2"]
    assert main(["train", "--config", str(TINY), *overrides]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    _assert_same_metrics(_run_metrics(tmp_path / "cli"), _notebook_metrics(TINY, overrides))

    # the CLI's run directory as a model object: it predicts as `perturbedvae predict` does, and saves self-contained
    from_run = pv.PerturbedVAE.from_run(tmp_path / "cli")
    conditions = [name for name in from_run.split.test if from_run.can_predict(name)]
    expected = predict_conditions(tmp_path / "cli", conditions).means
    np.testing.assert_allclose(from_run.predict(conditions).means.to_numpy(), expected.to_numpy(), atol=1e-6)
    assert [record["epoch"] for record in from_run.history] == [1, 2]
    loaded = pv.PerturbedVAE.load(from_run.save(tmp_path / "saved"), from_run.data)
    np.testing.assert_allclose(loaded.predict(conditions).means.to_numpy(), expected.to_numpy(), atol=1e-6)


@pytest.mark.slow
def test_accelerate_launch_and_the_notebook_class_give_identical_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "launched"
    overrides = [f"output.run_dir={run_dir}", "train.epochs=2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(REPO / "scripts" / "train.py"), "--config", str(TINY), *overrides]
    finished = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    _assert_same_metrics(_run_metrics(run_dir), _notebook_metrics(TINY, overrides))



def test_the_notebook_defaults_are_the_benchmarked_norman_config() -> None:
    """`pv.PerturbedVAE`'s defaults copy configs/norman_subset.yaml (a wheel ships no configs/): they must not drift."""
    from perturbedvae.api.model import DEFAULT_MODEL, DEFAULT_REPRESENTATION, DEFAULT_TRAIN

    path = Path(__file__).resolve().parents[1] / "configs" / "norman_subset.yaml"
    written = yaml.safe_load(path.read_text())
    assert {key: value for key, value in written["model"].items() if key != "likelihood"} == DEFAULT_MODEL
    train = load_config(path).train
    assert {key: getattr(train, key) for key in DEFAULT_TRAIN} == DEFAULT_TRAIN
    assert written["representation"] == DEFAULT_REPRESENTATION
