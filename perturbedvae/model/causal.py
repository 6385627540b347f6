"""How the effects of several perturbed genes combine in the latent space.

Two pieces act on the summed perturbation shift s = Σ_g m_g ⊙ e_g of a cell:

1. `PairwiseInteraction` (optional) adds, for a cell perturbing genes with masked effects a_g,
       t = W · Σ_{g<h} (V a_g) ⊙ (V a_h),
   computed for any number of genes as W · ½[(Σ_g V a_g)² − Σ_g (V a_g)²] (the factorization-machine
   identity). It is exactly zero for controls and single perturbations, and W starts at zero, so a
   model trained on singles only keeps predicting combinations additively in the latent space.
2. `LatentCausalLayer` treats the K latent dimensions as nodes of a linear structural causal model with
   a learned DAG, as in discrepancy-VAE: the perturbation shift is a soft intervention on the exogenous
   noise, and the latent shift that reaches the decoder is
       u = (s + t) (I − A)⁻¹,   A = triu(G, 1)   (row vectors),
   i.e. u_j = (s + t)_j + Σ_{i<j} A_ij u_i. A is strictly upper triangular, so the graph is acyclic by
   construction, I − A is unit upper triangular and always invertible, and an effect on dimension i
   propagates to every descendant of i. An L1 penalty on A keeps the graph sparse.

What this does to a combination A+B versus its singles: the causal map is linear, so
u(A+B) = u(A) + u(B) + t_AB (I − A)⁻¹. Without the interaction term the combination is the sum of the
singles' latent shifts (after mixing); the interaction term is the only latent non-additivity, and the
nonlinear decoder adds non-additivity on the expression scale.
"""

from __future__ import annotations

import torch
from torch import nn


class LatentCausalLayer(nn.Module):
    """u = s (I − triu(G, 1))⁻¹: propagate a latent shift along a learned sparse DAG."""

    def __init__(self, n_latent: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_latent, n_latent))
        self.register_buffer("strictly_upper", torch.ones(n_latent, n_latent).triu(diagonal=1), persistent=False)

    def adjacency(self) -> torch.Tensor:
        """A = triu(G, 1): A[i, j] is the weight of the edge i -> j (only i < j can be non-zero)."""
        return self.weight * self.strictly_upper

    def forward(self, shift: torch.Tensor) -> torch.Tensor:
        adjacency = self.adjacency()
        identity = torch.eye(shift.shape[-1], dtype=adjacency.dtype, device=adjacency.device)
        # Solves u (I − A) = s for u (I − A is unit upper triangular), in the weights' precision because
        # triangular solves have no half-precision kernels under autocast.
        mixed = torch.linalg.solve_triangular(
            identity - adjacency, shift.to(adjacency.dtype), upper=True, left=False, unitriangular=True
        )
        return mixed.to(shift.dtype)

    def l1_penalty(self) -> torch.Tensor:
        return self.adjacency().abs().sum()


class PairwiseInteraction(nn.Module):
    """Learned second-order term W · Σ_{g<h} (V a_g) ⊙ (V a_h) over the genes a cell perturbs."""

    def __init__(self, n_latent: int) -> None:
        super().__init__()
        self.project = nn.Linear(n_latent, n_latent, bias=False)
        self.output = nn.Linear(n_latent, n_latent, bias=False)
        nn.init.zeros_(self.output.weight)

    def forward(self, perturbations: torch.Tensor, masked_effects: torch.Tensor) -> torch.Tensor:
        """`perturbations` [B, A] weights of A genes per cell, `masked_effects` [A, K] -> [B, K]."""
        features = self.project(masked_effects)
        summed = perturbations @ features
        summed_squares = (perturbations**2) @ (features**2)
        return self.output(0.5 * (summed**2 - summed_squares))
