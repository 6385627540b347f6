"""Observation models of the decoder: Gaussian on log-normalized data, negative binomial on counts.

Each likelihood is a small head turning the decoder's last hidden layer into distribution parameters,
and an output object that scores targets (`log_prob`) and reports the mean expression on the
log-normalized scale (`log_normalized`), so predictions are comparable whatever the likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from perturbedvae.model.rows import group_sums

NORMALIZATION_TARGET = 1e4
"""Counts per cell of the log-normalization log1p(1e4 · x / library size) used across the project."""

MIN_GAUSSIAN_VARIANCE = 1e-2
"""Floor of the Gaussian per-gene variance on log-normalized data (a standard deviation of 0.1).

Screens measure many genes that are zero in almost every cell (375 of the 500 Norman genes vary by
less than 1e-3). With a tiny floor their precision reaches thousands, their gradients drown those of
the responsive genes, and the shared decoder learns to keep its output flat in z, so perturbations
stop moving the prediction. Differences below 0.1 on the log1p scale are noise for every metric used."""

EXPECTATION_DRAWS = 4
"""NB cells drawn per predicted cell to average log-normalized expression (`NegativeBinomialOutput.log_normalized`)."""
EXPECTATION_SEED = 0

_LOG_VARIANCE_RANGE = (math.log(MIN_GAUSSIAN_VARIANCE), 8.0)
_EPS = 1e-8


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, exp(log_variance))."""
    return -0.5 * (math.log(2 * math.pi) + log_variance + (x - mean) ** 2 * torch.exp(-log_variance))


def negative_binomial_log_prob(
    x: torch.Tensor, mean: torch.Tensor, inverse_dispersion: torch.Tensor
) -> torch.Tensor:
    """Elementwise log NB(x; mean μ, inverse dispersion θ), i.e. variance μ + μ²/θ.

    log p = lgamma(x+θ) − lgamma(θ) − lgamma(x+1) + θ·log(θ/(θ+μ)) + x·log(μ/(θ+μ)).
    """
    log_theta_mu = torch.log(inverse_dispersion + mean + _EPS)
    return (
        torch.lgamma(x + inverse_dispersion)
        - torch.lgamma(inverse_dispersion)
        - torch.lgamma(x + 1.0)
        + inverse_dispersion * (torch.log(inverse_dispersion + _EPS) - log_theta_mu)
        + x * (torch.log(mean + _EPS) - log_theta_mu)
    )


def negative_binomial_cell_log_prob(
    x: torch.Tensor, mean: torch.Tensor, inverse_dispersion: torch.Tensor, nonzero: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ over genes of `negative_binomial_log_prob` per cell: x [B, genes], mean [..., B, genes], θ [genes] -> [..., B].

    Leading dimensions of `mean` (the mechanism members' offsets) share x and so its non-zero positions.

    Every term with a factor x or of the form lgamma(x+θ) − lgamma(θ) − lgamma(x+1) is exactly 0 where
    x = 0, and so is its gradient, so those terms are evaluated on the non-zero counts only; only
    θ·log(θ/(θ+μ)) needs every entry. Count matrices are mostly zeros (~90% of the synthetic screen's
    entries), and evaluated densely the lgamma and digamma calls alone were half the CPU time of a
    training step (issue 14).

    `nonzero`: flat row-major positions (cell × genes + gene) of x's non-zero entries, or a superset of
    them (stored zeros of a sparse matrix add exactly 0). The data module reads them off the CSR rows of a
    batch for free; found here from the dense x, they cost a twentieth of a training step. The sparse
    terms read μ once at those positions and recompute log(θ+μ) there, and lgamma(θ) is taken per gene,
    so the backward pass scatters into one [B, genes] gradient, not two, and runs digamma(θ) per gene.
    """
    n_genes = x.shape[-1]
    theta_eps = inverse_dispersion + _EPS  # ε joins the [genes] vector: one pass less over [B, genes]
    log_theta_mu = torch.log(mean + theta_eps)
    zero_count_part = (inverse_dispersion * torch.log(theta_eps)).sum() - (log_theta_mu * inverse_dispersion).sum(dim=-1)
    flat = x.reshape(-1).nonzero().squeeze(1) if nonzero is None else nonzero
    cells, genes = flat // n_genes, flat % n_genes
    counts, mu = x.reshape(-1).take(flat), mean.flatten(start_dim=-2)[..., flat]
    count_part = (
        torch.lgamma(counts + inverse_dispersion[genes])
        - torch.lgamma(inverse_dispersion)[genes]
        - torch.lgamma(counts + 1.0)
        + counts * (torch.log(mu + _EPS) - torch.log(mu + theta_eps[genes]))
    )
    return zero_count_part.index_add(-1, cells, count_part.to(zero_count_part.dtype))


@dataclass
class GaussianOutput:
    """Per-cell Gaussian over log-normalized expression with a learned per-gene variance."""

    mean: torch.Tensor
    log_variance: torch.Tensor

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(x, self.mean, self.log_variance)

    def cell_log_prob(self, x: torch.Tensor, nonzero: torch.Tensor | None = None) -> torch.Tensor:
        """[B] log-likelihood of each cell's expression (summed over genes); `nonzero` is not needed, every entry counts."""
        return self.log_prob(x).sum(dim=-1)

    def log_normalized(self) -> torch.Tensor:
        return self.mean

    def offset_precision(self, rows: torch.Tensor) -> torch.Tensor:
        """[rows, genes] curvature of −log p in the mean offset of the given cells (mask or index): 1/σ², exact."""
        return torch.exp(-self.log_variance[rows])

    def sample_log_normalized(self) -> torch.Tensor:
        """One draw per cell from N(mean, variance), clipped at 0 (torch's global RNG).

        Log-normalized expression is never negative; the Gaussian is an approximation that puts mass
        below 0 for lowly expressed genes, and tools that check the scale (cell-eval) refuse negatives.
        """
        return (self.mean + torch.exp(0.5 * self.log_variance) * torch.randn_like(self.mean)).clamp_min(0.0)


@dataclass
class NegativeBinomialOutput:
    """Per-cell negative binomial over counts: mean = library size × normalized rate (rows sum to 1)."""

    normalized_rate: torch.Tensor
    library_size: torch.Tensor
    inverse_dispersion: torch.Tensor
    """[genes], shared by every cell (broadcast, never expanded, so per-gene terms are computed once)."""

    @property
    def mean(self) -> torch.Tensor:
        return self.normalized_rate * self.library_size.unsqueeze(-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return negative_binomial_log_prob(x, self.mean, self.inverse_dispersion)

    def cell_log_prob(self, x: torch.Tensor, nonzero: torch.Tensor | None = None) -> torch.Tensor:
        """[B] log-likelihood of each cell's counts (summed over genes), cheaper than `log_prob` on sparse counts.

        `nonzero`: flat positions of x's non-zero entries when known (see `negative_binomial_cell_log_prob`).
        """
        return negative_binomial_cell_log_prob(x, self.mean, self.inverse_dispersion, nonzero)

    def offset_precision(self, rows: torch.Tensor) -> torch.Tensor:
        """[..., rows, genes] Fisher information of the rate-logit offset of the given cells (mask or index): μθ / (μ + θ).

        The NB's counterpart of the Gaussian's 1/σ²: a squared error d² in the offset costs about
        d² · μθ / (2(μ + θ)) of log-likelihood. It is a weight, not a model term, so no gradient flows through
        it; only the asked rows' means are formed (the loss weighs the singles' cells, not the whole batch).
        """
        mean = (self.normalized_rate[..., rows, :] * self.library_size[rows].unsqueeze(-1)).detach()
        theta = self.inverse_dispersion.detach()
        return mean * theta / (mean + theta)

    def log_normalized(self) -> torch.Tensor:
        """E[log1p(1e4 · X / total(X))] under the model: the data's own statistic, per cell and gene.

        Log-normalized data average log1p of normalized counts, which for counts with few UMIs lies far
        below log1p of the normalized *mean* (Jensen): on the Papalexi controls log1p(1e4 · rate) read
        about 1.2 too high on every gene. The expectation has no closed form (an exact pmf sum needed
        ~100 terms per entry on overdispersed genes, and the delta method erred by 0.07 at mean 31,
        inverse dispersion 1), so it is the average of `EXPECTATION_DRAWS` cells drawn from the NB with
        a fixed seed (`sample_log_normalized`): deterministic, unbiased, and its Monte Carlo noise
        averages out further over the control cells of a condition's mean profile.
        """
        with torch.random.fork_rng(devices=[self.mean.device] if self.mean.is_cuda else []):
            torch.manual_seed(EXPECTATION_SEED)
            return torch.stack([self.sample_log_normalized() for _ in range(EXPECTATION_DRAWS)]).mean(dim=0)

    def sample_log_normalized(self) -> torch.Tensor:
        """Counts drawn as Gamma-Poisson (the NB; torch's global RNG), normalized like the data: log1p(1e4 · counts / total)."""
        mean = self.mean.float()
        theta = self.inverse_dispersion.float().expand_as(mean)
        counts = torch.poisson(torch.distributions.Gamma(theta, theta / mean.clamp_min(1e-8)).sample())
        totals = counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
        return torch.log1p(NORMALIZATION_TARGET * counts / totals)


GenerativeOutput = GaussianOutput | NegativeBinomialOutput


class GaussianHead(nn.Module):
    """Decoder hidden -> Gaussian mean per gene; one learned log-variance per gene."""

    def __init__(self, n_hidden: int, n_genes: int) -> None:
        super().__init__()
        self.mean = nn.Linear(n_hidden, n_genes)
        self.log_variance = nn.Parameter(torch.zeros(n_genes))

    def clamped_log_variance(self) -> torch.Tensor:
        """[n_genes] the per-gene log-variance in use (floored at MIN_GAUSSIAN_VARIANCE)."""
        return self.log_variance.clamp(*_LOG_VARIANCE_RANGE)

    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor) -> None:
        """Start at each gene's mean and variance of log-normalized `x` [cells, genes].

        With a unit variance at start, genes that barely vary give weak gradients and the head spends
        hundreds of steps learning scales instead of perturbation effects.
        """
        self.mean.bias.copy_(x.mean(dim=0))
        self.log_variance.copy_(torch.log(x.var(dim=0) + MIN_GAUSSIAN_VARIANCE).clamp(*_LOG_VARIANCE_RANGE))

    def average_mean(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n_genes] the decoded mean averaged over the rows of `hidden` [rows, n_hidden].

        The mean is affine in the hidden row, so its average is the mean of the average row: one row
        through the layer instead of all of them.
        """
        return self.mean(hidden.mean(dim=0))

    def forward(self, hidden: torch.Tensor, library_size: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> GaussianOutput:
        """`library_size` is ignored: log-normalized data carry no library size. `offset` adds to the mean."""
        return self.with_offset(self.base(hidden), library_size, offset)

    def base(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, genes] the output layer's result: the mean before any offset."""
        return self.mean(hidden)

    def condition_offset_fit(self, base: torch.Tensor, library_size: torch.Tensor | None, offsets: torch.Tensor,
                             group: torch.Tensor, x: torch.Tensor, nonzero: torch.Tensor | None,
                             rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cells' log-likelihood under per-condition mean offsets, and the offsets' precision summed per condition.

        `offsets` [M, C, genes] holds M sets (the mechanism members) of one offset per condition; cell b
        has condition `group[b]`. Returns the mean over sets and cells of each cell's log-likelihood
        (summed over genes) of N(x_b; base_b + offsets[m, group_b], σ²), and [C, genes] the 1/σ² of the
        cells `rows` (mask) summed per condition (`offset_precision`; the same for every set).

        Exact, from per-condition sums instead of [M, B, genes] tensors: with r = x − base,
        Σ_b (r_b − o_c(b))² = Σ_b r_b² + Σ_c o_c ⊙ (n_c o_c − 2 Σ_{b∈c} r_b), so each set costs [C, genes]
        work (a batch holds ~5× fewer conditions than cells). `library_size` and `nonzero` are not needed.
        """
        log_variance = self.clamped_log_variance()
        precision = torch.exp(-log_variance)
        n_sets, n_groups = offsets.shape[:2]
        residual = x - base
        sums, sizes = group_sums(residual, group, n_groups)
        squares = (residual * residual).sum(dim=0) + (offsets * (sizes[:, None] * offsets - 2.0 * sums)).sum(dim=(0, 1)) / n_sets
        log_likelihood = -0.5 * (x.shape[1] * math.log(2 * math.pi) + log_variance.sum() + (squares * precision).sum() / x.shape[0])
        row_sizes = torch.bincount(group[rows], minlength=n_groups).to(precision.dtype)
        return log_likelihood, row_sizes[:, None] * precision

    def with_offset(self, base: torch.Tensor, library_size: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> GaussianOutput:
        """The output from the layer's result `base` [B, genes] (the mean), so several offsets share one layer pass."""
        log_variance = self.clamped_log_variance().expand(base.shape[0], -1)
        return GaussianOutput(mean=base if offset is None else base + offset, log_variance=log_variance)


class NegativeBinomialHead(nn.Module):
    """Decoder hidden -> softmax rates per gene; one learned log inverse dispersion per gene."""

    def __init__(self, n_hidden: int, n_genes: int) -> None:
        super().__init__()
        self.rate_logits = nn.Linear(n_hidden, n_genes)
        self.log_inverse_dispersion = nn.Parameter(torch.zeros(n_genes))

    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor) -> None:
        """Start at each gene's share of the total counts of `x` [cells, genes] (the mean normalized rate)."""
        share = x.sum(dim=0) / x.sum().clamp_min(1.0)
        self.rate_logits.bias.copy_(torch.log(share + 1e-8))

    def forward(self, hidden: torch.Tensor, library_size: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> NegativeBinomialOutput:
        """Without `library_size` the cell is taken to have 1e4 counts, the normalization target.

        `offset` adds to the rate logits (a change of log expression).
        """
        return self.with_offset(self.base(hidden), library_size, offset)

    def base(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, genes] the output layer's result: the rate logits before any offset."""
        return self.rate_logits(hidden)

    def condition_offset_fit(self, base: torch.Tensor, library_size: torch.Tensor | None, offsets: torch.Tensor,
                             group: torch.Tensor, x: torch.Tensor, nonzero: torch.Tensor | None,
                             rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`GaussianHead.condition_offset_fit` for counts: offsets [M, C, genes] add to the rate logits.

        The softmax couples a cell's genes, so there are no per-condition sums: the cells' [M, B, genes]
        means are formed. The precision sums are [M, C, genes] (μθ/(μ + θ) depends on each set's offset).
        """
        output = self.with_offset(base, library_size, offsets[:, group])
        precision = output.offset_precision(rows)
        sums = precision.new_zeros(*offsets.shape).index_add_(1, group[rows], precision)
        return output.cell_log_prob(x, nonzero).mean(), sums

    def with_offset(self, base: torch.Tensor, library_size: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> NegativeBinomialOutput:
        """The output from the layer's result `base` [B, genes] (rate logits), so several offsets share one layer pass."""
        if library_size is None:
            library_size = base.new_full((base.shape[0],), NORMALIZATION_TARGET)
        return NegativeBinomialOutput(
            normalized_rate=torch.softmax(base if offset is None else base + offset, dim=-1),
            library_size=library_size.to(base.dtype),
            inverse_dispersion=torch.exp(self.log_inverse_dispersion),
        )


LIKELIHOOD_HEADS: dict[str, type[nn.Module]] = {"gaussian": GaussianHead, "nb": NegativeBinomialHead}
"""Decoder head per `PerturbedVAEConfig.likelihood`."""
