"""Starting a head from the data it trains on, and finishing it with what was measured.

Before the first step, decoder output biases start at the training targets' per-gene scale (the head's
first steps then go into the perturbation path, not into learning means), `model.standardize_inputs`
takes the training cells' per-dimension scale of h, and the "mechanism"
composition receives the measured single-gene changes it anchors its predictions on (and, with
`model.initial_effects: latent_shifts`, the singles' shifts in a VAE's latent to start from), from training
cells only (held-out cells of `train.selection: held_out_cells` excluded: they select the epoch).

After training (`finalize_head`), the anchors and the control calibration are measured again on every
cell of the training conditions, held-out cells included: those cells belong to training conditions, and
on Norman (100 cells per condition) leaving 10% out moved each single's mean by 0.0002–0.0004 mse_de,
enough to cost a double a third of the additive baseline's error. No cell of a held-out condition is used.
"""

from __future__ import annotations

import numpy as np
import torch

from perturbedvae.data.conditions import CONTROL
from perturbedvae.errors import ConfigError
from perturbedvae.model import PerturbedVAEModule
from perturbedvae.train.datamodule import PerturbationDataModule, dense_rows
from perturbedvae.train.latent_shifts import latent_shift_effects

MAX_INITIALIZATION_CELLS = 20_000
"""Training cells (a seeded sample) whose targets set the decoder biases; means converge long before."""
_COUNT_PSEUDO = 0.1
"""Counts added (per mean library) before taking log ratios of normalized means on count data."""


def initialization_cells(datamodule: PerturbationDataModule, seed: int) -> np.ndarray:
    """The training cells (at most `MAX_INITIALIZATION_CELLS`, a seeded sample) that starting values are read from."""
    cells = datamodule.train_cells
    if len(cells) > MAX_INITIALIZATION_CELLS:
        cells = np.sort(np.random.default_rng(seed).choice(cells, MAX_INITIALIZATION_CELLS, replace=False))
    return cells


def initialize_head(module: PerturbedVAEModule, datamodule: PerturbationDataModule, seed: int) -> None:
    """Set the decoder biases from training targets and, for the mechanism design, the single priors."""
    cells = initialization_cells(datamodule, seed)
    targets = torch.from_numpy(dense_rows(datamodule.target, cells))
    module.initialize_from_data(targets)
    if module.uses_mechanisms:
        changes, measured = single_changes(datamodule, module.config.likelihood)
        latent = module.config.initial_effects == "latent_shifts"
        shifts = latent_shift_effects(datamodule, cells, targets, module.config, seed) if latent else None
        module.set_single_priors(torch.from_numpy(changes), torch.from_numpy(measured), initial_effects=shifts)


def initialize_inputs(module: PerturbedVAEModule, datamodule: PerturbationDataModule, seed: int) -> None:
    """`model.standardize_inputs`: the per-dimension mean and scale of the training cells' h.

    Raises ConfigError for an encoder that runs inside the training step: a fine-tuned or LoRA encoder's
    embeddings change as it trains, so a scale measured before the first step would not hold, and an
    uncached frozen one has no embeddings at hand before the step.
    """
    inputs = datamodule.control_inputs(initialization_cells(datamodule, seed))
    if "h" not in inputs:
        raise ConfigError("model.standardize_inputs needs embeddings computed before training (PCA, a frozen "
                          "encoder's cached embeddings); this encoder runs inside the training step (fine-tuned, LoRA or "
                          "representation.cache_embeddings: false)")
    module.initialize_inputs_from_data(inputs["h"])


def single_changes(datamodule: PerturbationDataModule, likelihood: str, cells: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """([P, genes] change of each vocabulary gene's training single from control, [P] whether it has one).

    On the decoder's scale: the difference of mean log-normalized expression (gaussian), or the log ratio
    of mean normalized counts (nb: the change of the rate logits). `cells` default to the training cells.
    """
    data = datamodule.data
    cells = datamodule.train_cells if cells is None else cells
    conditions = data.conditions[cells]
    control = _condition_mean(datamodule, cells[conditions == CONTROL], likelihood)
    changes = np.zeros((len(datamodule.perturbation_genes), len(data.genes)))
    measured = np.zeros(len(datamodule.perturbation_genes), dtype=bool)
    for index, gene in enumerate(datamodule.perturbation_genes):
        rows = cells[conditions == gene]
        if len(rows):
            changes[index] = _condition_mean(datamodule, rows, likelihood) - control
            measured[index] = True
    return changes.astype(np.float32), measured


def _condition_mean(datamodule: PerturbationDataModule, rows: np.ndarray, likelihood: str) -> np.ndarray:
    """Mean target of `rows` on the decoder's scale (see `single_changes`)."""
    if likelihood == "gaussian":
        return dense_rows(datamodule.data.expression, rows).mean(axis=0)
    counts = dense_rows(datamodule.target, rows)
    library = datamodule.library_size[rows].astype(np.float64)
    rate = counts.sum(axis=0) / library.sum()
    return np.log(rate + _COUNT_PSEUDO / library.mean())


def calibrate_head(module: PerturbedVAEModule, datamodule: PerturbationDataModule, controls: np.ndarray | None = None) -> None:
    """`calibrate_controls` on control cells (default: the training controls; mechanism design, Gaussian)."""
    if controls is None:
        controls = datamodule.train_controls
    inputs = datamodule.control_inputs(controls)
    if "h" not in inputs:  # the encoder runs in the step: its embeddings are not at hand here
        return
    device = next(module.parameters()).device
    module.calibrate_controls(inputs["h"].to(device), torch.from_numpy(dense_rows(datamodule.data.expression, controls)).to(device))


def finalize_head(module: PerturbedVAEModule, datamodule: PerturbationDataModule) -> None:
    """Re-measure the anchors and the control calibration on all cells of the training conditions."""
    if not module.uses_mechanisms:
        return
    cells = np.union1d(datamodule.train_cells, datamodule.held_out_cells)
    changes, measured = single_changes(datamodule, module.config.likelihood, cells)
    device = next(module.parameters()).device
    module.set_single_priors(torch.from_numpy(changes).to(device), torch.from_numpy(measured).to(device), initialize=False)
    calibrate_head(module, datamodule, cells[datamodule.data.conditions[cells] == CONTROL])
