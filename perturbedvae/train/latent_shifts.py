"""Fitting a `ShiftVAE` on training cells and reading each measured single's latent shift off it.

The start of `model.initial_effects: latent_shifts` (see `perturbedvae.model.shift_vae`). The VAE is a
throwaway: it runs before the head's first step, on its own seeded random stream (the head's training
draws stay as they were), and only the shifts are kept.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from perturbedvae.data.conditions import CONTROL
from perturbedvae.errors import ConfigError, DataError
from perturbedvae.model.config import PerturbedVAEConfig
from perturbedvae.model.shift_vae import ShiftVAE, whitened_shifts
from perturbedvae.train.datamodule import PerturbationDataModule

SHIFT_VAE_STEPS = 2_000
"""Optimizer steps; on the 60-perturbation simulator (3,400 training cells) this is ~150 passes over them."""
SHIFT_VAE_BATCH = 256
SHIFT_VAE_LR = 3e-3
SHIFT_VAE_HIDDEN = 128
KL_WARMUP_STEPS = 200
"""The KL weight rises linearly to 1 over these steps, so early steps place cells before the prior pulls them in."""


def latent_shift_effects(datamodule: PerturbationDataModule, cells: np.ndarray, targets: torch.Tensor, config: PerturbedVAEConfig,
                         seed: int) -> torch.Tensor:
    """[P, n_latent] the whitened latent shift of each vocabulary gene's single from control (0 where it has no cells).

    Args:
        datamodule: The run's data; its representation h is the VAE's input (as it is the head's).
        cells: The training cells to fit on (`initialization_cells`); held-out conditions must not be among them.
        targets: [cells, genes] their training targets (counts for nb), as `initialize_head` has read them.
        config: The head's config (latent width, likelihood).
        seed: Seeds the VAE's initial weights and batches.

    Raises:
        ConfigError: for an encoder that runs inside the training step (no h before training).
        DataError: without at least two control cells among `cells` (their spread sets the whitening).
    """
    inputs = datamodule.control_inputs(cells)
    if "h" not in inputs:
        raise ConfigError("model.initial_effects: latent_shifts needs embeddings computed before training (PCA, a frozen "
                          "encoder's cached embeddings); this encoder runs inside the training step")
    conditions = datamodule.data.conditions[cells]
    is_control = torch.from_numpy(conditions == CONTROL)
    if int(is_control.sum()) < 2:
        raise DataError("model.initial_effects: latent_shifts needs at least two training control cells")
    h = inputs["h"].float()
    x = targets.float()
    library_size = inputs.get("library_size") if config.likelihood == "nb" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = ShiftVAE(config.n_input, config.n_genes, config.n_latent, SHIFT_VAE_HIDDEN, config.likelihood)
        vae.likelihood_head.initialize_from_data(x)
        optimizer = torch.optim.Adam(vae.parameters(), lr=SHIFT_VAE_LR)
        for step in tqdm(range(SHIFT_VAE_STEPS), desc="latent shifts (initial effects)", leave=False, disable=None):
            batch = torch.randint(len(cells), (min(SHIFT_VAE_BATCH, len(cells)),))
            loss = vae.loss(h[batch], x[batch], None if library_size is None else library_size[batch].float(),
                            kl_weight=min(1.0, step / KL_WARMUP_STEPS))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        latent = vae.posterior(h)[0]
    single_of_gene = {gene: index for index, gene in enumerate(datamodule.perturbation_genes)}
    group = torch.tensor([single_of_gene.get(condition, -1) for condition in conditions])
    return whitened_shifts(latent, is_control, group, len(datamodule.perturbation_genes))
