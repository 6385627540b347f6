"""Building blocks every part of the head uses: the MLP block (encoder, decoder, gene-feature network) and the KL term."""

from __future__ import annotations

import torch
from torch import nn

POSTERIOR_LOG_VARIANCE_RANGE = (-10.0, 10.0)
"""Bounds of a Gaussian posterior's log-variance, so exp() neither underflows to 0 nor overflows."""


def mlp(n_input: int, n_hidden: int, n_layers: int, dropout: float) -> nn.Sequential:
    """`n_layers` blocks of Linear -> LayerNorm -> GELU -> Dropout, ending at width `n_hidden`.

    LayerNorm rather than BatchNorm keeps every cell's output independent of its batch, which matters
    for counterfactual prediction (a control cell's output must not depend on which cells share its
    batch) and for DDP, where BatchNorm statistics would differ per process.
    """
    layers: list[nn.Module] = []
    width = n_input
    for _ in range(n_layers):
        layers += [nn.Linear(width, n_hidden), nn.LayerNorm(n_hidden), nn.GELU(), nn.Dropout(dropout)]
        width = n_hidden
    return nn.Sequential(*layers)


def standard_normal_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean, exp(logvar)) || N(0, 1))."""
    return 0.5 * (mean**2 + torch.exp(logvar) - 1.0 - logvar)
