"""Sparse binary masks with learnable logits: which latent dimensions a perturbation may move.

A mask entry m_gk ∈ {0, 1} says whether gene g's effect touches latent dimension k. Binary variables
have no gradient, so training samples a *relaxed* mask with a reparameterised noise draw:

- Hard concrete (Louizos, Welling & Kingma 2018, "Learning sparse neural networks through L0
  regularization"): a binary-concrete sample stretched to (γ, ζ) = (−0.1, 1.1) and clipped to [0, 1],
  so samples are exactly 0 or exactly 1 with finite probability and continuous in between.
- Gumbel / binary concrete with a straight-through estimator (as in SAMS-VAE): the forward value is
  the hard 0/1 draw, the backward pass uses the gradient of the relaxed sigmoid sample.

Both expose the probability that an entry is non-zero ("keep-probability"). The sparsity penalty is the
KL divergence from Bernoulli(keep-probability) to Bernoulli(prior), which for a small prior is the
L0 penalty plus an entropy term; it is minimal exactly when keep-probability = prior.

Outside training the mask is deterministic (`deterministic`): "threshold" gives 1 where the
keep-probability exceeds 0.5 (a binary mask), "expected" gives the keep-probability itself (the mean
of the Bernoulli, so the effect is its expected value).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from perturbedvae.errors import ConfigError

_UNIFORM_EPS = 1e-6

EVAL_MASK_MODES = ("threshold", "expected")
"""Deterministic masks outside training (`PerturbedVAEConfig.eval_mask`)."""


class RelaxedBernoulliMask(ABC):
    """Maps mask logits to relaxed samples, keep-probabilities, deterministic masks and the prior KL."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    @abstractmethod
    def keep_logit(self, logits: torch.Tensor) -> torch.Tensor:
        """Logit of the probability that each mask entry is non-zero."""

    @abstractmethod
    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """A differentiable mask draw in [0, 1] with the same shape as `logits`."""

    @abstractmethod
    def logits_for(self, keep_probability: float) -> float:
        """The logit value whose keep-probability is `keep_probability` (used to initialise)."""

    def keep_probability(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.keep_logit(logits))

    def deterministic(self, logits: torch.Tensor, mode: str) -> torch.Tensor:
        """The evaluation mask: binary ("threshold") or the keep-probability ("expected")."""
        probability = self.keep_probability(logits)
        if mode == "threshold":
            return (probability > 0.5).to(probability.dtype)
        if mode == "expected":
            return probability
        raise ConfigError(f"unknown eval_mask {mode!r}; use one of {', '.join(EVAL_MASK_MODES)}")

    def kl_to_prior(self, logits: torch.Tensor, prior_probability: float) -> torch.Tensor:
        """Elementwise KL(Bernoulli(keep-probability) || Bernoulli(prior)), computed from logits for stability."""
        keep_logit = self.keep_logit(logits)
        probability = torch.sigmoid(keep_logit)
        log_keep = F.logsigmoid(keep_logit)
        log_drop = F.logsigmoid(-keep_logit)
        return probability * (log_keep - math.log(prior_probability)) + (1.0 - probability) * (
            log_drop - math.log1p(-prior_probability)
        )


def _logistic_noise(like: torch.Tensor) -> torch.Tensor:
    uniform = torch.rand_like(like).clamp(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)
    return torch.log(uniform) - torch.log1p(-uniform)


class HardConcreteMask(RelaxedBernoulliMask):
    """Louizos et al.'s hard concrete gate; the logits are its log α."""

    lower = -0.1  # γ: stretch below 0 so that clipping puts mass exactly on 0
    upper = 1.1  # ζ: stretch above 1 so that clipping puts mass exactly on 1

    @property
    def _offset(self) -> float:
        """β·log(−γ/ζ): P(mask > 0) = sigmoid(log α − β·log(−γ/ζ))."""
        return self.temperature * math.log(-self.lower / self.upper)

    def keep_logit(self, logits: torch.Tensor) -> torch.Tensor:
        return logits - self._offset

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        relaxed = torch.sigmoid((logits + _logistic_noise(logits)) / self.temperature)
        return (relaxed * (self.upper - self.lower) + self.lower).clamp(0.0, 1.0)

    def logits_for(self, keep_probability: float) -> float:
        return math.log(keep_probability) - math.log1p(-keep_probability) + self._offset


class GumbelBernoulliMask(RelaxedBernoulliMask):
    """Binary concrete with a straight-through estimator: exact 0/1 forward, relaxed gradient backward."""

    def keep_logit(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        relaxed = torch.sigmoid((logits + _logistic_noise(logits)) / self.temperature)
        hard = (relaxed > 0.5).to(relaxed.dtype)
        return hard + relaxed - relaxed.detach()

    def logits_for(self, keep_probability: float) -> float:
        return math.log(keep_probability) - math.log1p(-keep_probability)


MASK_FAMILIES: dict[str, type[RelaxedBernoulliMask]] = {
    "hard_concrete": HardConcreteMask,
    "gumbel": GumbelBernoulliMask,
}
"""Mask family per `PerturbedVAEConfig.mask_kind`."""


def make_mask(kind: str, temperature: float) -> RelaxedBernoulliMask:
    """The mask family named by `PerturbedVAEConfig.mask_kind`."""
    if kind not in MASK_FAMILIES:
        raise ConfigError(f"unknown mask_kind {kind!r}; use one of {', '.join(MASK_FAMILIES)}")
    return MASK_FAMILIES[kind](temperature)
