"""What a trained head learned, read from the model class: per-cell latents, masks, effects, gene programs.

These reach into the head (its encoder, effect module and decoder), so they live beside the model class
that owns the head, and reports and figures (`perturbedvae compare`) only call the methods of
`PerturbedVAE` that wrap them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from perturbedvae.errors import ConditionError
from perturbedvae.train.datamodule import is_predictable, multi_hot
from perturbedvae.train.representation import ENCODER_INPUTS_KEY, head_of

if TYPE_CHECKING:
    from perturbedvae.api.model import TrainedState
    from perturbedvae.model.module import PerturbedVAEModule

ACTIVE_MASK_PROBABILITY = 0.5
"""A latent dimension is active when some perturbation's mask keeps it with at least this probability."""


@dataclass
class LatentViews:
    """What a trained head learned, in the arrays the figures of a report take.

    Attributes:
        masks: [perturbation genes, latent dims] keep-probabilities of the masks.
        effects: [perturbation genes, latent dims] each gene's masked effect.
        programs: [active dims, genes] each active dimension's gene program (`gene_programs`).
        program_notes: Per active dimension, the perturbations that move it ("moved by A (+0.52), B (-0.31)").
        invariant: [cells, latent dims] posterior means of z_inv of a seeded sample of cells.
        shifted: The same cells' latents after adding their condition's perturbation shift z_p.
        conditions: The condition of each of those cells.
    """

    masks: pd.DataFrame
    effects: pd.DataFrame
    programs: pd.DataFrame
    program_notes: dict[int, str]
    invariant: np.ndarray
    shifted: np.ndarray
    conditions: np.ndarray

    def program_table(self, n_genes: int) -> pd.DataFrame:
        """Per active dimension: the perturbations moving it, its `n_genes // 2` top up and down genes."""
        rows = []
        for k, row in self.programs.iterrows():
            up = row.sort_values(ascending=False).index[: n_genes // 2]
            down = row.sort_values().index[: n_genes // 2]
            rows.append({"latent dim": k, "perturbations (effect)": self.program_notes[k].removeprefix("moved by ") or "–",
                         "top up genes": ", ".join(g for g in up if row[g] > 0) or "–",
                         "top down genes": ", ".join(g for g in down if row[g] < 0) or "–"})
        return pd.DataFrame(rows)


@contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, latent means) for the block, then the module's previous mode."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _head(state: TrainedState) -> PerturbedVAEModule:
    return head_of(state.predictor)


def n_latent(state: TrainedState) -> int:
    return _head(state).config.n_latent


def posterior_means(state: TrainedState, cells: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Posterior means of z_inv of data rows `cells` (the head's encoder on their representation) and their
    library sizes (None for Gaussian data), on the head's device. Call in eval mode."""
    head = _head(state)
    device = next(head.parameters()).device
    inputs = state.datamodule.control_inputs(cells)
    h = state.predictor.embed_cells(inputs[ENCODER_INPUTS_KEY]) if ENCODER_INPUTS_KEY in inputs else inputs["h"]
    library = inputs.get("library_size")
    return head.inference(h.float().to(device)).qz_mean, None if library is None else library.to(device)


def latent_representation(state: TrainedState, cells: np.ndarray, shifted: bool = False) -> np.ndarray:
    """[len(cells), n_latent] posterior means of z_inv; with `shifted`, plus each cell's own condition's z_p."""
    with evaluating(state.predictor):
        z, _ = posterior_means(state, cells)
        if shifted:
            z = z + _perturbation_shifts(state, cells, z.device)
    return z.cpu().numpy()


def _perturbation_shifts(state: TrainedState, cells: np.ndarray, device: torch.device) -> torch.Tensor:
    """z_p (evaluation masks) of each cell's condition; every condition must be in the head's vocabulary."""
    genes = state.datamodule.perturbation_genes
    conditions = state.datamodule.data.conditions[cells]
    unknown = sorted({name for name in conditions if not is_predictable(name, genes)})
    if unknown:
        raise ConditionError(f"cells of {', '.join(unknown[:5])} have a gene outside the head's perturbation vocabulary, "
                             "so the head has no shift for them; pass cells of predictable conditions (model.can_predict)")
    perturbations = torch.from_numpy(multi_hot(list(conditions), genes)).to(device)
    return _head(state).perturbation_effect(perturbations, deterministic=True).z_p


def mask_probabilities(state: TrainedState) -> pd.DataFrame:
    """[perturbation genes, latent dims] the masks' keep-probabilities (before causal mixing)."""
    with evaluating(state.predictor):
        return pd.DataFrame(_head(state).mask_probabilities().cpu().numpy(), index=state.datamodule.perturbation_genes)


def effect_vectors(state: TrainedState) -> pd.DataFrame:
    """[perturbation genes, latent dims] each gene's masked effect with the evaluation mask."""
    with evaluating(state.predictor):
        return pd.DataFrame(_head(state).effect_vectors().cpu().numpy(), index=state.datamodule.perturbation_genes)


def gene_programs(state: TrainedState, dims: Sequence[int]) -> pd.DataFrame:
    """[dims, genes] the change in decoded expression that one unit (one prior sd) along each dimension makes.

    Mechanism design: the decoded change of a unit response of that latent node (a row of its gene
    programs through the saturation). Otherwise: the mean change of the decoded log-normalized expression
    of the model's control cells when their posterior means move one unit along the dimension.
    """
    head = _head(state)
    genes = state.datamodule.data.genes
    with evaluating(state.predictor):
        z, library = posterior_means(state, state.controls)
        base = head.generative(z, library).log_normalized().double().mean(dim=0)
        rows = []
        for k in dims:
            if head.uses_mechanisms:
                unit = torch.zeros(1, head.config.n_latent, device=z.device)
                unit[0, k] = 1.0
                rows.append(head.effects.decode(unit)[0].double().cpu().numpy())
                continue
            shift = torch.zeros_like(z)
            shift[:, k] = 1.0
            rows.append((head.generative(z + shift, library).log_normalized().double().mean(dim=0) - base).cpu().numpy())
    return pd.DataFrame(np.vstack(rows) if rows else np.zeros((0, len(genes))), index=list(dims), columns=genes)


def latent_views(state: TrainedState, n_cells: int, max_programs: int, seed: int) -> LatentViews:
    """Masks, effects, the programs of the strongest active dimensions and the latents of a seeded cell sample.

    Active dimensions (kept by some mask with probability >= ACTIVE_MASK_PROBABILITY) are ordered by the
    summed absolute effect on them, at most `max_programs`. Cells: `n_cells` drawn with `seed` among the
    cells whose condition the head can predict.
    """
    masks, effects = mask_probabilities(state), effect_vectors(state)
    active = [k for k in masks.columns if masks[k].max() >= ACTIVE_MASK_PROBABILITY]
    active = sorted(active, key=lambda k: -effects[k].abs().sum())[:max_programs]
    programs = gene_programs(state, active)
    notes = {k: _movers(masks[k], effects[k]) for k in active}
    data = state.datamodule.data
    by_condition = np.array([is_predictable(name, state.datamodule.perturbation_genes) for name in data.condition_names])
    candidates = np.flatnonzero(by_condition[state.datamodule.condition_codes])
    cells = np.sort(np.random.default_rng(seed).choice(candidates, min(n_cells, len(candidates)), replace=False))
    with evaluating(state.predictor):
        invariant, _ = posterior_means(state, cells)
        shifted = invariant + _perturbation_shifts(state, cells, invariant.device)
    return LatentViews(masks, effects, programs, notes, invariant.cpu().numpy(), shifted.cpu().numpy(), data.conditions[cells])


def _movers(probabilities: pd.Series, effects: pd.Series, shown: int = 3) -> str:
    on = probabilities[probabilities >= ACTIVE_MASK_PROBABILITY].index
    ordered = effects[on].abs().sort_values(ascending=False).index
    names = [f"{gene} ({effects[gene]:+.2f})" for gene in ordered[:shown]]
    more = f" +{len(ordered) - shown} more" if len(ordered) > shown else ""
    return "moved by " + ", ".join(names) + more if names else ""
