"""Perturbation latent: per-gene effect vectors, their sparse masks, and how a cell's genes combine.

Each perturbation gene g has an effect e_g ∈ R^K and mask logits l_g ∈ R^K. They come either from a
free table (one row per vocabulary gene) or, when per-gene features are given, from an MLP of the
features, which is what lets a gene never perturbed in training receive an effect. A cell's shift is
s = Σ_g p_g · (m_g ⊙ e_g) over its multi-hot row p, followed by the optional pairwise interaction and
latent causal layer of `causal.py`.

Masks are drawn once per forward pass and shared by the cells of the batch (they are global variables
of a gene, not of a cell). Only genes present in the batch are evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from perturbedvae.errors import ConfigError
from perturbedvae.model.causal import LatentCausalLayer, PairwiseInteraction
from perturbedvae.model.config import PerturbedVAEConfig
from perturbedvae.model.layers import mlp
from perturbedvae.model.masks import make_mask

INITIAL_KEEP_PROBABILITY = 0.9
"""Masks start mostly open: effects are learned first and the sparsity prior then prunes the latent
dimensions they do not need. Starting undecided (0.5) makes the early mask draws so noisy that the
decoder learns to ignore z_p and the prior switches whole genes off (seen on synthetic data)."""

_LOGIT_INIT_STD = 0.01


@dataclass
class PerturbationOutput:
    """The perturbation latent of a batch.

    Attributes:
        z_p: [B, K] latent shift added to z_inv (after interaction and causal mixing).
        shift: [B, K] Σ_g p_g (m_g ⊙ e_g), the additive part before interaction and mixing.
        gene_index: [A] vocabulary indices of the genes present in the batch.
        masks: [A, K] masks used for those genes (relaxed samples in training, deterministic otherwise).
        sparsity: scalar KL(keep-probability || prior) of the masks of the genes in the batch, divided
            by the batch size. Masks are global variables, so the ELBO charges their KL once, not once
            per cell; dividing by B puts it on the per-cell scale of the reconstruction, as if the
            batch were the whole data set (raise `sparsity_weight` for sparser masks).
    """

    z_p: torch.Tensor
    shift: torch.Tensor
    gene_index: torch.Tensor
    masks: torch.Tensor
    sparsity: torch.Tensor


class PerturbationEffects(nn.Module):
    """Maps multi-hot perturbation rows [B, P] to latent shifts [B, K]."""

    def __init__(self, config: PerturbedVAEConfig, gene_features: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.mask = make_mask(config.mask_kind, config.mask_temperature)
        initial_logit = self.mask.logits_for(INITIAL_KEEP_PROBABILITY)
        n_latent = config.n_latent
        if config.gene_feature_dim is None:
            if gene_features is not None:
                raise ConfigError("gene_features were given but gene_feature_dim is None; set gene_feature_dim")
            self.effect_table = nn.Parameter(torch.randn(config.n_perturbations, n_latent) * config.effect_init_std)
            self.logit_table = nn.Parameter(
                initial_logit + torch.randn(config.n_perturbations, n_latent) * _LOGIT_INIT_STD
            )
        else:
            self.register_buffer("gene_features", _checked_features(config, gene_features), persistent=False)
            self.feature_network = nn.Sequential(
                nn.LayerNorm(config.gene_feature_dim),
                mlp(config.gene_feature_dim, config.n_hidden, 1, 0.0),
                nn.Linear(config.n_hidden, 2 * n_latent),
            )
            with torch.no_grad():
                self.feature_network[-1].bias[n_latent:] = initial_logit
        self.interaction = PairwiseInteraction(n_latent) if config.pairwise_interaction else None
        self.causal = LatentCausalLayer(n_latent) if config.causal_layer else None

    @property
    def uses_features(self) -> bool:
        return self.config.gene_feature_dim is not None

    def set_gene_features(self, gene_features: torch.Tensor) -> None:
        """Replace the feature matrix (e.g. a vocabulary extended with new genes); needs feature mode."""
        if not self.uses_features:
            raise ConfigError("this head has no gene-feature network (gene_feature_dim is None)")
        config = PerturbedVAEConfig.from_dict({**self.config.to_dict(), "n_perturbations": gene_features.shape[0]})
        self.gene_features = _checked_features(config, gene_features).to(self.gene_features.device)
        self.config.n_perturbations = config.n_perturbations

    def effects_and_logits(self, gene_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(effects, mask logits), each [A, K], for the given vocabulary indices (all genes if None)."""
        rows = slice(None) if gene_index is None else gene_index
        if not self.uses_features:
            return self.effect_table[rows], self.logit_table[rows]
        effects, logits = self.feature_network(self.gene_features[rows]).chunk(2, dim=-1)
        return effects, logits

    def forward(self, perturbations: torch.Tensor, deterministic: bool) -> PerturbationOutput:
        gene_index = perturbations.ne(0).any(dim=0).nonzero().squeeze(1)
        weights = perturbations[:, gene_index]
        effects, logits = self.effects_and_logits(gene_index)
        if deterministic:
            masks = self.mask.deterministic(logits, self.config.eval_mask)
        else:
            masks = self.mask.sample(logits)
        masked_effects = masks * effects
        shift = weights @ masked_effects
        z_p = shift
        if self.interaction is not None:
            z_p = z_p + self.interaction(weights, masked_effects)
        if self.causal is not None:
            z_p = self.causal(z_p)
        sparsity = self.mask.kl_to_prior(logits.float(), self.config.mask_prior_prob).sum() / perturbations.shape[0]
        return PerturbationOutput(z_p=z_p, shift=shift, gene_index=gene_index, masks=masks, sparsity=sparsity)

    def keep_probabilities(self) -> torch.Tensor:
        """[P, K] probability that each mask entry is non-zero."""
        return self.mask.keep_probability(self.effects_and_logits()[1])

    def effect_vectors(self) -> torch.Tensor:
        """[P, K] single-gene effects as used at evaluation: deterministic mask ⊙ effect (before mixing)."""
        effects, logits = self.effects_and_logits()
        return self.mask.deterministic(logits, self.config.eval_mask) * effects

    def dag_penalty(self) -> torch.Tensor:
        """L1 norm of the causal adjacency (0 without a causal layer)."""
        if self.causal is None:
            return next(self.parameters()).new_zeros(())
        return self.causal.l1_penalty()


def _checked_features(config: PerturbedVAEConfig, gene_features: torch.Tensor | None) -> torch.Tensor:
    expected = (config.n_perturbations, config.gene_feature_dim)
    if gene_features is None:
        raise ConfigError(
            f"gene_feature_dim={config.gene_feature_dim} needs gene_features of shape {expected}; "
            "pass them or set gene_feature_dim to None"
        )
    if tuple(gene_features.shape) != expected:
        raise ConfigError(
            f"gene_features have shape {tuple(gene_features.shape)}, expected {expected} "
            "(n_perturbations, gene_feature_dim)"
        )
    if not torch.isfinite(gene_features).all():
        raise ConfigError("gene_features contain NaN or infinite values; fill or drop those genes")
    return gene_features.detach().float()
