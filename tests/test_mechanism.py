"""The "mechanism" composition: interventions that change a latent SCM's mechanisms, anchored on measured singles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturbedvae.errors import ConfigError
from perturbedvae.evaluate.invariance import alignment_null, condition_probe
from perturbedvae.model import PerturbedVAEConfig, PerturbedVAEHead, PerturbedVAEModule
from perturbedvae.model.alignment import condition_alignment_penalty
from perturbedvae.model.mechanism import MechanismEffects, MechanismEnsemble, solve_scm, varimax_rotation
from tests.test_model import N_GENES, N_PERTURBATIONS, multi_hot, synthetic_batch, tiny_config


def mechanism_config(**overrides):
    return tiny_config(composition="mechanism", **overrides)


def test_solve_satisfies_the_intervened_structural_equations():
    torch.manual_seed(0)
    effects = MechanismEffects(mechanism_config())
    with torch.no_grad():
        effects.graph.copy_(torch.randn(6, 6))
    shift, targets = torch.randn(5, 6), (torch.rand(5, 6) > 0.5).float()
    adjacency = effects.adjacency()
    u = solve_scm(adjacency, shift, targets)
    for j in range(6):
        expected = shift[:, j] + (1 - targets[:, j]) * (u[:, :j] @ adjacency[:j, j])
        torch.testing.assert_close(u[:, j], expected)


def test_single_gene_conditions_read_off_their_genes_response_equal_their_own_solve():
    """Only combinations (and a gene at another weight) are solved as conditions; the rest must match a direct solve."""
    torch.manual_seed(4)
    effects = MechanismEffects(mechanism_config(saturation="both", curved_programs=True, eval_mask="expected")).eval()
    with torch.no_grad():
        effects.graph.copy_(torch.randn(6, 6))
        effects.programs.copy_(torch.randn_like(effects.programs))
        effects.curvature.copy_(torch.randn_like(effects.curvature) * 0.1)
        effects.logit_table.copy_(torch.randn_like(effects.logit_table))
    rows = multi_hot((0,), (1, 2), (), (3,), (2,), (0, 1, 3))
    rows[3, 3] = 0.5  # half a dose: not the gene's own response
    output = effects(rows, deterministic=True)
    masks = effects.keep_probabilities()
    targets = 1.0 - torch.prod(1.0 - rows.ne(0).float()[:, :, None] * masks[None], dim=1)
    direct = solve_scm(effects.adjacency(), rows @ (masks * effects.effect_table), targets)
    torch.testing.assert_close(output.z_p, direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.modelled, effects.decode(direct), rtol=1e-5, atol=1e-5)
    assert output.modelled[2].abs().max() == 0 and output.modelled.abs().max() > 0.01


def _two_node_chain(cut: bool) -> MechanismEffects:
    """Gene 0 shifts node 0, gene 1 shifts node 1; edge 0 -> 1 (weight 1) when `cut`; linear programs."""
    effects = MechanismEffects(mechanism_config(n_latent=2, saturation_init=1e6, eval_mask="expected"))
    with torch.no_grad():
        effects.logit_table.fill_(-100.0)
        effects.logit_table[0, 0] = effects.logit_table[1, 1] = 100.0
        effects.effect_table.zero_()
        effects.effect_table[0, 0] = effects.effect_table[1, 1] = 1.0
        effects.graph.zero_()
        effects.graph[0, 1] = 1.0 if cut else 0.0
        effects.programs.zero_()
        effects.programs[0, 0] = effects.programs[1, 1] = 1.0
        effects.gene_scale.fill_(1.0)
    return effects.eval()


def test_an_intervention_downstream_cuts_what_the_upstream_one_does_through_it():
    """A double is the SCM solved under both interventions: B's target stops listening to A's."""
    rows = multi_hot((0,), (1,), (0, 1))
    chain = _two_node_chain(cut=True)
    single_0, single_1, double = chain(rows, deterministic=True).modelled[:, :2]
    torch.testing.assert_close(single_0, torch.tensor([1.0, 1.0]), atol=1e-4, rtol=0)  # A also moves node 1 via the edge
    torch.testing.assert_close(single_1, torch.tensor([0.0, 1.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(double, torch.tensor([1.0, 1.0]), atol=1e-4, rtol=0)  # not 1 + 1 on node 1: cut
    assert not torch.allclose(double, single_0 + single_1, atol=1e-3)
    independent = _two_node_chain(cut=False)(rows, deterministic=True).modelled[:, :2]
    torch.testing.assert_close(independent[2], independent[0] + independent[1], atol=1e-4, rtol=0)  # no edge: additive


def test_saturation_makes_same_direction_changes_add_less():
    effects = _two_node_chain(cut=False)
    with torch.no_grad():
        effects.raw_kappa.fill_(float(np.log(np.expm1(0.5))))  # κ = 1.5
        effects.programs.fill_(1.0)  # both nodes move every gene the same way
    single_0, single_1, double = effects(multi_hot((0,), (1,), (0, 1)), deterministic=True).modelled
    assert (double < single_0 + single_1 - 0.1).all()
    assert (double > torch.maximum(single_0, single_1)).all()


def test_node_saturation_saturates_perturbations_on_a_shared_node_only():
    """`saturation: nodes`: two genes on one node add less than their sum; genes on different nodes add."""
    effects = MechanismEffects(mechanism_config(n_latent=2, saturation="nodes", eval_mask="expected"))
    with torch.no_grad():
        effects.logit_table.fill_(-100.0)
        effects.logit_table[:3, 0] = 100.0  # genes 0 and 1 act on node 0 ...
        effects.logit_table[2, 0], effects.logit_table[2, 1] = -100.0, 100.0  # ... gene 2 on node 1
        effects.effect_table.fill_(1.0)
        effects.graph.zero_()
        effects.programs.fill_(1.0)  # every node moves every gene the same way: gene-level saturation would see both pairs alike
        effects.node_scale.fill_(1.0)
    shared = effects.eval()(multi_hot((0,), (1,), (0, 1)), deterministic=True).modelled
    assert (shared[2] < shared[0] + shared[1] - 0.1).all()
    apart = effects(multi_hot((0,), (2,), (0, 2)), deterministic=True).modelled
    torch.testing.assert_close(apart[2], apart[0] + apart[1], atol=1e-5, rtol=1e-5)
    assert "effects.node_scale" not in PerturbedVAEModule(mechanism_config()).state_dict()  # saved only when used
    assert "effects.node_scale" in PerturbedVAEModule(mechanism_config(saturation="nodes")).state_dict()


def test_curved_programs_bend_each_node_on_its_own_and_are_saved_only_when_used():
    """`curved_programs`: a node's change is u W + u² Q, so one node alone traces a parabola over the genes."""
    effects = MechanismEffects(mechanism_config(n_latent=2, saturation="nodes", curved_programs=True))
    with torch.no_grad():
        effects.programs.zero_()
        effects.curvature.zero_()
        effects.curvature[0] = 1.0  # only node 0 bends, the same way for every gene
        effects.node_scale.fill_(1e6)  # node saturation out of reach
    change = effects.decode(torch.tensor([[1.0, 0.0], [2.0, 0.0], [-2.0, 0.0], [0.0, 3.0]]))
    torch.testing.assert_close(change[1], 4 * change[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(change[2], change[1], rtol=1e-4, atol=1e-5)
    assert change[0].min() > 0.99 and change[3].abs().max() == 0
    assert "effects.curvature" not in PerturbedVAEModule(mechanism_config()).state_dict()
    assert "effects.curvature" in PerturbedVAEModule(mechanism_config(curved_programs=True)).state_dict()
    with pytest.raises(ConfigError, match="curved_programs needs composition mechanism"):
        tiny_config(curved_programs=True)


def test_varimax_turns_a_rotated_sparse_loading_matrix_back_to_sparse():
    generator = torch.Generator().manual_seed(2)
    sparse = torch.zeros(60, 4)
    sparse[torch.arange(60), torch.arange(60) % 4] = 1.0 + torch.rand(60, generator=generator)  # one node each
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator))
    mixed = sparse @ rotation
    found = varimax_rotation(mixed)
    torch.testing.assert_close(found.T @ found, torch.eye(4), atol=1e-5, rtol=0)
    recovered = mixed @ found
    # Up to permutation and sign, each row loads on one node again.
    dominant = recovered.abs().max(dim=1).values / recovered.abs().sum(dim=1)
    assert dominant.min() > 0.99 and mixed.abs().max(dim=1).values.div(mixed.abs().sum(dim=1)).mean() < 0.8
    torch.testing.assert_close(recovered @ found.T, mixed, atol=1e-5, rtol=0)  # the product is unchanged


def test_initial_rotation_changes_the_effects_not_their_product():
    generator = torch.Generator().manual_seed(4)
    changes = torch.randn(N_PERTURBATIONS, N_GENES, generator=generator)
    measured = torch.ones(N_PERTURBATIONS, dtype=torch.bool)
    starts = {}
    for rotation in ("none", "varimax"):
        effects = MechanismEffects(tiny_config(composition="mechanism", initial_rotation=rotation, effect_init_std=1e-12))
        effects.set_single_priors(changes, measured)
        starts[rotation] = (effects.effect_table.detach().clone(), effects.programs.detach().clone())
    (plain, plain_programs), (turned, turned_programs) = starts["none"], starts["varimax"]
    torch.testing.assert_close(plain @ plain_programs, turned @ turned_programs, atol=1e-5, rtol=1e-5)
    assert (plain - turned).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="initial_rotation"):
        tiny_config(initial_rotation="promax")


def test_predictions_are_anchored_on_measured_singles():
    torch.manual_seed(1)
    effects = MechanismEffects(mechanism_config()).eval()
    priors = torch.randn(N_PERTURBATIONS, N_GENES)
    measured = torch.tensor([True, True, True, False])
    effects.set_single_priors(priors, measured)
    rows = multi_hot((0,), (2,), (0, 1), (3,), (0, 3))
    output = effects(rows, deterministic=True)
    change = effects.predicted_change(rows)
    torch.testing.assert_close(change[0], priors[0])
    torch.testing.assert_close(change[1], priors[2])
    singles = effects(multi_hot((0,), (1,)), deterministic=True).modelled
    torch.testing.assert_close(change[2], priors[0] + priors[1] + output.modelled[2] - singles.sum(0), atol=1e-5, rtol=1e-5)
    assert output.anchorable.tolist() == [True, True, True, False, False]
    torch.testing.assert_close(change[3], output.modelled[3])  # gene 3 has no measured single: the model alone


@pytest.mark.parametrize(
    ("likelihood", "saturation", "curved"),
    [("gaussian", "genes", False), ("nb", "genes", False), ("gaussian", "nodes", False), ("gaussian", "both", False), ("nb", "both", True)],
)
def test_mechanism_module_trains_predicts_and_round_trips(likelihood, saturation, curved, tmp_path):
    torch.manual_seed(0)
    batch = synthetic_batch(likelihood)
    controls = batch["perturbations"].sum(1) == 0
    batch = {**batch, "control_h": batch["h"][controls][:8], "control_x": batch["x"][controls][:8]}
    module = PerturbedVAEModule(mechanism_config(likelihood=likelihood, saturation=saturation, curved_programs=curved))
    output = module(batch)
    assert torch.isfinite(output.loss) and set(output.parts) >= {"reconstruction", "counterfactual", "alignment"}
    assert (output.parts["counterfactual"] > 0) == (likelihood == "gaussian")
    output.loss.backward()
    assert module.effects.raw_kappa.grad is not None and module.effects.graph.grad is not None
    assert (module.effects.curvature is not None and module.effects.curvature.grad.abs().sum() > 0) == curved
    first = module.predict(batch["h"][:4], multi_hot((0, 1)))
    torch.testing.assert_close(first, module.predict(batch["h"][:4], multi_hot((0, 1))))
    module.effects.set_single_priors(torch.randn(N_PERTURBATIONS, N_GENES), torch.tensor([True, True, False, False]))
    PerturbedVAEHead(module.config, module, [f"P{i}" for i in range(N_PERTURBATIONS)], [f"G{i}" for i in range(N_GENES)]).save_pretrained(tmp_path)
    loaded = PerturbedVAEHead.from_pretrained(tmp_path).module
    torch.testing.assert_close(loaded.predict(batch["h"][:4], multi_hot((0, 1))), module.predict(batch["h"][:4], multi_hot((0, 1))))


@pytest.mark.parametrize("likelihood", ["gaussian", "nb"])
def test_singles_misfit_is_weighted_by_the_likelihoods_curvature(likelihood):
    """f({g}) must match each measured single Δ_g, each squared error weighted by the likelihood's curvature in the offset."""
    torch.manual_seed(3)
    batch = synthetic_batch(likelihood)
    module = PerturbedVAEModule(mechanism_config(likelihood=likelihood)).eval()
    module.effects.set_single_priors(torch.randn(N_PERTURBATIONS, N_GENES), torch.ones(N_PERTURBATIONS, dtype=torch.bool))
    parts = module(batch).parts
    with torch.no_grad():
        effect = module.perturbation_effect(batch["perturbations"])
        hidden = module.decoder(module.inference(batch["h"]).qz_mean)
        output = module.likelihood_head(hidden, batch["library_size"], module.effects.predicted_change(batch["perturbations"]))
        single = batch["perturbations"].sum(1) == 1
        squared = ((effect.modelled - effect.anchored)[single] ** 2 * output.offset_precision(single)).sum()
        expected = -output.cell_log_prob(batch["x"]).mean() + squared / (2 * len(batch["x"]))
    assert squared > 1.0  # the misfit is a real part of the term
    torch.testing.assert_close(parts["reconstruction"], expected, rtol=1e-5, atol=1e-5)


def _members_as_single_heads(ensemble: PerturbedVAEModule) -> list[PerturbedVAEModule]:
    """One single-member head per ensemble member: the ensemble's shared weights plus that member's mechanism."""
    heads = []
    for member in ensemble.effects.members:
        head = PerturbedVAEModule(PerturbedVAEConfig(**{**ensemble.config.to_dict(), "effect_members": 1})).eval()
        shared = {key: value for key, value in ensemble.state_dict().items() if not key.startswith("effects.")}
        head.load_state_dict({**shared, **{f"effects.{key}": value for key, value in member.state_dict().items()}})
        heads.append(head)
    return heads


@pytest.mark.parametrize("likelihood", ["gaussian", "nb"])
def test_effect_members_are_separate_fits_whose_mean_change_predicts(likelihood):
    """The loss is the mean of each member's own loss (not the loss of their mean), and a prediction uses their mean change."""
    torch.manual_seed(4)
    batch = synthetic_batch(likelihood)
    controls = batch["perturbations"].sum(1) == 0
    batch = {**batch, "control_h": batch["h"][controls][:8], "control_x": batch["x"][controls][:8]}
    ensemble = PerturbedVAEModule(mechanism_config(likelihood=likelihood, effect_members=3)).eval()
    assert isinstance(ensemble.effects, MechanismEnsemble) and len(ensemble.effects.members) == 3
    ensemble.set_single_priors(torch.randn(N_PERTURBATIONS, N_GENES), torch.tensor([True, True, True, False]))
    members = ensemble.effects.members
    assert not torch.equal(members[0].effect_table, members[1].effect_table)  # each starts with its own noise
    with torch.no_grad():
        for index, member in enumerate(members):  # members far apart, so a mix-up shows
            member.programs.mul_(1.0 + index)
            member.raw_kappa.add_(float(index))
    heads = _members_as_single_heads(ensemble)
    parts = ensemble(batch).parts
    for name in ("reconstruction", "counterfactual", "sparsity", "dag"):
        torch.testing.assert_close(parts[name], torch.stack([head(batch).parts[name] for head in heads]).mean(), rtol=1e-5, atol=1e-6)
    rows = multi_hot((0, 1), (3,), (0, 2))
    changes = [head.effects.predicted_change(rows) for head in heads]
    assert (changes[0] - changes[2]).abs().max() > 0.1
    torch.testing.assert_close(ensemble.effects.predicted_change(rows), torch.stack(changes).mean(0))
    h = batch["h"][:3]
    if likelihood == "gaussian":  # the change is an offset of the mean: the prediction is the members' mean prediction
        torch.testing.assert_close(ensemble.predict(h, rows), torch.stack([head.predict(h, rows) for head in heads]).mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ensemble.mask_probabilities(), heads[0].mask_probabilities())  # views are member 0's


def test_effect_members_save_and_load_and_one_member_keeps_the_old_keys(tmp_path):
    torch.manual_seed(5)
    assert "effects.effect_table" in PerturbedVAEModule(mechanism_config()).state_dict()
    module = PerturbedVAEModule(mechanism_config(effect_members=2)).eval()
    assert {"effects.members.0.effect_table", "effects.members.1.effect_table"} <= set(module.state_dict())
    module.set_single_priors(torch.randn(N_PERTURBATIONS, N_GENES), torch.ones(N_PERTURBATIONS, dtype=torch.bool))
    PerturbedVAEHead(module.config, module, [f"P{i}" for i in range(N_PERTURBATIONS)], [f"G{i}" for i in range(N_GENES)]).save_pretrained(tmp_path)
    loaded = PerturbedVAEHead.from_pretrained(tmp_path).module
    h, rows = synthetic_batch("gaussian")["h"][:2], multi_hot((0, 1), (2,))
    torch.testing.assert_close(loaded.predict(h, rows), module.predict(h, rows))


@pytest.mark.parametrize("members", [1, 3])
def test_a_batch_of_controls_only_has_no_change_and_no_mechanism_penalty(members):
    torch.manual_seed(6)
    module = PerturbedVAEModule(mechanism_config(effect_members=members))
    module.set_single_priors(torch.randn(N_PERTURBATIONS, N_GENES), torch.ones(N_PERTURBATIONS, dtype=torch.bool))
    batch = synthetic_batch("gaussian")
    controls = {**batch, "perturbations": torch.zeros_like(batch["perturbations"])}
    outputs = module.effects.member_outputs(controls["perturbations"], deterministic=False)
    assert outputs.condition_modelled.shape == (members, 1, N_GENES) and not outputs.condition_modelled.any()
    parts = module(controls).parts
    assert float(parts["sparsity"]) == 0.0 and torch.isfinite(parts["reconstruction"])
    torch.testing.assert_close(module.effects.predicted_change(controls["perturbations"][:4]), torch.zeros(4, N_GENES))


def test_effect_members_need_the_mechanism_composition():
    with pytest.raises(ConfigError, match="effect_members > 1 needs composition mechanism"):
        tiny_config(effect_members=2)
    with pytest.raises(ConfigError, match="effect_members"):
        mechanism_config(effect_members=0)


def test_reference_controls_enter_the_counterfactual_and_alignment_as_their_own_encoding_and_decoding():
    """Encoded and decoded in one pass with the batch, the reference controls still give the terms' definitions."""
    torch.manual_seed(1)
    batch = synthetic_batch("gaussian")
    controls = batch["perturbations"].sum(1) == 0
    # Shifted, so that no reference control equals a batch cell and a mixed-up slice shows.
    reference_h, reference_x = batch["h"][controls][:8] + 0.5, batch["x"][controls][:8] + 0.1
    module = PerturbedVAEModule(mechanism_config(alignment="mmd_per_condition")).eval()
    parts = module({**batch, "control_h": reference_h, "control_x": reference_x}).parts
    torch.testing.assert_close(parts["reconstruction"], module(batch).parts["reconstruction"])
    with torch.no_grad():
        reference = module.inference(reference_h).qz_mean
        decoded = module.likelihood_head(module.decoder(reference)).mean.mean(0)
        change = module.effects.predicted_change(batch["perturbations"])
        precision = torch.exp(-module.likelihood_head.clamped_log_variance())
        _, group = torch.unique(batch["perturbations"], dim=0, return_inverse=True)
        squared = sum(
            (group == label).sum() * ((batch["x"][group == label].mean(0) - decoded - change[group == label].mean(0)) ** 2 * precision).sum()
            for label in group.unique()
        )
        squared = squared + len(reference_x) * ((reference_x.mean(0) - decoded) ** 2 * precision).sum()
        torch.testing.assert_close(parts["counterfactual"], squared / (2 * len(batch["x"])), rtol=1e-4, atol=1e-6)
        points = torch.cat([module.inference(batch["h"]).qz_mean, reference])
        flags = torch.cat([controls, torch.ones(len(reference), dtype=torch.bool)])
        labels = torch.cat([group, group.new_zeros(len(reference))])
        torch.testing.assert_close(parts["alignment"], condition_alignment_penalty(points, flags, labels), rtol=1e-4, atol=1e-7)


def test_calibration_makes_decoded_controls_average_their_observed_mean():
    torch.manual_seed(2)
    batch = synthetic_batch("gaussian")
    controls = batch["perturbations"].sum(1) == 0
    module = PerturbedVAEModule(mechanism_config())
    module.calibrate_controls(batch["h"][controls], batch["x"][controls])
    predicted = module.predict(batch["h"][controls], multi_hot(()))
    torch.testing.assert_close(predicted.mean(0), batch["x"][controls].mean(0), atol=1e-5, rtol=1e-5)


def test_condition_probe_and_alignment_null():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    separable = rng.normal(size=(200, 3)) + labels[:, None] * 3.0
    mixed = rng.normal(size=(200, 3))
    assert condition_probe(separable, labels).balanced_accuracy > 0.95
    probe = condition_probe(mixed, labels)
    assert probe.chance == 0.25 and probe.balanced_accuracy < 0.45
    control = labels == 0
    assert alignment_null(separable, control, n_permutations=30).p_value < 0.05
    assert alignment_null(mixed, control, n_permutations=30).p_value > 0.05


def test_alignment_penalties_read_a_given_kernel_as_they_compute_one():
    """The permutation null reuses one kernel matrix; each penalty must equal its own computation."""
    from perturbedvae.model.alignment import (
        alignment_penalty,
        condition_alignment_penalty,
        gaussian_kernel,
        median_scale,
    )

    generator = torch.Generator().manual_seed(3)
    z = torch.randn(90, 4, generator=generator)
    condition = torch.randint(0, 5, (90,), generator=generator)
    kernel = gaussian_kernel(z, z, median_scale(z))
    for order in (torch.arange(90), torch.randperm(90, generator=generator)):
        is_control = condition[order] == 0
        torch.testing.assert_close(
            alignment_penalty(z, is_control, adaptive=True, kernel=kernel), alignment_penalty(z, is_control, adaptive=True)
        )
        torch.testing.assert_close(
            condition_alignment_penalty(z, is_control, condition[order], kernel=kernel),
            condition_alignment_penalty(z, is_control, condition[order]),
        )


def test_per_condition_alignment_null_sees_conditions_that_split_the_control_cloud():
    """Two conditions, each one half of the control distribution: pooled they look like controls, apart they do not."""
    rng = np.random.default_rng(1)
    control = rng.normal(size=(120, 2))
    perturbed = rng.normal(size=(240, 2))
    halves = np.where(perturbed[:, 0] < 0, "A", "B")
    z = np.vstack([control, perturbed])
    is_control = np.arange(len(z)) < len(control)
    conditions = np.concatenate([np.full(len(control), "control"), halves])
    assert alignment_null(z, is_control, n_permutations=30, seed=0).p_value > 0.05
    per_condition = alignment_null(z, is_control, n_permutations=30, seed=0, conditions=conditions)
    assert per_condition.p_value < 0.05 and per_condition.mmd > per_condition.null_95


def test_latent_diagnostics_skip_the_probe_when_conditions_have_too_few_cells(monkeypatch):
    """A screen with thousands of conditions puts few cells of each into the sample: no probe, no crash."""
    from types import SimpleNamespace

    from perturbedvae.api import diagnostics

    n_cells = 40
    conditions = np.array(["control"] * 10 + [f"G{i}" for i in range(30)])  # 30 conditions of one cell each
    datamodule = SimpleNamespace(
        train_cells=np.arange(n_cells),
        control_inputs=lambda cells: {"h": torch.randn(len(cells), N_GENES)},
        data=SimpleNamespace(conditions=conditions),
    )
    found = diagnostics.latent_diagnostics(PerturbedVAEModule(mechanism_config()), datamodule, seed=0)
    assert "probe_balanced_accuracy" not in found and 0.0 <= found["mask_density"] <= 1.0
