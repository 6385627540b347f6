"""Run directories: what a run writes, reading it back, predictions from it, and a 2-process CPU launch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from accelerate.state import AcceleratorState

from perturbedvae.api.fitting import train_from_config
from perturbedvae.data.splits import Split, make_split
from perturbedvae.errors import CheckpointError, ConditionError, ConfigError
from perturbedvae.train import runs
from perturbedvae.train.config import DataConfig, ExperimentConfig, load_config
from perturbedvae.train.runs import RunLayout, load_run, predict_conditions

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic_tiny.yaml"
RUN_FILES = {"config.yaml", "split.json", "model", "log.jsonl", "metrics.json", "metrics.csv", "run_info.json", "checkpoints"}


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


def test_selection_on_held_out_cells(tmp_path: Path) -> None:
    """Held-out cells of training conditions leave training and select the epoch by the prediction error."""
    directory = train_from_config(tiny(tmp_path / "held", "train.selection=held_out_cells", "train.held_out_fraction=0.2", "train.epochs=3"))
    log = [json.loads(line) for line in (directory / "log.jsonl").read_text().splitlines()]
    scores = [record["val"]["held_out_mse"] for record in log]
    info = json.loads((directory / "run_info.json").read_text())
    assert info["selection_metric"] == "held_out_mse"
    assert info["best_epoch"] == 1 + int(np.argmin(scores))
    assert info["best_val_held_out_mse"] == pytest.approx(min(scores))
    run = load_run(directory)
    assert len(run.datamodule.held_out_cells) > 0
    assert not np.isin(run.datamodule.held_out_cells, run.datamodule.train_cells).any()
    assert info["n_train_cells"] == len(run.datamodule.train_cells)


def test_mechanism_run_anchors_on_all_cells_of_training_singles_and_records_its_latent(tmp_path: Path) -> None:
    from perturbedvae.data.conditions import CONTROL

    directory = train_from_config(tiny(tmp_path / "mech", "model.composition=mechanism", "model.likelihood=gaussian",
                                       "train.selection=held_out_cells", "train.epochs=2"))
    info = json.loads((directory / "run_info.json").read_text())
    latent = info["latent"]
    assert 0.0 <= latent["mask_density"] <= 1.0 and latent["initial_mask_density"] == 1.0
    assert 0.0 < latent["probe_chance"] < latent["probe_balanced_accuracy"] + 1.0 and 0.0 < latent["alignment_p"] <= 1.0
    run = load_run(directory)
    effects, data = run.model.module.effects, run.datamodule.data
    assert len(run.datamodule.held_out_cells) > 0
    control = data.expression[data.cell_indices(CONTROL)]
    control = np.asarray(control.toarray() if hasattr(control, "toarray") else control).mean(0)
    for index, gene in enumerate(run.model.perturbation_genes):
        if gene in run.split.train:  # measured single: the anchor is its mean over all its cells, held-out ones included
            cells = data.expression[data.cell_indices(gene)]
            mean = np.asarray(cells.toarray() if hasattr(cells, "toarray") else cells).mean(0)
            np.testing.assert_allclose(effects.single_prior[index].numpy(), mean - control, atol=1e-4)
            assert bool(effects.has_prior[index])


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
    with pytest.raises(ConditionError, match=rf"'{gene.lower()}': did you mean {gene}\? \(only the case differs\)"):
        run.predict([gene.lower()])


def test_a_gene_the_split_held_out_is_named_as_such(tmp_path: Path) -> None:
    """A gene held out in validation only (a run refuses test genes it cannot predict, see test_gene_features)."""
    config = tiny(tmp_path / "held", "train.epochs=1", "train.checkpoint_every=0")
    unseen = make_split(runs.load_data(config.data), "unseen_singles", seed=1, test_fraction=0.2)
    Split("custom", None, unseen.train, unseen.test, [], {}, {}).save(tmp_path / "split.json")  # its test genes validate only
    run = load_run(train_from_config(tiny(tmp_path / "held", "train.epochs=1", "train.checkpoint_every=0", f"split.path={tmp_path / 'split.json'}")))
    held_out = sorted(set(run.datamodule.data.perturbed_genes) - set(run.model.perturbation_genes))
    assert held_out
    gene = held_out[0]
    roles = {role for name, role in run.split.assignments().items() if gene in name.split("+")}
    assert roles and "train" not in roles
    where = ", ".join(role for role in ("val", "test") if role in roles)
    with pytest.raises(ConditionError, match=rf"^{gene} is perturbed in the data but held out of training by the split "
                                             rf"\({where}\), so this run has no effect for it") as error:
        run.predict([f"{run.model.perturbation_genes[0]}+{gene}"])
    assert "close match" not in str(error.value)


def test_an_existing_run_is_not_overwritten_silently(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="output.overwrite=true"):
        train_from_config(tiny(run_dir))
    with pytest.raises(CheckpointError, match="model.n_latent"):
        train_from_config(tiny(run_dir, "model.n_latent=3"), resume=True)
    with pytest.raises(CheckpointError, match="not a finished run"):
        load_run(tmp_path)
    assert RunLayout(tmp_path).existing_outputs() == []


def _launch(run_dir: Path, *launch_options: str, overrides: tuple[str, ...] = ()) -> subprocess.Popen:
    """`accelerate launch` of scripts/train.py on the tiny config, as CPU processes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_options, "--mixed_precision", "no",
               "--dynamo_backend", "no", str(REPO / "scripts" / "train.py"), "--config", str(TINY),
               f"output.run_dir={run_dir}", "train.epochs=2", *overrides]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=run_dir.parent)


def _finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_train_one_run_that_resumes_in_one_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    _finish(_launch(run_dir, "--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
                    "--main_process_port", str(_free_port()), overrides=("train.checkpoint_every=1",)))
    assert {path.name for path in tmp_path.iterdir()} == {"ddp"}
    assert {path.name for path in run_dir.iterdir()} == RUN_FILES
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["distributed_type"].endswith("MULTI_CPU")
    assert sorted(path.name for path in (run_dir / "checkpoints" / "epoch_0002").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]

    # the checkpoint written by 2 processes resumes in 1, and the finished run loads in 1
    train_from_config(load_config(run_dir / "config.yaml", ["train.epochs=3"]), resume=True)
    assert [json.loads(line)["epoch"] for line in (run_dir / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((run_dir / "run_info.json").read_text())["world_size"] == 1
    run = load_run(run_dir)
    assert np.isfinite(run.predict(run.split.test).means.to_numpy()).all()


@pytest.mark.slow
def test_the_multi_node_config_trains_across_two_launchers(tmp_path: Path) -> None:
    """Two `accelerate launch` commands, one per "machine" (rank 0 and 1), meeting at the main one's address."""
    run_dir, port = tmp_path / "two_nodes", str(_free_port())
    launchers = [
        _launch(run_dir, "--config_file", str(REPO / "configs" / "accelerate" / "multi_node.yaml"), "--num_processes", "2",
                "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port)
        for rank in (0, 1)
    ]
    for launcher in launchers:
        _finish(launcher)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2
    assert [json.loads(line)["epoch"] for line in (run_dir / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_the_accelerate_configs_are_what_accelerate_reads() -> None:
    """Each file in configs/accelerate loads with accelerate's own parser (unknown keys fail) as documented."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {  # file: (distributed type, processes, machines, precision)
        "single_gpu": (DistributedType.NO, 1, 1, "no"),
        "multi_gpu_bf16": (DistributedType.MULTI_GPU, 8, 1, "bf16"),
        "fsdp": (DistributedType.FSDP, 8, 1, "bf16"),
        "multi_node": (DistributedType.MULTI_GPU, 16, 2, "bf16"),
        "cpu_2proc": (DistributedType.MULTI_GPU, 2, 1, "no"),
    }
    folder = REPO / "configs" / "accelerate"
    assert {path.stem for path in folder.glob("*.yaml")} == set(expected)
    for name, (kind, processes, machines, precision) in expected.items():
        config = load_config_from_file(str(folder / f"{name}.yaml"))
        assert (config.distributed_type, config.num_processes, config.num_machines, config.mixed_precision) == (
            kind, processes, machines, precision), name
    assert load_config_from_file(str(folder / "fsdp.yaml")).fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"


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


def test_data_counts_overrides_the_detection(tmp_path: Path) -> None:
    from tests.conftest import make_toy_adata

    adata = make_toy_adata(counts=True)
    adata.X = np.minimum(adata.X, 19)
    adata.write_h5ad(tmp_path / "shallow.h5ad")
    assert tiny(tmp_path / "run", "data.counts=false").data.counts is False
    with pytest.raises(ConfigError, match="data.counts must be of type bool"):
        tiny(tmp_path / "run", "data.counts=3")
    assert not runs.load_data(DataConfig(path=str(tmp_path / "shallow.h5ad"), counts=False)).is_counts
    with pytest.warns(UserWarning, match="max 19"):
        assert runs.load_data(DataConfig(path=str(tmp_path / "shallow.h5ad"))).is_counts


def test_data_min_cells_reaches_the_loader(tmp_path: Path) -> None:
    from tests.conftest import make_toy_adata

    make_toy_adata(cells_per_condition=12).write_h5ad(tmp_path / "toy.h5ad")
    with pytest.warns(UserWarning, match="fewer than 20 cells"):
        runs.load_data(DataConfig(path=str(tmp_path / "toy.h5ad"), min_cells=20))
    with pytest.raises(ConfigError, match="data.min_cells must be at least 0"):
        tiny(tmp_path / "run", "data.min_cells=-1")
