"""The one fitting path of the notebook class, `perturbedvae train` and the held-out-cell tasks.

`fit_head` builds what the trainer is given (a seeded module, its training arguments, the validation
callback `train.selection` asks for) and trains; `train_from_config` wraps it into a run directory
(see `perturbedvae.train.runs`) with the test conditions scored. Both score with the evaluator, so they
sit above training and evaluation.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from perturbedvae.api.diagnostics import latent_diagnostics
from perturbedvae.api.validation import ConditionScorer, make_validator
from perturbedvae.data.splits import Split
from perturbedvae.encoders.lora import save_adapters
from perturbedvae.evaluate import evaluate_named, write_metrics
from perturbedvae.model import PerturbedVAEModule
from perturbedvae.train.config import ExperimentConfig
from perturbedvae.train.datamodule import PerturbationDataModule
from perturbedvae.train.initialization import calibrate_head, finalize_head
from perturbedvae.train.representation import head_of
from perturbedvae.train.runs import (
    MODEL_NAME,
    RunLayout,
    _prepare_run_dir,
    build_datamodule,
    load_data,
    load_or_make_split,
    new_module,
    save_head,
)
from perturbedvae.train.trainer import Trainer, TrainingArguments, TrainingResult, make_accelerator
from perturbedvae.train.unseen_genes import check_test_predictable


@dataclass
class FittedHead:
    """What `fit_head` trained: the module that predicts, the starting control cells and the run's facts.

    `initial` is a copy of the head as initialised (before the first step), for the run's diagnostics.
    """

    result: TrainingResult
    datamodule: PerturbationDataModule
    controls: np.ndarray
    unpredictable_val: list[str]
    initial: PerturbedVAEModule

    @property
    def head(self) -> PerturbedVAEModule:
        return head_of(self.result.module)


def fit_head(config: ExperimentConfig, datamodule: PerturbationDataModule, run_dir: Path, accelerator: Accelerator,
             resume: bool = False) -> FittedHead:
    """Train the head a config describes on a built datamodule (any data, in memory or from a file).

    `run_dir` receives the log and checkpoints. The main process finalizes the head (anchors and control
    calibration on all cells of the training conditions), as predictions need.
    """
    controls = datamodule.control_cells(config.train.n_control_cells, config.train.seed)
    validator, selection, unpredictable_val = make_validator(config, datamodule, datamodule.split, controls)
    module = new_module(config, datamodule)
    initial = copy.deepcopy(head_of(module))
    calibrate = (lambda head: calibrate_head(head, datamodule)) if config.model["composition"] == "mechanism" else None
    arguments = TrainingArguments.for_head(config.train, head_of(module))
    trainer = Trainer(module, arguments, datamodule, run_dir, validator, accelerator, selection, calibrate)
    result = trainer.fit(resume=resume)
    if accelerator.is_main_process:
        finalize_head(head_of(result.module), datamodule)
    return FittedHead(result, datamodule, controls, unpredictable_val, initial)


def train_head(config: ExperimentConfig, datamodule: PerturbationDataModule, layout: RunLayout, accelerator: Accelerator) -> torch.nn.Module:
    """Train as `perturbedvae train` does (`fit_head`: the epoch selected on held-out cells of the training cells when
    configured), save the head, return the module (the held-out-cell tasks, `perturbedvae.train.cell_holdout`)."""
    fitted = fit_head(config, datamodule, layout.root, accelerator)
    save_head(fitted.head, datamodule, layout.model)
    return fitted.result.module


def train_from_config(config: ExperimentConfig, resume: bool = False) -> Path:
    """Train the experiment a config describes, evaluate it on the test conditions, return the run dir.

    Works in one process or under `accelerate launch`; only the main process writes files.

    Raises:
        ConfigError: the run directory already holds a run (pass output.overwrite=true or resume).
        CheckpointError: resume without checkpoints, or with a config that changes more than train.epochs.
    """
    config.data.require_source()  # before the run directory is prepared (and an old run replaced)
    layout = RunLayout(Path(config.output.run_dir))
    accelerator = make_accelerator(config.train)
    if accelerator.is_main_process:
        _prepare_run_dir(layout, config, resume)
    accelerator.wait_for_everyone()
    data = load_data(config.data)
    split = Split.load(layout.split) if resume and layout.split.is_file() else load_or_make_split(config.split, data)
    with accelerator.main_process_first():  # the main process fills the embedding cache, the others read it
        datamodule = build_datamodule(config, data, split, layout.root if resume and layout.representation.is_file() else None)
    check_test_predictable(config, datamodule)
    if accelerator.is_main_process:
        config.save(layout.config)
        split.save(layout.split)
        datamodule.representation.save(layout.root)
    fitted = fit_head(config, datamodule, layout.root, accelerator, resume)
    if accelerator.is_main_process:
        save_head(fitted.head, datamodule, layout.model)
        if datamodule.representation.finetune:
            save_adapters(datamodule.representation.encoder, layout.adapters)
        test_scorer = ConditionScorer(datamodule, split.test, split.test_subgroups, config.data.de_method, config.data.n_de_genes, fitted.controls)
        run_info = {**fitted.result.run_info, "latent": _latent_record(fitted, config.train.seed), "data_fingerprint": data.fingerprint, "n_train_cells": len(datamodule.train_cells),
                    "unpredictable_val_conditions": fitted.unpredictable_val, "unpredictable_test_conditions": test_scorer.skipped,
                    "gene_features": _feature_record(datamodule)}
        if test_scorer.conditions:
            summary, tidy = evaluate_named(test_scorer.evaluator, {MODEL_NAME: test_scorer.predict(fitted.result.module)})
            write_metrics(summary, tidy, layout.root)
        layout.run_info.write_text(json.dumps(run_info, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return layout.root


def _feature_record(datamodule: PerturbationDataModule) -> dict | None:
    """Which source described each perturbation gene, and the width of each block (None without gene features)."""
    features = datamodule.gene_features
    return None if features is None else {"columns": dict(features.columns), "sources_of": features.sources_of}


def _latent_record(fitted: FittedHead, seed: int) -> dict:
    """`latent_diagnostics` of the trained head, and the alignment statistic of the head as initialised."""
    head = fitted.head
    before = latent_diagnostics(fitted.initial.to(next(head.parameters()).device), fitted.datamodule, seed, probe=False)
    return {**latent_diagnostics(head, fitted.datamodule, seed), **{f"initial_{key}": value for key, value in before.items()}}
