"""Counterfactual predictions: what control cells would look like under a perturbation.

The head never sees a held-out condition, so its prediction for one starts from real control cells:
each control cell's representation (computed by the module's encoder first when the encoder runs in
the loop) is encoded, the condition's multi-hot perturbation is applied in
latent space and the result decoded. The condition's predicted profile is the mean over those cells,
the quantity every metric of the field compares with the observed mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch

from perturbedvae.predictions import Predictions
from perturbedvae.train.datamodule import PerturbationDataModule, multi_hot
from perturbedvae.train.representation import ENCODER_INPUTS_KEY

_MAX_ROWS_PER_CALL = 8192


@torch.no_grad()
def predict_from_controls(
    module: torch.nn.Module,
    datamodule: PerturbationDataModule,
    conditions: Sequence[str],
    control_cells: np.ndarray,
    per_cell: bool = False,
    sample_seed: int | None = None,
) -> Predictions:
    """Predict canonical `conditions` (all genes in the vocabulary) from the given control cells.

    The module runs in eval mode (deterministic masks, no dropout) and is put back in its previous mode.
    With `sample_seed`, cells are draws from the model (seeded, reproducible) rather than expectations,
    so per-cell outputs carry the model's cell-to-cell variation for distribution metrics and cell-eval.
    For a representation computed in the loop, `module` is the `EncoderWithHead` that trained with it.
    """
    genes = datamodule.data.genes
    inputs = datamodule.control_inputs(control_cells)
    perturbations = torch.from_numpy(multi_hot(conditions, datamodule.perturbation_genes))
    was_training = module.training
    module.eval()
    try:
        device = next(module.parameters()).device
        if ENCODER_INPUTS_KEY in inputs:
            inputs["h"] = module.embed_cells(inputs.pop(ENCODER_INPUTS_KEY))
        inputs = {key: value.to(device) for key, value in inputs.items()}
        means, cells = [], []
        with torch.random.fork_rng(devices=[]):
            if sample_seed is not None:
                torch.manual_seed(sample_seed)
            for row in perturbations.to(device):
                predicted = _predict_cells(module, inputs, row, sample_seed is not None)
                means.append((predicted.sum(dim=0, dtype=torch.float64) / len(predicted)).cpu().numpy())
                if per_cell:
                    cells.append(predicted.float().cpu().numpy())
    finally:
        module.train(was_training)
    frame = pd.DataFrame(np.stack(means) if means else np.zeros((0, len(genes))), index=list(conditions), columns=genes)
    return Predictions(means=frame, cells=_cells_adata(cells, conditions, genes) if per_cell else None)


def _predict_cells(module: torch.nn.Module, inputs: dict[str, torch.Tensor], perturbation: torch.Tensor, sample: bool) -> torch.Tensor:
    n_cells = inputs["h"].shape[0]
    outputs = []
    for start in range(0, n_cells, _MAX_ROWS_PER_CALL):
        chunk = {key: value[start : start + _MAX_ROWS_PER_CALL] for key, value in inputs.items()}
        rows = perturbation.expand(chunk["h"].shape[0], -1)
        outputs.append(module.predict(chunk["h"], rows, library_size=chunk.get("library_size"), sample=sample,
                                      covariates=chunk.get("covariates")))
    return torch.cat(outputs)


def _cells_adata(cells: list[np.ndarray], conditions: Sequence[str], genes: list[str]) -> ad.AnnData:
    matrix = np.concatenate(cells) if cells else np.zeros((0, len(genes)), dtype=np.float32)
    labels = np.repeat(list(conditions), [len(block) for block in cells])
    obs = pd.DataFrame({"condition": pd.Categorical(labels)}, index=[f"pred{index}" for index in range(len(labels))])
    return ad.AnnData(matrix, obs=obs, var=pd.DataFrame(index=genes))
