"""Runs that hold out cells rather than whole conditions (the transfer task, the per-cell split).

Both train the head on every condition while a set of cells stays out of everything fitted: the PCA of
the inputs, the training batches and the cells that select the epoch. `datamodule_without_cells` builds
that data module and `perturbedvae.api.fitting.train_head` trains and saves the head into a run directory;
the tasks differ only in which cells they hold out and how they score them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from perturbedvae.data.loading import PerturbationData
from perturbedvae.data.splits import Split
from perturbedvae.errors import ConfigError
from perturbedvae.train.config import ExperimentConfig
from perturbedvae.train.datamodule import PerturbationDataModule, hold_out_cells
from perturbedvae.train.representation import build_representation


def check_cell_task_config(config: ExperimentConfig, task: str) -> None:
    """Settings every held-out-cell task refuses, each naming the fix."""
    if config.model["composition"] != "latent_sum":
        raise ConfigError(f"the {task} task needs model.composition latent_sum (mechanism's anchors re-measure every cell "
                          "of a training condition, held-out cells included)")
    if config.train.selection == "val_conditions":
        raise ConfigError(f"the {task} task has no validation conditions; set train.selection held_out_cells or last")
    if config.gene_features.sources:
        raise ConfigError(f"gene_features are for genes held out of training; the {task} task trains every gene: remove them")


def datamodule_without_cells(config: ExperimentConfig, data: PerturbationData, held_out: np.ndarray, scheme: str) -> PerturbationDataModule:
    """A data module over every condition in which the cells `held_out` neither train, fit the PCA nor select the epoch."""
    split = Split(scheme=scheme, seed=config.split.seed, train=data.condition_names, val=[], test=[], test_subgroups={},
                  val_subgroups={}, data_fingerprint=data.fingerprint)
    fraction = config.train.held_out_fraction if config.train.selection == "held_out_cells" else 0.0
    train_cells, _ = hold_out_cells(data, split.train, fraction, config.train.seed)
    representation = build_representation(config.representation, data, np.setdiff1d(train_cells, held_out))
    datamodule = PerturbationDataModule.build(data, split, representation, config.model["likelihood"],
                                              held_out_fraction=fraction, seed=config.train.seed)
    return replace(datamodule, train_cells=np.setdiff1d(datamodule.train_cells, held_out),
                   held_out_cells=np.setdiff1d(datamodule.held_out_cells, held_out))

