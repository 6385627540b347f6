"""The datamodule and the Accelerate training loop: batches, warm-ups, exact resume, NaN guard, early stop."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from perturbedvae.api.fitting import train_from_config
from perturbedvae.data.conditions import CONTROL, genes_of
from perturbedvae.data.loading import load_dataset
from perturbedvae.data.splits import make_split
from perturbedvae.data.synthetic import SimulationConfig, simulate
from perturbedvae.errors import CheckpointError, ConfigError, TrainingDivergedError
from perturbedvae.model import LossWeights, PerturbedVAEConfig, PerturbedVAEModule
from perturbedvae.train.config import ExperimentConfig, TrainConfig
from perturbedvae.train.datamodule import (
    EpochShuffleSampler,
    PerturbationDataModule,
    hold_out_cells,
    perturbation_vocabulary,
    prefetched,
)
from perturbedvae.train.initialization import finalize_head
from perturbedvae.train.representation import build_representation, head_of
from perturbedvae.train.runs import new_module
from perturbedvae.train.trainer import (
    Selection,
    Trainer,
    TrainingArguments,
    make_accelerator,
    make_optimizer,
    thread_share,
    warmup_factor,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[1]
SIMULATION = {"n_genes": 40, "n_latent": 4, "n_perturbations": 6, "n_combinations": 8, "cells_per_condition": 15, "n_control_cells": 60}


def tiny_config(run_dir: Path, **train) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "data": {"synthetic": SIMULATION, "n_de_genes": 10},
        "split": {"scheme": "doubles", "seed": 1},
        "model": {"likelihood": "nb", "n_latent": 4, "n_hidden": 16, "n_layers": 1},
        "train": {"epochs": 4, "batch_size": 32, "lr": 3e-3, "kl_warmup_epochs": 2, "sparsity_warmup_epochs": 2, "n_control_cells": 40, **train},
        "output": {"run_dir": str(run_dir)},
    })


def trainer_for(config: ExperimentConfig, datamodule: PerturbationDataModule, run_dir: Path, **options) -> Trainer:
    """A trainer of a new head drawn from the config's seed, as `fit_head` gives it one."""
    module = new_module(config, datamodule)
    return Trainer(module, TrainingArguments.for_head(config.train, head_of(module)), datamodule, run_dir, **options)


@pytest.fixture(scope="module")
def data():
    return load_dataset(simulate(SimulationConfig(**SIMULATION)))


@pytest.fixture(scope="module")
def datamodule(data) -> PerturbationDataModule:
    split = make_split(data, "doubles", seed=1)
    train_cells = np.flatnonzero(np.isin(data.conditions, split.train))
    representation = build_representation(tiny_config(Path("unused")).representation, data, train_cells)
    return PerturbationDataModule.build(data, split, representation, "nb")


def test_vocabulary_is_the_sorted_genes_of_training_conditions(datamodule) -> None:
    split = datamodule.split
    expected = sorted({gene for name in split.train for gene in genes_of(name)})
    assert datamodule.perturbation_genes == expected == perturbation_vocabulary(split)
    held_out_only = {gene for name in split.val + split.test for gene in genes_of(name)} - set(expected)
    assert not held_out_only & set(datamodule.perturbation_genes)


def test_batches_hold_training_cells_with_their_multi_hot_and_counts(datamodule, data) -> None:
    assert datamodule.target.is_sparse and datamodule.representation.matrix.is_sparse
    loader = datamodule.train_loader(batch_size=50, seed=0)
    seen = []
    for batch in loader:
        rows = batch["index"].numpy()
        seen.extend(rows)
        assert batch["x"].shape == (len(rows), data.adata.n_vars) and batch["x"].dtype == torch.float32
        np.testing.assert_array_equal(batch["x"].numpy(), data.adata.layers["counts"][rows].toarray())
        np.testing.assert_allclose(batch["library_size"].numpy(), batch["x"].sum(1).numpy(), rtol=1e-5)
        np.testing.assert_array_equal(batch["x_nonzero"].numpy(), np.flatnonzero(batch["x"].numpy()))
        for row, hot in zip(rows, batch["perturbations"].numpy()):
            genes = [datamodule.perturbation_genes[column] for column in np.flatnonzero(hot)]
            assert ("+".join(genes) or CONTROL) == data.conditions[row]
    assert sorted(seen) == sorted(datamodule.train_cells)
    assert set(data.conditions[seen]) == set(datamodule.split.train)


def test_shuffle_depends_only_on_seed_and_epoch() -> None:
    first, second = EpochShuffleSampler(100, seed=3), EpochShuffleSampler(100, seed=3)
    first.set_epoch(2)
    second.set_epoch(2)
    assert list(first) == list(second)
    second.set_epoch(3)
    assert list(first) != list(second)
    assert sorted(first) == list(range(100))


def test_block_shuffle_keeps_runs_of_consecutive_cells_and_covers_every_cell_once() -> None:
    sampler = EpochShuffleSampler(103, seed=3, block=8)
    sampler.set_epoch(1)
    order = np.array(list(sampler))
    assert sorted(order) == list(range(103))
    runs = np.split(order, np.flatnonzero(np.diff(order) != 1) + 1)
    assert all(run[0] % 8 == 0 for run in runs)  # each run starts at a block boundary
    assert len(runs) <= 13 and not np.array_equal(order, np.arange(103))  # 13 blocks, shuffled
    whole_blocks = np.sort(np.array(list(EpochShuffleSampler(104, seed=3, block=8)))[:32])
    assert len(np.split(whole_blocks, np.flatnonzero(np.diff(whole_blocks) != 1) + 1)) <= 4  # a batch of 32: 4 spans
    sampler.set_epoch(2)
    assert list(sampler) != order.tolist()
    with pytest.raises(ValueError, match="at least 1"):
        EpochShuffleSampler(10, seed=0, block=0)


def test_block_of_one_is_the_cell_shuffle() -> None:
    plain, blocked = EpochShuffleSampler(50, seed=7), EpochShuffleSampler(50, seed=7, block=1)
    assert list(plain) == list(blocked) == np.random.default_rng([7, 0]).permutation(50).tolist()


def test_warmup_is_linear_over_epochs() -> None:
    assert [warmup_factor(epoch, 4) for epoch in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_training_arguments_warm_up_kl_and_sparsity_and_keep_the_other_weights() -> None:
    head = PerturbedVAEModule(PerturbedVAEConfig(n_input=5, n_genes=5, n_perturbations=2, kl_weight=0.5, sparsity_weight=0.1,
                                                 alignment_weight=2.0, dag_weight=0.01))
    arguments = TrainingArguments.for_head(TrainConfig(kl_warmup_epochs=2, sparsity_warmup_epochs=4), head)
    assert arguments.loss_weights_at(1) == LossWeights(kl=0.25, alignment=2.0, sparsity=0.025, dag=0.01)
    assert arguments.loss_weights_at(4) == LossWeights(kl=0.5, alignment=2.0, sparsity=0.1, dag=0.01)


def test_the_trainer_trains_the_module_it_is_given(datamodule, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, epochs=1)  # n_latent 4
    given = new_module(ExperimentConfig.from_dict({**config.to_dict(), "model": {**config.model, "n_latent": 3}}), datamodule)
    before = {name: value.clone() for name, value in given.state_dict().items()}
    result = Trainer(given, TrainingArguments.for_head(config.train, given), datamodule, tmp_path).fit()
    assert result.module.config.n_latent == 3
    assert any(not torch.equal(before[name], value) for name, value in given.state_dict().items())


def test_a_standardizing_head_starts_at_the_training_cells_scale(datamodule, tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    for composition in ("latent_sum", "mechanism"):
        model = {**config.model, "standardize_inputs": True, "composition": composition}
        head = head_of(new_module(ExperimentConfig.from_dict({**config.to_dict(), "model": model}), datamodule))
        h = datamodule.control_inputs(datamodule.train_cells)["h"]
        torch.testing.assert_close(head.input_mean, h.mean(0))
        torch.testing.assert_close(head.input_scale, h.std(0))


def test_every_effect_member_starts_at_the_singles_trains_and_takes_the_final_anchors(datamodule, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, epochs=2)
    model = {**config.model, "composition": "mechanism", "effect_members": 2}
    config = ExperimentConfig.from_dict({**config.to_dict(), "model": model})
    module = new_module(config, datamodule)
    members = head_of(module).effects.members
    started = [member.effect_table.detach().clone() for member in members]
    assert all(member.has_prior.any() for member in members)
    torch.testing.assert_close(started[0], started[1], atol=0.1, rtol=0.0)  # the same SVD start ...
    assert not torch.equal(started[0], started[1])  # ... with each member's own noise
    head = head_of(Trainer(module, TrainingArguments.for_head(config.train, head_of(module)), datamodule, tmp_path).fit().module)
    finalize_head(head, datamodule)
    trained = head.effects.members
    assert all(not torch.equal(before, member.effect_table) for before, member in zip(started, trained))
    torch.testing.assert_close(trained[0].single_prior, trained[1].single_prior)


def test_nan_loss_stops_with_the_step_and_cells_named(datamodule, tmp_path: Path) -> None:
    poisoned = PerturbationDataModule(datamodule.data, datamodule.split, datamodule.representation,
                                      datamodule.target, datamodule.library_size * np.nan,
                                      datamodule.perturbation_genes, datamodule.train_cells, datamodule.held_out_cells)
    with pytest.raises(TrainingDivergedError, match=r"epoch 1, step 0 .*global step 0.*cell\d+.*train.lr"):
        trainer_for(tiny_config(tmp_path), poisoned, tmp_path).fit()


def test_selection_by_an_error_keeps_the_lowest(datamodule, tmp_path: Path) -> None:
    scores = iter([0.3, 0.1, 0.2])
    trainer = trainer_for(tiny_config(tmp_path, epochs=3), datamodule, tmp_path,
                      validator=lambda module: {"held_out_mse": next(scores)}, selection=Selection("held_out_mse", maximize=False))
    result = trainer.fit()
    assert result.progress.best_epoch == 2
    assert result.run_info["best_val_held_out_mse"] == pytest.approx(0.1)


def test_held_out_cells_leave_training_per_condition(datamodule) -> None:
    data, split = datamodule.data, datamodule.split
    train, held = hold_out_cells(data, split.train, 0.2, seed=3)
    assert len(np.intersect1d(train, held)) == 0
    assert sorted(np.concatenate([train, held]).tolist()) == np.flatnonzero(np.isin(data.conditions, split.train)).tolist()
    for name in split.train:
        cells = data.cell_indices(name)
        n_held = int(np.isin(cells, held).sum())
        assert n_held == min(len(cells) - 1, int(0.2 * len(cells) + 0.5))
    again, _ = hold_out_cells(data, split.train, 0.2, seed=3)
    np.testing.assert_array_equal(train, again)  # seeded
    other, _ = hold_out_cells(data, split.train, 0.2, seed=4)
    assert not np.array_equal(train, other)


def test_early_stopping_keeps_the_best_weights(datamodule, tmp_path: Path) -> None:
    scores = iter([0.5, 0.2, 0.1, 0.9])
    trainer = trainer_for(tiny_config(tmp_path, epochs=4, early_stopping_patience=2), datamodule, tmp_path,
                      validator=lambda module: {"pearson_delta_de": next(scores)})
    result = trainer.fit()
    assert result.progress.epochs_done == 3 and result.progress.stopped_early
    assert result.progress.best_epoch == 1 and result.progress.best_score == 0.5
    for name, value in result.module.state_dict().items():
        torch.testing.assert_close(value, result.progress.best_state[name])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [record["val"]["pearson_delta_de"] for record in log] == [0.5, 0.2, 0.1]
    assert [record["kl_weight"] for record in log] == [0.0, 0.5, 1.0]


def test_a_compiled_step_trains_the_same_head_and_returns_it_plain(datamodule, tmp_path: Path) -> None:
    """`train.compile` / `accelerate launch --dynamo_backend`: `prepare` wraps the module in torch.compile, whose
    state-dict keys carry `_orig_mod.`; the kept weights must load into the plain head. Dynamo's "eager"
    backend traces the step as inductor would but runs it without generating code (seconds, not a minute)."""
    config = tiny_config(tmp_path, epochs=2)

    def improving(module: torch.nn.Module, scores=iter([0.1, 0.2, 0.1, 0.2])) -> dict[str, float]:
        return {"pearson_delta_de": next(scores)}  # each run keeps its last epoch, through `best_state`

    plain = trainer_for(config, datamodule, tmp_path / "plain", validator=improving).fit()
    AcceleratorState._reset_state(reset_partial_state=True)
    compiled = trainer_for(config, datamodule, tmp_path / "compiled", validator=improving,
                           accelerator=Accelerator(dynamo_backend="eager")).fit()
    assert compiled.run_info["dynamo_backend"] == "eager" and plain.run_info["dynamo_backend"] == "no"
    assert compiled.progress.best_epoch == 2 and compiled.progress.best_state.keys() == plain.module.state_dict().keys()
    assert len(compiled.run_info["train_cpu_seconds_per_epoch"]) == 2
    for name, value in plain.module.state_dict().items():
        torch.testing.assert_close(compiled.module.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_bf16_and_gradient_accumulation_train(datamodule, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, epochs=1, mixed_precision="bf16", gradient_accumulation_steps=2)
    result = trainer_for(config, datamodule, tmp_path).fit()
    assert result.run_info["mixed_precision"] == "bf16" and result.run_info["gradient_accumulation_steps"] == 2
    assert np.isfinite(json.loads((tmp_path / "log.jsonl").read_text())["loss"])
    assert result.run_info["train_cpu_seconds"] > 0 and result.run_info["train_cells_per_cpu_second"] > 0


def test_prefetched_batches_come_in_order_and_errors_at_their_batch() -> None:
    assert list(prefetched(iter(range(20)), 3)) == list(range(20))
    assert list(prefetched(iter(range(5)), 0)) == list(range(5))

    def failing():
        yield from range(3)
        raise ValueError("row 3 unreadable")

    items = prefetched(failing(), 2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="row 3 unreadable"):
        next(items)


def test_prefetching_trains_the_same_steps(datamodule, tmp_path: Path) -> None:
    runs = {}
    for depth in (0, 2):
        run_dir = tmp_path / f"prefetch{depth}"
        result = trainer_for(tiny_config(run_dir, epochs=2, prefetch_batches=depth), datamodule, run_dir).fit()
        runs[depth] = (_comparable_log(run_dir), result.module.state_dict())
        AcceleratorState._reset_state(reset_partial_state=True)
    assert runs[0][0] == runs[2][0] and len(runs[0][0]) == 2
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[2][1][name]), name


def test_prefetching_with_gradient_accumulation_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="prefetch_batches needs train.gradient_accumulation_steps 1"):
        tiny_config(tmp_path, prefetch_batches=2, gradient_accumulation_steps=2)


def _comparable_log(run_dir: Path) -> list[dict]:
    return [{key: value for key, value in json.loads(line).items() if key != "seconds"} for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _assert_same_up_to_rounding(expected: object, actual: object, where: str = "") -> None:
    """Equal structure and strings; floats equal to 1e-4 relative (threads and memory alignment change rounding
    from one process to the next, so a resumed run matches an uninterrupted one to rounding, not bit for bit)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and expected.keys() == actual.keys(), where
        for key in expected:
            _assert_same_up_to_rounding(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(expected) == len(actual), where
        for index, (left, right) in enumerate(zip(expected, actual)):
            _assert_same_up_to_rounding(left, right, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-4, abs=1e-6, nan_ok=True), where
    else:
        assert expected == actual, where


def _assert_same_run(straight: Path, resumed: Path) -> None:
    _assert_same_up_to_rounding(_comparable_log(straight), _comparable_log(resumed), "log")
    _assert_same_up_to_rounding(json.loads((straight / "metrics.json").read_text()), json.loads((resumed / "metrics.json").read_text()), "metrics")


def test_resume_after_an_interrupt_reaches_the_uninterrupted_result(tmp_path: Path, monkeypatch) -> None:
    straight = train_from_config(tiny_config(tmp_path / "straight", checkpoint_every=2))
    AcceleratorState._reset_state(reset_partial_state=True)

    original = Trainer._train_epoch

    def interrupted(self, module, optimizer, loader, epoch, progress):
        if epoch == 3:
            raise KeyboardInterrupt
        return original(self, module, optimizer, loader, epoch, progress)

    monkeypatch.setattr(Trainer, "_train_epoch", interrupted)
    config = tiny_config(tmp_path / "resumed", checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train_from_config(config)
    assert len(_comparable_log(tmp_path / "resumed")) == 3  # epoch 3 was logged after the last checkpoint
    monkeypatch.setattr(Trainer, "_train_epoch", original)
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = train_from_config(config, resume=True)

    weights, resumed_weights = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert weights.keys() == resumed_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], resumed_weights[name], rtol=1e-4, atol=1e-6)
    _assert_same_run(straight, resumed)


_KILL_AT_BATCH = """
import os, signal, sys
from perturbedvae.cli import main
from perturbedvae.train.datamodule import PerturbationDataModule

collate, seen = PerturbationDataModule.collate, []
def killing_collate(self, indices):
    seen.append(1)
    if len(seen) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as when a node dies
    return collate(self, indices)
PerturbationDataModule.collate = killing_collate
sys.exit(main(["train", "--config", sys.argv[2]]))
"""


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path: Path, datamodule) -> None:
    straight = train_from_config(tiny_config(tmp_path / "straight", checkpoint_every=2))
    AcceleratorState._reset_state(reset_partial_state=True)
    config = tiny_config(tmp_path / "killed", checkpoint_every=2)
    config.save(tmp_path / "killed.yaml")
    (tmp_path / "kill.py").write_text(_KILL_AT_BATCH)
    per_epoch = -(-len(datamodule.train_cells) // config.train.batch_size)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(tmp_path / "kill.py"), str(2 * per_epoch + per_epoch // 2), str(tmp_path / "killed.yaml")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    killed = tmp_path / "killed"
    assert len(_comparable_log(killed)) == 2 and not (killed / "model").exists()
    partial = killed / "checkpoints" / ".epoch_0004.partial"  # as left by a process killed while saving
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")

    resumed = train_from_config(config, resume=True)
    _assert_same_run(straight, resumed)


def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path: Path) -> None:
    run_dir = train_from_config(tiny_config(tmp_path / "run", epochs=2, checkpoint_every=1))
    AcceleratorState._reset_state(reset_partial_state=True)
    latest = run_dir / "checkpoints" / "epoch_0002"
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt.*previous checkpoint"):
        train_from_config(tiny_config(run_dir, epochs=3, checkpoint_every=1), resume=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    (latest / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json is unreadable"):
        train_from_config(tiny_config(run_dir, epochs=3, checkpoint_every=1), resume=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    (latest / "manifest.json").unlink()  # as in checkpoints written before manifests: unverified, then refused on load
    with pytest.warns(UserWarning, match="cannot be verified"), pytest.raises(CheckpointError, match="could not be loaded"):
        train_from_config(tiny_config(run_dir, epochs=3, checkpoint_every=1), resume=True)


def test_resume_without_checkpoint_is_refused(datamodule, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint_every"):
        trainer_for(tiny_config(tmp_path), datamodule, tmp_path).fit(resume=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_fsdp_without_a_gpu_is_refused_with_the_cpu_alternative(monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="cpu_2proc.yaml"):
        make_accelerator(TrainConfig())


def test_train_compile_asks_accelerate_for_inductor_and_otherwise_leaves_the_launchers_choice(monkeypatch) -> None:
    from accelerate.utils import DynamoBackend

    assert make_accelerator(TrainConfig(compile=True)).state.dynamo_plugin.backend == DynamoBackend.INDUCTOR
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")  # what `accelerate launch --dynamo_backend eager` sets
    assert make_accelerator(TrainConfig()).state.dynamo_plugin.backend == DynamoBackend.EAGER


def test_cpu_threads_are_the_idle_usable_cores_shared_among_local_processes() -> None:
    assert thread_share(usable_cores=16, load_average=0.2, local_processes=1) == 16
    assert thread_share(usable_cores=16, load_average=4.4, local_processes=2) == 6
    assert thread_share(usable_cores=2, load_average=5.7, local_processes=1) == 1  # other jobs hold every core
    assert thread_share(usable_cores=2, load_average=0.0, local_processes=4) == 1


def test_the_fused_optimizer_makes_the_same_updates_as_the_loop() -> None:
    torch.manual_seed(0)
    fused_net = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    loop_net = copy.deepcopy(fused_net)
    settings = TrainConfig(lr=3e-3, weight_decay=0.01)
    fused = make_optimizer(list(fused_net.parameters()), settings)
    loop = torch.optim.AdamW(loop_net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    assert fused.defaults["fused"]
    for _ in range(5):
        x = torch.randn(32, 20)
        for net, optimizer in ((fused_net, fused), (loop_net, loop)):
            net(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for fused_weight, loop_weight in zip(fused_net.parameters(), loop_net.parameters()):
        torch.testing.assert_close(fused_weight, loop_weight, rtol=1e-5, atol=1e-6)
