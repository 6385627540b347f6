"""The per-cell split: predict perturbations that trained, on cells of them that never did.

discrepancy-VAE's "single cells held out" protocol: a seeded `test_fraction` of every perturbed condition's
cells is held out (`hold_out_cells`, drawn per condition name, so the draw of one condition does not depend
on the others); the head trains on the rest of every condition and on all control cells. Each condition is
then predicted from control cells and scored against the mean of its held-out cells, relative to the
control mean (the cells predictions start from, so a no-change prediction has no change at all). Beside
it: `training_cells_mean`, each condition's mean over its training cells (what a model that memorised the
seen perturbation would say; the target any model of seen perturbations approaches), and `no_change`.

    <out>/config.yaml, cell_split.json, log.jsonl, model/, metrics.json, metrics.csv, predictions.csv
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from perturbedvae.api.fitting import train_head
from perturbedvae.checks import check_number
from perturbedvae.data.conditions import CONTROL
from perturbedvae.data.de import compute_de_genes
from perturbedvae.data.loading import PerturbationData
from perturbedvae.errors import ConfigError
from perturbedvae.evaluate.evaluator import Evaluator, evaluate_named, write_metrics
from perturbedvae.predictions import Predictions
from perturbedvae.train.cell_holdout import check_cell_task_config, datamodule_without_cells
from perturbedvae.train.config import load_config
from perturbedvae.train.datamodule import dense_rows, hold_out_cells
from perturbedvae.train.predict import predict_from_controls
from perturbedvae.train.runs import MODEL_NAME, RunLayout, _prepare_run_dir, load_data
from perturbedvae.train.trainer import make_accelerator

SPLIT_FILE = "cell_split.json"
PREDICTIONS_FILE = "predictions.csv"
SUBGROUP = "held_out_cells"
DEFAULT_TEST_FRACTION = 0.2


def held_out_test_cells(data: PerturbationData, test_fraction: float, seed: int) -> np.ndarray:
    """Row numbers of the test cells: a seeded `test_fraction` of every perturbed condition's cells (one at least stays)."""
    check_number("split.params.test_fraction of the cells scheme", test_fraction, low=0, high=1, low_open=True, high_open=True)
    return hold_out_cells(data, [name for name in data.condition_names if name != CONTROL], float(test_fraction), seed)[1]


def run_cell_split(config_path: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Train without the test cells, predict every condition, score on the test cells; returns the run directory."""
    config = load_config(config_path, overrides)
    if config.split.scheme != "cells":
        raise ConfigError(f"perturbedvae cells needs split.scheme cells, got {config.split.scheme!r}")
    unknown = sorted(set(config.split.params) - {"test_fraction"})
    if unknown:
        raise ConfigError(f"split.params of the cells scheme: test_fraction only; unknown: {', '.join(unknown)}")
    check_cell_task_config(config, "per-cell")
    if config.data.backed:
        raise ConfigError("the per-cell split scores a copy of the test cells in memory; set data.backed false")
    layout = RunLayout(Path(config.output.run_dir))
    accelerator = make_accelerator(config.train)
    _prepare_run_dir(layout, config, resume=False)
    data = load_data(config.data)
    fraction = config.split.params.get("test_fraction", DEFAULT_TEST_FRACTION)
    test_cells = held_out_test_cells(data, fraction, config.split.seed)
    config.save(layout.config)
    (layout.root / SPLIT_FILE).write_text(json.dumps({"test_fraction": fraction, "seed": config.split.seed,
                                                      "test_cells": data.adata.obs_names[test_cells].tolist()}, indent=1) + "\n")
    datamodule = datamodule_without_cells(config, data, test_cells, "cells")
    module = train_head(config, datamodule, layout, accelerator)
    conditions = [name for name in data.condition_names if name != CONTROL]
    predictions = predict_from_controls(module, datamodule, conditions,
                                        datamodule.control_cells(config.train.n_control_cells, config.train.seed))
    predictions.means.to_csv(layout.root / PREDICTIONS_FILE)
    summary, tidy = score_cells(data, test_cells, predictions, config.data.de_method, config.data.n_de_genes)
    write_metrics(summary, tidy, layout.root)
    return layout.root


def score_cells(data: PerturbationData, test_cells: np.ndarray, predictions: Predictions | None,
                de_method: str = "t-test", n_de_genes: int = 20) -> tuple[dict, pd.DataFrame]:
    """Metrics on the test cells (beside every control cell) of the model, when given, and of both baselines.

    The baselines read training cells only.
    """
    scored = np.union1d(test_cells, data.cell_indices(CONTROL))
    test = PerturbationData(data.adata[scored].copy(), data.syntax, data.condition_key, data.is_counts,
                            dict(data.raw_spelling), data.source)
    conditions = [name for name in test.condition_names if name != CONTROL]
    train_cells = np.setdiff1d(np.arange(data.adata.n_obs), test_cells)
    expression, labels = data.expression, data.conditions[train_cells]

    def training_mean(name: str) -> np.ndarray:
        return dense_rows(expression, train_cells[labels == name]).mean(axis=0, dtype=np.float64)

    memorised = pd.DataFrame(np.vstack([training_mean(name) for name in conditions]), index=conditions, columns=data.genes)
    control = pd.DataFrame(np.tile(training_mean(CONTROL), (len(conditions), 1)), index=conditions, columns=data.genes)
    named = {"training_cells_mean": Predictions(means=memorised), "no_change": Predictions(means=control)}
    if predictions is not None:
        named = {MODEL_NAME: predictions, **named}
    evaluator = Evaluator(test, compute_de_genes(test, method=de_method, n_top=n_de_genes), {SUBGROUP: conditions})
    return evaluate_named(evaluator, named)
