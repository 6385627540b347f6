"""Run directories: what a run writes, reading it back, predictions from it, and a 2-process CPU launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from accelerate.state import AcceleratorState

from perturbedvae.errors import CheckpointError, ConditionError, ConfigError
from perturbedvae.train import runs
from perturbedvae.train.config import ExperimentConfig, load_config
from perturbedvae.train.runs import RunLayout, load_run, predict_conditions, train_from_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic_tiny.yaml"
RUN_FILES = {"config.yaml", "split.json", "model", "log.jsonl", "metrics.json", "metrics.csv", "run_info.json", "checkpoints"}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny(run_dir: Path, *overrides: str) -> ExperimentConfig:
    return load_config(TINY, [f"output.run_dir={run_dir}", "train.epochs=2", *overrides])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    directory = train_from_config(tiny(tmp_path_factory.mktemp("runs") / "tiny"))
    AcceleratorState._reset_state(reset_partial_state=True)
    return directory


def test_a_run_writes_its_layout(run_dir: Path) -> None:
    assert {path.name for path in run_dir.iterdir()} == RUN_FILES
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [1, 2]
    assert all(np.isfinite(record["loss"]) and "pearson_delta_de" in record["val"] for record in log)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["seed"] == 0 and info["train_cells_per_second"] > 0
    assert info["versions"]["torch"] and info["wall_seconds"] >= info["train_seconds"] > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    split = json.loads((run_dir / "split.json").read_text())
    assert set(metrics["perturbedvae"]["per_condition"]) == set(split["test"])
    assert load_config(run_dir / "config.yaml") == tiny(run_dir)


def test_predict_conditions_speaks_the_datas_condition_syntax(run_dir: Path) -> None:
    run = load_run(run_dir)
    a, b = run.model.perturbation_genes[:2]
    predictions = predict_conditions(run_dir, [f"{b}+{a}", f"{a}+ctrl", "ctrl", f"{a}+{b}"], per_cell=True)
    assert predictions.conditions == [f"{a}+{b}", a, "control"]
    n_controls = min(run.config.train.n_control_cells, int((run.datamodule.data.conditions == "control").sum()))
    assert predictions.cells.n_obs == 3 * n_controls
    for name in predictions.conditions:
        cells = predictions.cells[predictions.cells.obs["condition"] == name].X
        np.testing.assert_allclose(cells.mean(axis=0), predictions.means.loc[name].to_numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(predictions.means.loc[a], predictions.means.loc["control"])


def test_unknown_genes_and_malformed_conditions_are_condition_errors(run_dir: Path) -> None:
    run = load_run(run_dir)
    gene = run.model.perturbation_genes[0]
    with pytest.raises(ConditionError, match=f"close matches: {gene}"):
        run.predict([gene + "X"])
    with pytest.raises(ConditionError, match="malformed"):
        run.predict([f"{gene}++"])


def test_an_existing_run_is_not_overwritten_silently(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="output.overwrite=true"):
        train_from_config(tiny(run_dir))
    with pytest.raises(CheckpointError, match="model.n_latent"):
        train_from_config(tiny(run_dir, "model.n_latent=3"), resume=True)
    with pytest.raises(CheckpointError, match="not a finished run"):
        load_run(tmp_path)
    assert RunLayout(tmp_path).existing_outputs() == []


@pytest.mark.slow
def test_two_cpu_processes_train_one_run(tmp_path: Path) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "scripts" / "train.py"), "--config", str(TINY),
               f"output.run_dir={tmp_path / 'ddp'}", "train.epochs=2", "train.checkpoint_every=0"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    assert {path.name for path in tmp_path.iterdir()} == {"ddp"}
    assert {path.name for path in run_dir.iterdir()} == RUN_FILES - {"checkpoints"}
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["distributed_type"].endswith("MULTI_CPU")
    assert [json.loads(line)["epoch"] for line in (run_dir / "log.jsonl").read_text().splitlines()] == [1, 2]


def _fail_if_data_is_loaded(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the output folder was checked")

    monkeypatch.setattr(runs, "load_data", refuse)


def test_an_unwritable_run_dir_fails_before_training(tmp_path: Path, monkeypatch) -> None:
    _fail_if_data_is_loaded(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot write to output.run_dir"):
        train_from_config(tiny(blocker / "run"))


def test_a_full_disk_fails_before_training(tmp_path: Path, monkeypatch) -> None:
    _fail_if_data_is_loaded(monkeypatch)
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - 2**20, free=2**20))
    with pytest.raises(ConfigError, match="1 MiB free"):
        train_from_config(tiny(tmp_path / "run"))
