"""A VAE without a perturbation path, whose latent shows each perturbation as a shift of its cells.

`model.initial_effects: latent_shifts` of the mechanism composition starts the effect table here. Fitted
to every training cell (controls, singles, combinations) with nothing told about conditions, the VAE has
to place a perturbed cell where its decoder reproduces it, so a perturbation that moves latent mechanisms
moves its cells' posterior means away from the controls'. The controls' own spread is the invariant
state, N(0, I) under the prior, so whitening the shifts by the controls' latent covariance undoes the
VAE's arbitrary linear mixing of it, and varimax (`mechanism.varimax_rotation`) then turns them towards
few nodes per gene. The SVD start of the measured singles (`initial_effects: singles`) works on gene-level
changes instead, where the response bends each latent shift; this decoder learns that bend from every
cell's spread around its condition, which 60 single means cannot show.
"""

from __future__ import annotations

import torch
from torch import nn

from perturbedvae.model.layers import POSTERIOR_LOG_VARIANCE_RANGE, standard_normal_kl
from perturbedvae.model.likelihoods import LIKELIHOOD_HEADS
from perturbedvae.model.rows import group_sums


class ShiftVAE(nn.Module):
    """h -> z (n_latent, Gaussian posterior) -> expression, one hidden GELU layer each way.

    No LayerNorm (unlike the head's `mlp`): it would make the decoder respond to the direction of a
    shifted hidden row more than to its size, bending exactly the shifts this VAE is read for.
    """

    def __init__(self, n_input: int, n_genes: int, n_latent: int, n_hidden: int, likelihood: str) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_input, n_hidden), nn.GELU(), nn.Linear(n_hidden, 2 * n_latent))
        self.decoder = nn.Sequential(nn.Linear(n_latent, n_hidden), nn.GELU())
        self.likelihood_head = LIKELIHOOD_HEADS[likelihood](n_hidden, n_genes)

    def posterior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance [cells, n_latent] of q(z | h)."""
        mean, log_variance = self.encoder(h).chunk(2, dim=-1)
        return mean, log_variance.clamp(*POSTERIOR_LOG_VARIANCE_RANGE)

    def loss(self, h: torch.Tensor, x: torch.Tensor, library_size: torch.Tensor | None, kl_weight: float) -> torch.Tensor:
        """Negative ELBO per cell (the KL term weighted by `kl_weight`, warmed up by the caller)."""
        mean, log_variance = self.posterior(h)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_variance)
        reconstruction = -self.likelihood_head(self.decoder(z), library_size).cell_log_prob(x).mean()
        return reconstruction + kl_weight * standard_normal_kl(mean, log_variance).sum(dim=-1).mean()


def whitened_shifts(latent: torch.Tensor, is_control: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[n_groups, K] each group's mean latent minus the controls', in coordinates where the controls' covariance is I.

    Args:
        latent: [cells, K] posterior means.
        is_control: [cells] which cells are controls (at least two: their covariance is needed).
        group: [cells] each cell's group in 0..n_groups-1, or -1 for cells in none (controls, combinations).
        n_groups: Rows of the result; a group without cells gets 0.
    """
    controls = latent[is_control]
    centre = controls.mean(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov((controls - centre).T).reshape(latent.shape[1], -1))
    whitening = eigenvectors @ torch.diag(eigenvalues.clamp_min(1e-6).rsqrt()) @ eigenvectors.T
    member = group >= 0
    sums, counts = group_sums(latent[member] - centre, group[member], n_groups)
    return (sums / counts.clamp_min(1.0)[:, None]) @ whitening
