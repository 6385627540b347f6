"""What a trained head learned, in numbers a run records: invariance of z_inv and sparsity of its masks.

Recorded in `run_info.json` under `latent` (and summarised by `perturbedvae benchmark`): the condition
probe and the alignment statistic against its permutation null (`perturbedvae.evaluate.invariance`; the
per-condition statistic when the head aligns per condition, the pooled one otherwise),
on a seeded sample of training cells, and the density of the evaluation masks. The alignment statistic
is also measured on the head as initialised, since a penalty that cannot tell the groups apart at the
start can never act. It measures with the evaluation package on a training datamodule, so it sits above
both (training imports no evaluation).
"""

from __future__ import annotations

import numpy as np

from perturbedvae.api.latents import ACTIVE_MASK_PROBABILITY, evaluating
from perturbedvae.data.conditions import CONTROL
from perturbedvae.evaluate.invariance import alignment_null, condition_probe
from perturbedvae.model import PerturbedVAEModule
from perturbedvae.train.datamodule import PerturbationDataModule

DIAGNOSTIC_CELLS = 1500
"""Training cells (seeded sample) of the diagnostics: the MMD null costs cells² per permutation."""
PROBE_FOLDS = 5


def latent_diagnostics(module: PerturbedVAEModule, datamodule: PerturbationDataModule, seed: int, probe: bool = True) -> dict:
    """{probe_balanced_accuracy, probe_chance, alignment_mmd, alignment_null_95, alignment_p, mask_density}.

    Empty when the representation runs inside the step (its embeddings are not at hand here).
    """
    rng = np.random.default_rng(seed)
    cells = datamodule.train_cells
    if len(cells) > DIAGNOSTIC_CELLS:
        cells = np.sort(rng.choice(cells, DIAGNOSTIC_CELLS, replace=False))
    inputs = datamodule.control_inputs(cells)
    if "h" not in inputs:
        return {}
    with evaluating(module):
        device = next(module.parameters()).device
        z = module.inference(inputs["h"].float().to(device)).qz_mean.cpu().numpy()
        keep = module.mask_probabilities().cpu().numpy()
    conditions = datamodule.data.conditions[cells]
    per_condition = conditions if module.config.alignment == "mmd_per_condition" else None
    null = alignment_null(z, conditions == CONTROL, n_permutations=50, seed=seed, conditions=per_condition)
    result = {"alignment_mmd": null.mmd, "alignment_null_95": null.null_95, "alignment_p": null.p_value,
              "mask_density": float((keep > ACTIVE_MASK_PROBABILITY).mean())}
    if probe and _probe_classes(conditions) >= 2:  # too few cells per condition in the sample: no probe
        found = condition_probe(z, conditions, n_folds=PROBE_FOLDS, seed=seed)
        result.update(probe_balanced_accuracy=found.balanced_accuracy, probe_chance=found.chance)
    return result


def _probe_classes(conditions: np.ndarray) -> int:
    """Conditions with enough sampled cells to be stratified over the probe's folds."""
    _, counts = np.unique(conditions, return_counts=True)
    return int((counts >= PROBE_FOLDS).sum())
