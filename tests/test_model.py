"""The PerturbedVAE module: shapes, loss, masks, composition of combinations, alignment, DAG, NB scale."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from perturbedvae.data.conditions import CONTROL
from perturbedvae.data.loading import load_dataset
from perturbedvae.errors import ConfigError, DataError
from perturbedvae.model import LossWeights, PerturbedVAEConfig, PerturbedVAEModule
from perturbedvae.model.alignment import (
    BANDWIDTHS,
    alignment_penalty,
    condition_alignment_penalty,
    gaussian_kernel,
    gaussian_mmd,
    median_scale,
)
from perturbedvae.model.likelihoods import NORMALIZATION_TARGET, NegativeBinomialOutput
from tests.conftest import PAPALEXI_PATH

N_GENES = 12
N_PERTURBATIONS = 4


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run ~20x faster on one thread than with two threads fighting other processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides) -> PerturbedVAEConfig:
    values = dict(
        n_input=N_GENES,
        n_genes=N_GENES,
        n_perturbations=N_PERTURBATIONS,
        n_latent=6,
        n_hidden=32,
        n_layers=1,
        dropout=0.0,
    )
    values.update(overrides)
    return PerturbedVAEConfig(**values)


def multi_hot(*gene_sets: tuple[int, ...], n: int = N_PERTURBATIONS) -> torch.Tensor:
    rows = torch.zeros(len(gene_sets), n)
    for row, genes in enumerate(gene_sets):
        rows[row, list(genes)] = 1.0
    return rows


def train(module: PerturbedVAEModule, batch: dict[str, torch.Tensor], steps: int, warmup: int) -> None:
    """Adam with the KL and sparsity weights ramped up linearly, as the trainer does."""
    optimizer = torch.optim.Adam(module.parameters(), lr=2e-2)
    for step in range(steps):
        ramp = min(1.0, step / warmup)
        optimizer.zero_grad()
        module.loss(batch, LossWeights(kl=ramp, sparsity=ramp)).loss.backward()
        optimizer.step()


def synthetic_batch(likelihood: str, seed: int = 0, cells_per_condition: int = 16) -> dict[str, torch.Tensor]:
    """Controls, singles of genes 0..3 and the double 0+1; gene g raises output genes 3g..3g+2."""
    generator = torch.Generator().manual_seed(seed)
    conditions = [(), (0,), (1,), (2,), (3,), (0, 1)]
    perturbations = multi_hot(*[genes for genes in conditions for _ in range(cells_per_condition)])
    base_rate = torch.linspace(1.0, 3.0, N_GENES)
    log_fold = torch.zeros(N_PERTURBATIONS, N_GENES)
    for gene in range(N_PERTURBATIONS):
        log_fold[gene, 3 * gene : 3 * gene + 3] = 1.0
    rates = base_rate * torch.exp(perturbations @ log_fold) * 5.0
    counts = torch.poisson(rates, generator=generator)
    log_normalized = torch.log1p(counts / counts.sum(1, keepdim=True).clamp_min(1.0) * NORMALIZATION_TARGET)
    x = counts if likelihood == "nb" else log_normalized
    return {"h": log_normalized, "x": x, "perturbations": perturbations, "library_size": counts.sum(1)}


@pytest.mark.parametrize("likelihood", ["gaussian", "nb"])
def test_shapes_for_both_likelihoods(likelihood):
    config = tiny_config(likelihood=likelihood)
    module = PerturbedVAEModule(config)
    batch = synthetic_batch(likelihood)
    n_cells = batch["h"].shape[0]

    inference = module.inference(batch["h"])
    assert inference.z.shape == inference.qz_mean.shape == inference.qz_logvar.shape == (n_cells, config.n_latent)
    effect = module.perturbation_effect(batch["perturbations"])
    assert effect.z_p.shape == (n_cells, config.n_latent)
    assert effect.masks.shape == (N_PERTURBATIONS, config.n_latent)  # every gene occurs in the batch
    generative = module.generative(inference.z + effect.z_p, batch["library_size"])
    assert generative.mean.shape == (n_cells, N_GENES)
    assert generative.log_prob(batch["x"]).shape == (n_cells, N_GENES)

    output = module(batch)
    assert output.loss.dim() == 0
    assert set(output.parts) == {"reconstruction", "counterfactual", "kl", "alignment", "sparsity", "dag"}
    assert module.predict(batch["h"][:5], batch["perturbations"][:5]).shape == (5, N_GENES)
    assert module.mask_probabilities().shape == module.effect_vectors().shape == (N_PERTURBATIONS, config.n_latent)


@pytest.mark.parametrize("likelihood", ["gaussian", "nb"])
def test_loss_is_finite_and_decreases(likelihood):
    torch.manual_seed(0)
    module = PerturbedVAEModule(tiny_config(likelihood=likelihood))
    batch = synthetic_batch(likelihood)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        output = module.loss(batch, LossWeights(kl=0.5))
        assert torch.isfinite(output.loss)
        assert all(torch.isfinite(part) for part in output.parts.values())
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, (first, last)
    assert losses[-1] < losses[0]


def test_loss_without_library_size_uses_counts_total():
    module = PerturbedVAEModule(tiny_config(likelihood="nb")).eval()
    batch = synthetic_batch("nb")
    with_library = module.loss(batch).parts["reconstruction"]
    without = module.loss({key: value for key, value in batch.items() if key != "library_size"}).parts["reconstruction"]
    torch.testing.assert_close(with_library, without)


def test_training_learns_the_perturbation_effects():
    """After training, the predicted change of each single and of the double follows the observed change."""
    torch.manual_seed(0)
    module = PerturbedVAEModule(tiny_config())
    batch = synthetic_batch("gaussian")
    train(module, batch, steps=600, warmup=300)
    perturbations, x = batch["perturbations"], batch["x"]
    is_control = perturbations.sum(1) == 0
    control = batch["h"][is_control]
    baseline = module.predict(control, multi_hot(())).mean(0)
    for genes in [(0,), (1,), (2,), (3,), (0, 1)]:
        cells = (perturbations == multi_hot(genes)).all(1)
        observed = x[cells].mean(0) - x[is_control].mean(0)
        predicted = module.predict(control, multi_hot(genes)).mean(0) - baseline
        correlation = torch.corrcoef(torch.stack([observed, predicted]))[0, 1]
        assert correlation > 0.9, (genes, correlation)


def _train_on_shuffled_labels(sparsity_weight: float) -> torch.Tensor:
    torch.manual_seed(0)
    module = PerturbedVAEModule(tiny_config(mask_prior_prob=0.1))
    batch = synthetic_batch("gaussian")
    batch["perturbations"] = batch["perturbations"][torch.randperm(batch["perturbations"].shape[0])]
    optimizer = torch.optim.Adam(module.parameters(), lr=2e-2)
    for _ in range(600):
        optimizer.zero_grad()
        module.loss(batch, LossWeights(sparsity=sparsity_weight)).loss.backward()
        optimizer.step()
    return module.mask_probabilities().detach()


def test_sparsity_prior_switches_off_masks_of_perturbations_without_effect():
    """Shuffled labels carry no signal: the prior pulls keep-probabilities to 0.1; without it they stay open."""
    pruned = _train_on_shuffled_labels(sparsity_weight=5.0)
    unpenalised = _train_on_shuffled_labels(sparsity_weight=0.0)
    assert pruned.mean() < 0.2
    assert (pruned > 0.5).float().mean() < 0.1
    assert unpenalised.mean() > 0.5


@pytest.mark.parametrize("eval_mask", ["threshold", "expected"])
def test_masks_are_deterministic_in_eval_and_random_in_training(eval_mask):
    module = PerturbedVAEModule(tiny_config(eval_mask=eval_mask))
    perturbations = multi_hot((0,), (1, 2), (3,))
    module.train()
    draws = [module.perturbation_effect(perturbations).masks for _ in range(5)]
    assert any(not torch.equal(draws[0], other) for other in draws[1:])
    module.eval()
    first, second = module.perturbation_effect(perturbations), module.perturbation_effect(perturbations)
    torch.testing.assert_close(first.z_p, second.z_p, rtol=0, atol=0)
    keep = module.mask_probabilities()
    expected = (keep > 0.5).float() if eval_mask == "threshold" else keep
    torch.testing.assert_close(first.masks, expected[first.gene_index])


def test_predict_is_deterministic_and_restores_training_mode():
    module = PerturbedVAEModule(tiny_config(dropout=0.3)).train()
    batch = synthetic_batch("gaussian")
    first = module.predict(batch["h"][:8], multi_hot((1,)))
    second = module.predict(batch["h"][:8], multi_hot((1,)))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert module.training


def _randomise(module: PerturbedVAEModule) -> None:
    """Give the causal DAG and the interaction output non-zero weights, as training would."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if module.effects.causal is not None:
            module.effects.causal.weight.copy_(torch.randn(module.effects.causal.weight.shape, generator=generator))
        if module.effects.interaction is not None:
            weight = module.effects.interaction.output.weight
            weight.copy_(torch.randn(weight.shape, generator=generator))
        module.effects.logit_table.copy_(torch.randn(module.effects.logit_table.shape, generator=generator) * 3)
        module.effects.effect_table.copy_(torch.randn(module.effects.effect_table.shape, generator=generator))


def test_combination_is_sum_of_singles_without_causal_layer():
    module = PerturbedVAEModule(tiny_config(causal_layer=False, pairwise_interaction=False)).eval()
    _randomise(module)
    effect = module.perturbation_effect(multi_hot((0,), (1,), (0, 1), (0, 1, 3), (3,)))
    single_a, single_b, double, triple, single_d = effect.z_p
    assert single_a.abs().sum() > 0 and single_b.abs().sum() > 0
    torch.testing.assert_close(double, single_a + single_b)
    torch.testing.assert_close(triple, single_a + single_b + single_d)
    torch.testing.assert_close(effect.z_p[:2], module.effect_vectors()[:2])


def test_combination_with_causal_layer_and_interaction_is_the_documented_function():
    """u(A+B) = (s_A + s_B + W((V a_A) ⊙ (V a_B))) (I − A)⁻¹, and singles are s (I − A)⁻¹."""
    module = PerturbedVAEModule(tiny_config()).eval()
    _randomise(module)
    effect = module.perturbation_effect(multi_hot((0,), (1,), (0, 1)))
    single_a, single_b, double = effect.z_p
    masked = module.effect_vectors()
    mixing = torch.linalg.inv(torch.eye(6) - module.dag_matrix())
    interaction = module.effects.interaction
    pairwise = interaction.output(interaction.project(masked[0]) * interaction.project(masked[1]))

    torch.testing.assert_close(single_a, masked[0] @ mixing)
    torch.testing.assert_close(single_b, masked[1] @ mixing)
    torch.testing.assert_close(double, (masked[0] + masked[1] + pairwise) @ mixing)
    assert (double - single_a - single_b).abs().max() > 1e-3  # the interaction really is non-additive


def test_interaction_sums_over_all_pairs_of_a_triple():
    module = PerturbedVAEModule(tiny_config(causal_layer=False)).eval()
    _randomise(module)
    triple = module.perturbation_effect(multi_hot((0, 1, 2))).z_p[0]
    masked = module.effect_vectors()
    interaction = module.effects.interaction
    projected = interaction.project(masked)
    pairs = sum(interaction.output(projected[i] * projected[j]) for i, j in [(0, 1), (0, 2), (1, 2)])
    torch.testing.assert_close(triple, masked[0] + masked[1] + masked[2] + pairs)


def test_untrained_interaction_keeps_combinations_additive():
    module = PerturbedVAEModule(tiny_config(causal_layer=False)).eval()
    single_a, single_b, double = module.perturbation_effect(multi_hot((0,), (1,), (0, 1))).z_p
    torch.testing.assert_close(double, single_a + single_b)


def test_dag_matrix_is_strictly_upper_triangular_and_only_upper_weights_learn():
    module = PerturbedVAEModule(tiny_config())
    _randomise(module)
    dag = module.dag_matrix()
    assert torch.equal(dag.tril(), torch.zeros_like(dag))
    assert dag.triu(1).abs().sum() > 0
    batch = synthetic_batch("gaussian")
    module.loss(batch, LossWeights(dag=1.0)).loss.backward()
    gradient = module.effects.causal.weight.grad
    assert torch.equal(gradient.tril(), torch.zeros_like(gradient))
    assert gradient.triu(1).abs().sum() > 0
    torch.testing.assert_close(module.loss(batch).parts["dag"], dag.abs().sum().detach())
    assert PerturbedVAEModule(tiny_config(causal_layer=False)).dag_matrix() is None


def test_alignment_is_zero_for_identical_groups_and_grows_with_shift():
    generator = torch.Generator().manual_seed(0)
    control = torch.randn(64, 8, generator=generator)
    same_distribution = torch.randn(64, 8, generator=generator)
    assert gaussian_mmd(control, control).abs() < 1e-6
    near = gaussian_mmd(control, same_distribution)
    shifted = gaussian_mmd(control, same_distribution + 1.0)
    far = gaussian_mmd(control, same_distribution + 3.0)
    assert near < 0.05
    assert shifted > 5 * near
    assert far > shifted


def test_alignment_equals_the_mmd_written_from_its_definition_with_its_gradient():
    """The batched kernel is the same MMD² as the formula of alignment.py's docstring (issue 14)."""
    generator = torch.Generator().manual_seed(1)
    points = (torch.randn(90, 6, generator=generator) * 0.7).requires_grad_()
    reference_points = points.detach().clone().requires_grad_()
    is_control = torch.arange(90) % 7 == 0

    def definition(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        squared = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / a.shape[-1]
        return torch.stack([torch.exp(-squared / (2 * s**2 * scale)) for s in BANDWIDTHS]).mean(dim=0).mean()

    for adaptive in (False, True):
        scale = median_scale(reference_points) if adaptive else torch.tensor(1.0)
        control, perturbed = reference_points[is_control], reference_points[~is_control]
        expected = definition(control, control, scale) + definition(perturbed, perturbed, scale) - 2 * definition(control, perturbed, scale)
        actual = alignment_penalty(points, is_control, adaptive=adaptive)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)
        actual.backward()
        expected.backward()
        torch.testing.assert_close(points.grad, reference_points.grad, rtol=1e-3, atol=1e-6)
        points.grad, reference_points.grad = None, None


def test_alignment_penalty_needs_both_groups():
    z = torch.randn(10, 4, requires_grad=True)
    only_controls = alignment_penalty(z, torch.ones(10, dtype=torch.bool))
    assert only_controls.item() == 0.0
    only_controls.backward()  # still part of the graph, so DDP sees every parameter used
    mixed = alignment_penalty(z + torch.arange(10.0).unsqueeze(1), torch.arange(10) < 5)
    assert mixed > 0


def _unbiased_mmd(x: torch.Tensor, y: torch.Tensor, scale) -> torch.Tensor:
    def mean_off_diagonal(kernel):
        return (kernel.sum() - kernel.diagonal().sum()) / (len(kernel) * (len(kernel) - 1))
    return mean_off_diagonal(gaussian_kernel(x, x, scale)) + mean_off_diagonal(gaussian_kernel(y, y, scale)) - 2 * gaussian_kernel(x, y, scale).mean()


def test_condition_alignment_sees_conditions_that_split_the_control_cloud():
    """Two conditions each holding one half of the control distribution: pooled they look like controls."""
    generator = torch.Generator().manual_seed(3)
    control, perturbed = torch.randn(200, 4, generator=generator), torch.randn(200, 4, generator=generator)
    control.requires_grad_(True)
    perturbed.requires_grad_(True)
    z = torch.cat([control, perturbed])
    is_control = torch.arange(400) < 200
    halves = torch.cat([torch.zeros(200, dtype=torch.long), (perturbed[:, 0] > 0).long() + 1])
    same = torch.cat([torch.zeros(200, dtype=torch.long), torch.arange(200) % 2 + 1])  # labels unrelated to z
    pooled = alignment_penalty(z, is_control, adaptive=True)
    split = condition_alignment_penalty(z, is_control, halves)
    assert split > 5 * pooled.abs() and split > 10 * condition_alignment_penalty(z, is_control, same).abs()
    # Equal to the cell-weighted mean of each condition's unbiased MMD², computed directly.
    scale = median_scale(z)
    sizes = [int((halves[200:] == label).sum()) for label in (1, 2)]
    direct = sum(n * _unbiased_mmd(perturbed[halves[200:] == label], control, scale) for n, label in zip(sizes, (1, 2))) / 200
    torch.testing.assert_close(split, direct, rtol=1e-4, atol=1e-6)
    # The same gradient: the penalty reads only same-condition pairs, the definition every pair.
    gradients = torch.autograd.grad(split, (control, perturbed))
    for actual, expected in zip(gradients, torch.autograd.grad(direct, (control, perturbed))):
        torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-7)


def test_condition_alignment_gives_single_cell_conditions_no_weight_and_finite_gradients():
    """An unbiased MMD² needs two cells per side: a condition with one cell in the batch must change nothing."""
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(61, 3, generator=generator, requires_grad=True)
    condition = torch.cat([torch.zeros(20, dtype=torch.long), torch.arange(40) % 2 + 1, torch.tensor([3])])
    is_control = condition == 0
    with_single = condition_alignment_penalty(z, is_control, condition)
    # Without the last cell, but at the same bandwidths (they follow all rows, the single cell's included).
    scale = median_scale(z)
    direct = sum(20 * _unbiased_mmd(z[:60][condition[:60] == label], z[:20], scale) for label in (1, 2)) / 40
    torch.testing.assert_close(with_single, direct, rtol=1e-4, atol=1e-6)
    (gradient,) = torch.autograd.grad(with_single, z)
    assert torch.isfinite(gradient).all() and gradient[60].abs().max() == 0


def test_median_scale_is_the_median_squared_distance_over_all_distinct_pairs_per_dimension():
    """The upper triangle it reads gives the lower median of every ordered pair (each value twice) exactly."""
    generator = torch.Generator().manual_seed(4)
    for n in (2, 3, 10, 51):
        z = torch.randn(n, 5, generator=generator)
        ordered_pairs = torch.tensor([float(((z[i] - z[j]) ** 2).sum()) / 5 for i in range(n) for j in range(n) if i != j])
        torch.testing.assert_close(median_scale(z), ordered_pairs.median(), rtol=1e-5, atol=1e-6)
    assert float(median_scale(torch.randn(1, 5))) == 1.0  # one point has no pair: the unit scale


def test_condition_alignment_skips_single_cell_conditions_and_keeps_the_graph():
    z = torch.randn(6, 3, requires_grad=True)
    is_control = torch.tensor([True, True, True, False, False, False])
    penalty = condition_alignment_penalty(z, is_control, torch.tensor([0, 0, 0, 1, 2, 3]))
    assert penalty.item() == 0.0
    penalty.backward()
    module = PerturbedVAEModule(tiny_config(alignment="mmd_per_condition"))
    assert torch.isfinite(module.loss(synthetic_batch("gaussian")).parts["alignment"])


def test_loss_alignment_part_depends_on_batch_composition():
    module = PerturbedVAEModule(tiny_config()).eval()
    batch = synthetic_batch("gaussian")
    controls = batch["perturbations"].sum(1) == 0
    control_batch = {key: value[controls] for key, value in batch.items()}
    assert module.loss(control_batch).parts["alignment"] == 0
    assert module.loss(batch).parts["alignment"] > 0
    assert PerturbedVAEModule(tiny_config(alignment="none")).loss(batch).parts["alignment"] == 0


def test_nb_predict_is_deterministic_and_leaves_the_global_rng_alone():
    module = PerturbedVAEModule(tiny_config(likelihood="nb"))
    batch = synthetic_batch("nb")
    torch.manual_seed(5)
    first = module.predict(batch["h"][:6], batch["perturbations"][:6], batch["library_size"][:6])
    after_first = torch.rand(1)
    torch.manual_seed(5)
    second = module.predict(batch["h"][:6], batch["perturbations"][:6], batch["library_size"][:6])
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(torch.rand(1), after_first)  # predicting consumed none of the caller's random stream
    assert (first >= 0).all()


def _dense(block) -> np.ndarray:
    return np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float32)


def test_nb_expected_log_normalized_expression_matches_real_counts():
    """On the real Papalexi control counts, an NB at the controls' own gene shares predicts the data's mean
    log-normalized profile; log1p(1e4 · rate), the log of the mean, reads far too high (Jensen)."""
    data = load_dataset(PAPALEXI_PATH, condition_key="target", control_labels=["non-targeting"])
    controls = data.cell_indices(CONTROL)
    counts = torch.from_numpy(_dense(data.counts[controls]))
    library = counts.sum(1)
    share = counts.sum(0) / counts.sum()
    mean = library[:, None] * share
    # method of moments with per-cell means μ_i: Var X = E μ + E μ² / θ + Var μ
    extra = counts.var(0) - mean.mean(0) - mean.var(0)
    theta = ((mean**2).mean(0) / extra.clamp_min(1e-3)).clamp(0.05, 1e4)
    output = NegativeBinomialOutput(share.expand_as(counts), library, theta.expand_as(counts))
    observed = torch.from_numpy(_dense(data.expression[controls])).mean(0)
    predicted = output.log_normalized().mean(0)
    of_the_mean = torch.log1p(NORMALIZATION_TARGET * share)
    assert float(((predicted - observed) ** 2).mean()) < 0.01
    assert float(((of_the_mean - observed) ** 2).mean()) > 0.5


def test_predict_broadcasts_one_condition_and_rejects_bad_shapes():
    module = PerturbedVAEModule(tiny_config())
    h = synthetic_batch("gaussian")["h"][:7]
    one_row = module.predict(h, multi_hot((2,))[0])
    torch.testing.assert_close(one_row, module.predict(h, multi_hot(*[(2,)] * 7)))
    with pytest.raises(DataError, match="perturbation rows"):
        module.predict(h, multi_hot((1,), (2,)))
    with pytest.raises(DataError, match="n_input"):
        module.predict(h[:, :5], multi_hot((1,)))
    with pytest.raises(DataError, match="n_perturbations"):
        module.predict(h, torch.zeros(7, N_PERTURBATIONS + 1))
    with pytest.raises(DataError, match="'x'"):
        module.loss({"h": h, "perturbations": multi_hot(*[()] * 7)})


def test_gene_features_make_an_unseen_gene_predictable():
    """Gene 3 never occurs in training; its features resemble gene 2's, so it inherits a similar effect."""
    torch.manual_seed(0)
    features = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0.9, 0.1]])
    config = tiny_config(gene_feature_dim=4)
    module = PerturbedVAEModule(config, gene_features=features)
    batch = synthetic_batch("gaussian")
    seen = batch["perturbations"][:, 3] == 0
    batch = {key: value[seen] for key, value in batch.items()}
    train(module, batch, steps=600, warmup=300)
    assert module.effect_vectors()[3].abs().sum() > 0
    control = batch["h"][batch["perturbations"].sum(1) == 0]
    baseline = module.predict(control, multi_hot(())).mean(0)
    unseen_delta = module.predict(control, multi_hot((3,))).mean(0) - baseline
    assert unseen_delta.abs().max() > 0.1
    assert unseen_delta[6:9].mean() > unseen_delta[:6].abs().mean()  # the genes gene 2 moves


def test_gene_features_must_match_the_config():
    with pytest.raises(ConfigError, match="gene_features"):
        PerturbedVAEModule(tiny_config(gene_feature_dim=4))
    with pytest.raises(ConfigError, match="shape"):
        PerturbedVAEModule(tiny_config(gene_feature_dim=4), gene_features=torch.zeros(3, 4))
    with pytest.raises(ConfigError, match="gene_feature_dim"):
        PerturbedVAEModule(tiny_config(), gene_features=torch.zeros(N_PERTURBATIONS, 4))


@pytest.mark.parametrize("likelihood", ["gaussian", "nb"])
def test_sampled_predictions_vary_around_the_expectation(likelihood):
    module = PerturbedVAEModule(tiny_config(likelihood=likelihood))
    batch = synthetic_batch(likelihood)
    module.initialize_from_data(batch["x"])  # expectations at the data's scale, mostly away from the clip at 0
    h, rows = batch["h"][:8], multi_hot((1,)).expand(8, -1)
    expected = module.predict(h, rows)
    torch.manual_seed(0)
    first = module.predict(h, rows, sample=True)
    torch.manual_seed(0)
    assert torch.equal(first, module.predict(h, rows, sample=True))  # seeded draws reproduce
    assert first.shape == expected.shape and torch.isfinite(first).all() and (first >= 0).all()
    assert not torch.allclose(first, expected)
    if likelihood == "nb":  # a sampled cell is normalized like the data: expm1 sums to 1e4
        torch.testing.assert_close(torch.expm1(first).sum(-1), torch.full((8,), NORMALIZATION_TARGET), rtol=1e-3, atol=1.0)
    else:  # Gaussian draws (latent and likelihood noise) average close to the expectation where it is not clipped
        torch.manual_seed(1)
        many = torch.stack([module.predict(h, rows, sample=True) for _ in range(400)]).mean(0)
        away_from_zero = expected > 1.0
        assert away_from_zero.any()
        error_of_average = (many - expected)[away_from_zero].abs().mean()
        # averaging removes the draw noise; what is left is the decoder's curvature over the latent noise
        assert error_of_average < 0.5 * (first - expected)[away_from_zero].abs().mean()


def test_standardized_inputs_reach_the_encoder_centred_and_scaled():
    """The standardizing head reads h as a plain head with the same weights reads (h - mean) / std."""
    torch.manual_seed(0)
    h = 2.0 + 0.05 * torch.randn(40, N_GENES)  # the frozen-embedding shape: large means, small spread
    h[:, 0] = 1.5  # a constant dimension passes as 0, not NaN
    standardizing = PerturbedVAEModule(tiny_config(standardize_inputs=True)).eval()
    plain = PerturbedVAEModule(tiny_config()).eval()
    plain.load_state_dict({k: v for k, v in standardizing.state_dict().items() if not k.startswith("input_")})
    standardizing.initialize_inputs_from_data(h)
    torch.testing.assert_close(standardizing.input_mean, h.mean(0))
    torch.testing.assert_close(standardizing.input_scale[1:], h.std(0)[1:])
    expected = plain.inference((h - h.mean(0)) / h.std(0).clamp_min(1e-6)).qz_mean
    found = standardizing.inference(h).qz_mean
    assert torch.isfinite(found).all()
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(found, plain.inference(h).qz_mean, atol=1e-3)


def test_inputs_are_not_standardized_unless_asked():
    module = PerturbedVAEModule(tiny_config())
    assert not any(name.startswith("input_") for name in module.state_dict())
    with pytest.raises(ConfigError, match="standardize_inputs"):
        module.initialize_inputs_from_data(torch.randn(5, N_GENES))
    with pytest.raises(ConfigError, match="true or false"):
        tiny_config(standardize_inputs="yes")
