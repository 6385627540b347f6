"""Building blocks of the head: relaxed masks, likelihoods, the causal layer and the config."""

from __future__ import annotations

import json

import pytest
import scipy.sparse as sp
import torch

from perturbedvae.errors import ConfigError
from perturbedvae.model import PerturbedVAEConfig
from perturbedvae.model.causal import LatentCausalLayer
from perturbedvae.model.likelihoods import (
    MIN_GAUSSIAN_VARIANCE,
    GaussianHead,
    GaussianOutput,
    NegativeBinomialHead,
    NegativeBinomialOutput,
    gaussian_log_prob,
    negative_binomial_cell_log_prob,
    negative_binomial_log_prob,
)
from perturbedvae.model.masks import GumbelBernoulliMask, HardConcreteMask, make_mask
from perturbedvae.model.rows import unique_rows
from perturbedvae.train.datamodule import stored_positions

MASK_KINDS = ["hard_concrete", "gumbel"]


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_sampled_masks_are_non_zero_with_the_stated_keep_probability(kind):
    """Monte Carlo check of the closed-form P(mask > 0), including the hard concrete stretch offset."""
    torch.manual_seed(0)
    mask = make_mask(kind, temperature=0.5)
    logits = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    draws = mask.sample(logits.expand(20000, -1))
    assert draws.min() >= 0 and draws.max() <= 1
    torch.testing.assert_close((draws > 0).float().mean(0), mask.keep_probability(logits), atol=0.015, rtol=0)


def test_hard_concrete_puts_mass_exactly_on_zero_and_one_and_gumbel_is_binary_forward():
    torch.manual_seed(0)
    hard_concrete = HardConcreteMask(0.5).sample(torch.zeros(10000))
    assert (hard_concrete == 0).any() and (hard_concrete == 1).any()
    assert ((hard_concrete > 0) & (hard_concrete < 1)).any()
    gumbel = GumbelBernoulliMask(0.5).sample(torch.zeros(10000))
    assert torch.minimum(gumbel, 1 - gumbel).abs().max() < 1e-6  # binary up to straight-through rounding
    assert 0.4 < gumbel.mean() < 0.6


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_samples_carry_gradient_to_the_logits(kind):
    logits = torch.zeros(50, requires_grad=True)
    make_mask(kind, 0.5).sample(logits).sum().backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("prior", [0.05, 0.3])
def test_kl_to_prior_is_the_bernoulli_kl_and_minimal_at_the_prior(kind, prior):
    mask = make_mask(kind, 0.7)
    probability = torch.linspace(0.005, 0.995, 199)
    logits = torch.tensor([mask.logits_for(p) for p in probability.tolist()])
    kl = mask.kl_to_prior(logits, prior)
    closed_form = probability * torch.log(probability / prior) + (1 - probability) * torch.log(
        (1 - probability) / (1 - prior)
    )
    torch.testing.assert_close(kl, closed_form, rtol=1e-4, atol=1e-5)
    assert probability[kl.argmin()].item() == pytest.approx(prior, abs=0.005)
    at_prior = torch.tensor(mask.logits_for(prior), requires_grad=True)
    mask.kl_to_prior(at_prior, prior).backward()
    assert abs(at_prior.grad.item()) < 1e-5


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_logits_for_inverts_keep_probability(kind):
    mask = make_mask(kind, 0.3)
    for probability in (0.01, 0.5, 0.9):
        assert mask.keep_probability(torch.tensor(mask.logits_for(probability))).item() == pytest.approx(probability)


def test_deterministic_masks():
    mask = HardConcreteMask(0.5)
    logits = torch.tensor([mask.logits_for(0.2), mask.logits_for(0.8)])
    assert mask.deterministic(logits, "threshold").tolist() == [0.0, 1.0]
    torch.testing.assert_close(mask.deterministic(logits, "expected"), torch.tensor([0.2, 0.8]))
    with pytest.raises(ConfigError, match="eval_mask"):
        mask.deterministic(logits, "median")
    with pytest.raises(ConfigError, match="mask_kind"):
        make_mask("bernoulli", 0.5)


def test_negative_binomial_log_prob_matches_torch_distributions():
    mean = torch.tensor([0.5, 3.0, 40.0, 200.0])
    theta = torch.tensor([0.3, 2.0, 10.0, 50.0])
    counts = torch.tensor([0.0, 4.0, 31.0, 250.0])
    # torch parameterises NB by failures r = θ and success probability μ / (μ + θ).
    reference = torch.distributions.NegativeBinomial(total_count=theta, logits=torch.log(mean) - torch.log(theta))
    torch.testing.assert_close(negative_binomial_log_prob(counts, mean, theta), reference.log_prob(counts), rtol=1e-4, atol=1e-4)


def test_cell_log_prob_on_non_zero_counts_equals_the_dense_sum_and_its_gradients():
    """The sparse evaluation of the gamma terms is the same function: values and gradients (issue 14)."""
    generator = torch.Generator().manual_seed(0)
    counts = torch.poisson(torch.rand(64, 300, generator=generator) * 3.0) * (torch.rand(64, 300, generator=generator) < 0.2)
    counts[5] = 0.0  # a cell without any count
    leaves = [torch.rand(64, 300, generator=generator).mul(20).add(0.1), torch.rand(300, generator=generator).mul(5).add(0.05)]
    sparse_leaves = [leaf.clone().requires_grad_() for leaf in leaves]
    dense_leaves = [leaf.clone().requires_grad_() for leaf in leaves]
    sparse = negative_binomial_cell_log_prob(counts, *sparse_leaves)
    dense = negative_binomial_log_prob(counts, dense_leaves[0], dense_leaves[1].expand(64, -1)).sum(dim=-1)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-3)
    sparse.sum().backward()
    dense.sum().backward()
    for fast, reference in zip(sparse_leaves, dense_leaves):
        torch.testing.assert_close(fast.grad, reference.grad, rtol=1e-4, atol=1e-4)


def test_cell_log_prob_of_stacked_means_is_each_means_own():
    """Means with a leading dimension (the mechanism members' offsets) share the counts: one result per mean."""
    generator = torch.Generator().manual_seed(2)
    counts = torch.poisson(torch.rand(16, 50, generator=generator) * 3.0) * (torch.rand(16, 50, generator=generator) < 0.3)
    means, theta = torch.rand(3, 16, 50, generator=generator).mul(20).add(0.1), torch.rand(50, generator=generator).add(0.05)
    stacked = negative_binomial_cell_log_prob(counts, means, theta)
    assert stacked.shape == (3, 16)
    torch.testing.assert_close(stacked, torch.stack([negative_binomial_cell_log_prob(counts, mean, theta) for mean in means]))
    output = NegativeBinomialOutput(torch.softmax(means, dim=-1), counts.sum(1) + 1.0, theta)
    rows = torch.tensor([2, 7])
    torch.testing.assert_close(output.offset_precision(rows)[1], NegativeBinomialOutput(output.normalized_rate[1], output.library_size, theta).offset_precision(rows))


def test_cell_log_prob_with_given_non_zero_positions_equals_the_searched_ones_even_with_stored_zeros():
    """`nonzero` read off CSR rows (the batch's `x_nonzero`) gives the same values and gradients (issue 14)."""
    generator = torch.Generator().manual_seed(1)
    counts = torch.poisson(torch.rand(32, 100, generator=generator) * 3.0) * (torch.rand(32, 100, generator=generator) < 0.3)
    block = sp.csr_matrix(counts.numpy())
    block.data[::3] = 0.0  # explicit stored zeros: the positions are then a superset of the non-zero ones
    positions = torch.from_numpy(stored_positions(block))
    assert (block.data == 0).any() and len(positions) == block.nnz
    leaves = [torch.rand(32, 100, generator=generator).mul(20).add(0.1), torch.rand(100, generator=generator).mul(5).add(0.05)]
    x = torch.from_numpy(block.toarray())
    given_leaves = [leaf.clone().requires_grad_() for leaf in leaves]
    searched_leaves = [leaf.clone().requires_grad_() for leaf in leaves]
    given = negative_binomial_cell_log_prob(x, *given_leaves, nonzero=positions)
    searched = negative_binomial_cell_log_prob(x, *searched_leaves)
    torch.testing.assert_close(given, searched, rtol=1e-5, atol=1e-3)
    given.sum().backward()
    searched.sum().backward()
    for fast, reference in zip(given_leaves, searched_leaves):
        torch.testing.assert_close(fast.grad, reference.grad, rtol=1e-4, atol=1e-4)


def test_likelihood_outputs_score_cells_as_the_sum_of_their_genes():
    torch.manual_seed(0)
    hidden, counts = torch.randn(8, 16), torch.poisson(torch.rand(8, 40) * 4)
    for head in (NegativeBinomialHead(16, 40), GaussianHead(16, 40)):
        output = head(hidden, counts.sum(dim=1))
        torch.testing.assert_close(output.cell_log_prob(counts), output.log_prob(counts).sum(dim=-1), rtol=1e-5, atol=1e-4)


def test_gaussian_log_prob_matches_torch_distributions():
    x, mean, log_variance = torch.tensor([0.0, 2.5]), torch.tensor([1.0, 2.0]), torch.tensor([0.3, -1.0])
    reference = torch.distributions.Normal(mean, torch.exp(0.5 * log_variance)).log_prob(x)
    torch.testing.assert_close(gaussian_log_prob(x, mean, log_variance), reference)


@pytest.mark.parametrize("head_class", [GaussianHead, NegativeBinomialHead])
def test_condition_offset_fit_is_the_per_cell_likelihood_and_precision(head_class):
    """Offsets held per condition ([members, conditions, genes]) score as if gathered per cell, values and gradients.

    The Gaussian head computes it from per-condition sums (issue 11's speed); condition 3 has no cell.
    """
    generator = torch.Generator().manual_seed(5)
    head = head_class(8, 30)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    group = torch.tensor([0, 1, 1, 2, 0, 4, 4, 4, 1, 2, 0, 0])
    counts = torch.poisson(torch.rand(12, 30, generator=generator) * 4.0)
    x = counts if head_class is NegativeBinomialHead else torch.log1p(counts)
    library_size, rows = counts.sum(1) + 1.0, torch.rand(12, generator=generator) < 0.5
    leaves = [torch.randn(12, 8, generator=generator), torch.randn(3, 5, 30, generator=generator) * 0.5]

    def fit(grouped: bool):
        head.zero_grad()
        hidden, offsets = (leaf.clone().requires_grad_() for leaf in leaves)
        base = head.base(hidden)
        if grouped:
            log_likelihood, precision = head.condition_offset_fit(base, library_size, offsets, group, x, None, rows)
            weighted = (offsets**2 * precision).sum()
        else:
            output = head.with_offset(base, library_size, offsets[:, group])
            log_likelihood = output.cell_log_prob(x).mean()
            weighted = (offsets[:, group[rows]] ** 2 * output.offset_precision(rows)).sum()
        (log_likelihood + weighted).backward()
        return [log_likelihood.detach(), weighted.detach(), hidden.grad, offsets.grad, *(p.grad.clone() for p in head.parameters())]

    for value, reference in zip(fit(True), fit(False), strict=True):
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-4)


def test_offset_precision_is_the_fisher_information_of_a_mean_offset():
    """Σ_x p(x) (∂ log p(x) / ∂η)² for the mean μ·e^η at η = 0, summed exactly over counts, and 1/σ² for the Gaussian."""
    rate, library, theta = torch.tensor([[0.002, 0.03, 0.2]]), torch.tensor([500.0]), torch.tensor([0.5, 3.0, 20.0])
    output = NegativeBinomialOutput(rate, library, theta)
    counts = torch.arange(3000.0)[:, None].expand(-1, 3)
    offset = torch.zeros_like(counts, requires_grad=True)
    log_prob = negative_binomial_log_prob(counts, output.mean * torch.exp(offset), theta)
    (score,) = torch.autograd.grad(log_prob.sum(), offset)
    fisher = (torch.exp(log_prob.detach()) * score**2).sum(dim=0)
    torch.testing.assert_close(output.offset_precision(torch.tensor([0]))[0], fisher, rtol=1e-3, atol=0)
    log_variance = torch.tensor([[0.3, -1.0, 2.0], [0.0, 1.0, -2.0]])
    rows = torch.tensor([False, True])
    torch.testing.assert_close(GaussianOutput(torch.zeros(2, 3), log_variance).offset_precision(rows), torch.exp(-log_variance[1:]))


def test_likelihood_heads():
    hidden = torch.randn(3, 5)
    nb = NegativeBinomialHead(5, 7)(hidden, torch.tensor([100.0, 1000.0, 50.0]))
    torch.testing.assert_close(nb.mean.sum(1), torch.tensor([100.0, 1000.0, 50.0]))
    torch.testing.assert_close(NegativeBinomialHead(5, 7)(hidden).library_size, torch.full((3,), 1e4))
    head = GaussianHead(5, 7)
    gaussian = head(hidden)
    assert gaussian.log_variance.shape == (3, 7)
    torch.testing.assert_close(gaussian.log_normalized(), gaussian.mean)
    torch.testing.assert_close(head.average_mean(hidden), gaussian.mean.mean(dim=0))


@pytest.mark.parametrize("keys", ["random", "merged", "split"])
def test_unique_rows_groups_exactly_the_equal_rows(keys):
    generator = torch.Generator().manual_seed(0)
    table = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.5]])
    rows = table[torch.randint(0, len(table), (40,), generator=generator)]
    # Ones give [1, 0, 0] and [0, 1, 0] one key (merged); a NaN gives every row with a third entry its own
    # key (split): the exact fallback must answer both.
    projection = {"random": None, "merged": torch.ones(3), "split": torch.tensor([1.0, 2.0, float("nan")])}[keys]
    distinct, inverse = unique_rows(rows, projection)
    assert torch.equal(distinct[inverse], rows)
    assert len(distinct) == len(torch.unique(rows, dim=0))
    assert torch.equal(inverse[:, None] == inverse[None, :], (rows[:, None] == rows[None, :]).all(dim=-1))


def test_causal_layer_solves_the_linear_structural_equations():
    """u_j = s_j + Σ_{i<j} A_ij u_i, checked by substitution node by node."""
    torch.manual_seed(0)
    layer = LatentCausalLayer(5)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 5))
    shift = torch.randn(4, 5)
    u = layer(shift)
    adjacency = layer.adjacency()
    for j in range(5):
        torch.testing.assert_close(u[:, j], shift[:, j] + u[:, :j] @ adjacency[:j, j])
    torch.testing.assert_close(layer(shift[:1] + shift[1:2]), layer(shift[:1]) + layer(shift[1:2]))  # linear
    assert layer.l1_penalty() == adjacency.abs().sum()
    assert torch.equal(LatentCausalLayer(5)(shift), shift)  # a fresh layer has no edges


def _config_values(**overrides):
    return {"n_input": 10, "n_genes": 20, "n_perturbations": 3, **overrides}


def test_config_round_trips_through_dict_and_json(tmp_path):
    config = PerturbedVAEConfig(**_config_values(likelihood="nb", gene_feature_dim=8, mask_kind="gumbel"))
    assert PerturbedVAEConfig.from_dict(config.to_dict()) == config
    config.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["likelihood"] == "nb"
    assert PerturbedVAEConfig.load(tmp_path / "config.json") == config


def test_config_rejects_unknown_and_missing_keys():
    with pytest.raises(ConfigError, match="did you mean n_latent"):
        PerturbedVAEConfig.from_dict(_config_values(n_latnet=4))
    with pytest.raises(ConfigError, match="n_genes"):
        PerturbedVAEConfig.from_dict({"n_input": 10, "n_perturbations": 3})


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"n_latent": 0}, "n_latent"),
        ({"n_genes": 2.5}, "n_genes"),
        ({"likelihood": "poisson"}, "likelihood"),
        ({"mask_prior_prob": 1.0}, "mask_prior_prob"),
        ({"mask_temperature": 0}, "mask_temperature"),
        ({"dropout": 1.0}, "dropout"),
        ({"alignment": "adversarial"}, "alignment"),
        ({"dag_weight": -1.0}, "dag_weight"),
        ({"causal_layer": "yes"}, "causal_layer"),
        ({"gene_feature_dim": 0}, "gene_feature_dim"),
        ({"kl_weight": float("nan")}, "kl_weight"),
    ],
)
def test_config_rejects_bad_values(overrides, field):
    with pytest.raises(ConfigError, match=field):
        PerturbedVAEConfig(**_config_values(**overrides))


def test_config_load_reports_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        PerturbedVAEConfig.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PerturbedVAEConfig.load(tmp_path / "bad.json")


def test_heads_initialise_at_the_data_scale():
    x = torch.tensor([[0.0, 2.0, 5.0], [2.0, 2.5, 7.0], [1.0, 2.0, 6.0]])
    gaussian = GaussianHead(4, 3)
    gaussian.initialize_from_data(x)
    torch.testing.assert_close(gaussian(torch.zeros(1, 4)).mean[0], x.mean(0))
    torch.testing.assert_close(gaussian.log_variance.exp(), x.var(0) + MIN_GAUSSIAN_VARIANCE)
    nb = NegativeBinomialHead(4, 3)
    nb.initialize_from_data(x)
    torch.testing.assert_close(nb(torch.zeros(1, 4)).normalized_rate[0], x.sum(0) / x.sum(), rtol=1e-5, atol=1e-6)
