"""The transfer task: predict perturbations in a covariate level where they were never measured.

`run_transfer` trains the head on every cell except the held-out (condition, target level) cells of a
`TransferSplit`, predicts each held-out condition from the target level's own control cells (their z_inv
carries the level, the condition's effect was learned in the other levels; with `model.covariate_inputs`
the encoder and decoder also read each cell's level), and scores the predictions against the held-out
cells relative to the target's controls, beside the baselines: `other_level_shift` (the condition's
mean shift in the other levels added to the target's control mean) and the usual ones fitted on the
target level's training conditions (no_change is the target's control mean there).

Nothing held out is read before scoring: the PCA, the head and the epoch selection see only training
cells (`perturbedvae.train.cell_holdout`), the baseline only the other levels and the target's controls.

    <out>/config.yaml, transfer_split.json, log.jsonl, model/, metrics.json, metrics.csv, predictions.csv
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from perturbedvae.api.fitting import train_head
from perturbedvae.data.conditions import CONTROL
from perturbedvae.data.covariates import TransferSplit, covariate_levels, level_data, other_level_shift, transfer_split
from perturbedvae.data.loading import PerturbationData
from perturbedvae.data.splits import Split
from perturbedvae.errors import ConfigError
from perturbedvae.evaluate.beside_baselines import evaluate_beside_baselines
from perturbedvae.evaluate.evaluator import write_metrics
from perturbedvae.predictions import Predictions
from perturbedvae.train.cell_holdout import check_cell_task_config, datamodule_without_cells
from perturbedvae.train.config import ExperimentConfig, load_config
from perturbedvae.train.datamodule import PerturbationDataModule
from perturbedvae.train.predict import predict_from_controls
from perturbedvae.train.runs import MODEL_NAME, RunLayout, _prepare_run_dir, load_data
from perturbedvae.train.trainer import make_accelerator

TRANSFER_SPLIT_FILE = "transfer_split.json"
PREDICTIONS_FILE = "predictions.csv"
BASELINE_NAME = "other_level_shift"
SUBGROUP = "transfer"


def check_transfer_config(config: ExperimentConfig) -> None:
    """The settings the transfer task needs, each refusal naming the fix."""
    if config.split.scheme != "transfer":
        raise ConfigError(f"perturbedvae transfer needs split.scheme transfer, got {config.split.scheme!r}")
    unknown = sorted(set(config.split.params) - {"target", "test_fraction"})
    if unknown or "target" not in config.split.params:
        raise ConfigError("split.params of the transfer scheme: target (the covariate level to predict in) and optionally "
                          f"test_fraction{'; unknown: ' + ', '.join(unknown) if unknown else ''}")
    if not config.data.covariate_keys:
        raise ConfigError("the transfer scheme needs data.covariate_keys, the obs column(s) of the covariate (e.g. [cell_type])")
    check_cell_task_config(config, "transfer")


def run_transfer(config_path: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Train, predict and score one transfer split (see the module docstring); returns the run directory."""
    config = load_config(config_path, overrides)
    check_transfer_config(config)
    layout = RunLayout(Path(config.output.run_dir))
    accelerator = make_accelerator(config.train)
    _prepare_run_dir(layout, config, resume=False)
    data = load_data(config.data)
    levels = covariate_levels(data, config.data.covariate_keys)
    split = transfer_split(data, config.data.covariate_keys, str(config.split.params["target"]),
                           config.split.params.get("test_fraction", 0.34), config.split.seed)
    config.save(layout.config)
    split.save(layout.root / TRANSFER_SPLIT_FILE)
    datamodule = datamodule_without_cells(config, data, split.held_out_cells(data, levels), "transfer")
    if config.model["covariate_inputs"]:
        datamodule = datamodule.with_covariate_levels(levels)
    module = train_head(config, datamodule, layout, accelerator)
    controls = target_controls(datamodule, levels, split.target, config.train.n_control_cells, config.train.seed)
    predictions = predict_from_controls(module, datamodule, split.test, controls)
    predictions.means.to_csv(layout.root / PREDICTIONS_FILE)
    summary, tidy = score_transfer(data, levels, split, predictions, config.data.de_method, config.data.n_de_genes)
    write_metrics(summary, tidy, layout.root)
    return layout.root


def target_controls(datamodule: PerturbationDataModule, levels: np.ndarray, target: str, n_cells: int, seed: int) -> np.ndarray:
    """A seeded subset (sorted) of at most `n_cells` of the target level's control cells: where predictions start."""
    controls = datamodule.train_controls[levels[datamodule.train_controls] == target]
    if len(controls) > n_cells:
        controls = np.sort(np.random.default_rng(seed).choice(controls, n_cells, replace=False))
    return controls


def score_transfer(data: PerturbationData, levels: np.ndarray, split: TransferSplit, predictions: Predictions | None,
                   de_method: str = "t-test", n_de_genes: int = 20) -> tuple[dict, pd.DataFrame]:
    """Metrics on the target level's held-out cells of the model (when given) and of every baseline."""
    target = level_data(data, levels, split.target)
    level_split = Split(scheme="transfer", seed=split.seed, train=[CONTROL, *split.target_train], val=[], test=split.test,
                        test_subgroups={SUBGROUP: split.test}, val_subgroups={}, data_fingerprint=target.fingerprint)
    shift = pd.DataFrame(other_level_shift(data, levels, split.target, split.test), index=split.test, columns=data.genes)
    named = {BASELINE_NAME: Predictions(means=shift)}
    if predictions is not None:
        named = {MODEL_NAME: predictions, **named}
    return evaluate_beside_baselines(target, level_split, named, de_method, n_de_genes=n_de_genes)
