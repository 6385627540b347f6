"""`model.initial_effects: latent_shifts`: the mechanism head's effects start at the singles' shifts in a VAE's latent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from perturbedvae.data.loading import load_dataset
from perturbedvae.data.splits import make_split
from perturbedvae.data.synthetic import SimulationConfig, simulate
from perturbedvae.errors import ConfigError, DataError
from perturbedvae.evaluate.identifiability import mean_correlation_coefficient
from perturbedvae.model import PerturbedVAEModule
from perturbedvae.model.mechanism import varimax_rotation
from perturbedvae.model.shift_vae import whitened_shifts
from perturbedvae.train.config import ExperimentConfig
from perturbedvae.train.datamodule import PerturbationDataModule, dense_rows
from perturbedvae.train import latent_shifts
from perturbedvae.train.latent_shifts import latent_shift_effects
from perturbedvae.train.representation import build_representation
from tests.test_model import N_GENES, N_PERTURBATIONS, tiny_config

# Each perturbation moves exactly one of 3 latent dimensions by a large shift: the VAE must find them.
SIMULATION = dict(n_genes=60, n_latent=3, n_perturbations=24, n_combinations=4, cells_per_condition=30,
                  n_control_cells=300, mask_prob=0.0, effect_scale=3.0, decoder_hidden=32, seed=0)


def test_whitened_shifts_undo_a_linear_mixing_of_the_controls_spread():
    generator = torch.Generator().manual_seed(0)
    true_shifts = torch.tensor([[2.0, 0.0, 0.0], [0.0, -1.5, 0.0], [1.0, 0.0, 1.0]])
    group = torch.cat([torch.full((4000,), -1), torch.arange(3).repeat_interleave(4000)])
    state = torch.randn(len(group), 3, generator=generator)
    state[group >= 0] += true_shifts[group[group >= 0]]
    mixing = torch.tensor([[2.0, 0.5, 0.0], [0.0, 0.3, 0.1], [1.0, 0.0, 4.0]])
    shifts = whitened_shifts(state @ mixing, group < 0, group, n_groups=4)
    # Whitened coordinates are the true ones up to a rotation: the shifts' inner products are the truth's.
    torch.testing.assert_close(shifts[:3] @ shifts[:3].T, true_shifts @ true_shifts.T, atol=0.15, rtol=0.05)
    assert shifts[3].abs().max() == 0  # a group without cells
    unwhitened = (true_shifts @ mixing) @ (true_shifts @ mixing).T
    assert (unwhitened - true_shifts @ true_shifts.T).abs().max() > 1.0  # the mixing did distort them


@pytest.fixture(scope="module")
def screen():
    """A simulated screen's data module (training cells of a doubles split) and its truth."""
    data = load_dataset(simulate(SimulationConfig(**SIMULATION)))
    split = make_split(data, "doubles", seed=1)
    train_cells = np.flatnonzero(np.isin(data.conditions, split.train))
    config = ExperimentConfig.from_dict({"data": {"synthetic": SIMULATION}, "representation": {"kind": "expression", "n_components": 10}})
    representation = build_representation(config.representation, data, train_cells)
    return PerturbationDataModule.build(data, split, representation, "nb"), data.adata.uns["ground_truth"]


def _targets(datamodule: PerturbationDataModule, cells: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(dense_rows(datamodule.target, cells))


def _head_config(datamodule: PerturbationDataModule):
    return tiny_config(n_input=datamodule.representation.dim, n_genes=len(datamodule.data.genes),
                       n_perturbations=len(datamodule.perturbation_genes), n_latent=3, likelihood="nb",
                       composition="mechanism", initial_effects="latent_shifts")


def test_latent_shifts_recover_the_simulated_dimensions_and_leave_other_draws_alone(screen):
    datamodule, truth = screen
    torch.set_num_threads(1)
    genes = datamodule.perturbation_genes
    conditions = datamodule.data.conditions
    cells = datamodule.train_cells[conditions[datamodule.train_cells] != genes[0]]  # genes[0]'s single left out
    before = torch.random.get_rng_state()
    shifts = latent_shift_effects(datamodule, cells, _targets(datamodule, cells), _head_config(datamodule), seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)  # the head's own draws stay as they were
    measured = np.isin(genes, conditions[cells])
    assert measured.sum() >= 20 and not measured[0]
    assert shifts[0].abs().max() == 0 and shifts[torch.from_numpy(measured)].norm(dim=1).min() > 0
    rows = [list(truth["perturbations"]).index(gene) for gene in np.array(genes)[measured]]
    true_shifts = (np.asarray(truth["masks"]) * np.asarray(truth["effects"]))[rows]
    found = shifts[torch.from_numpy(measured)].double()
    mcc, _ = mean_correlation_coefficient(true_shifts, (found @ varimax_rotation(found)).numpy())
    assert mcc > 0.9, mcc


def test_latent_shifts_repeat_with_their_seed(screen, monkeypatch):
    datamodule, _ = screen
    monkeypatch.setattr(latent_shifts, "SHIFT_VAE_STEPS", 100)
    first, again, other = (latent_shift_effects(datamodule, datamodule.train_cells, _targets(datamodule, datamodule.train_cells),
                                                _head_config(datamodule), seed=seed)
                           for seed in (0, 0, 1))
    torch.testing.assert_close(again, first)
    assert (other - first).abs().max() > 1e-3


def test_latent_shifts_need_control_cells(screen):
    datamodule, _ = screen
    perturbed = datamodule.train_cells[datamodule.data.conditions[datamodule.train_cells] != "control"]
    with pytest.raises(DataError, match="control cells"):
        latent_shift_effects(datamodule, perturbed, _targets(datamodule, perturbed), _head_config(datamodule), seed=0)


@pytest.mark.parametrize("members", [1, 2])
def test_given_initial_effects_start_the_table_with_programs_fitted_to_the_singles(members):
    generator = torch.Generator().manual_seed(3)
    given = torch.randn(N_PERTURBATIONS, 6, generator=generator)
    programs = torch.randn(6, N_GENES, generator=generator)
    measured = torch.tensor([True, True, True, False])
    config = tiny_config(composition="mechanism", effect_init_std=1e-12, effect_members=members)
    module = PerturbedVAEModule(config)
    module.set_single_priors(given @ programs, measured, initial_effects=given)
    for effects in module.effects.members if members > 1 else [module.effects]:
        start = effects.effect_table.detach()
        assert start[3].abs().max() < 1e-9  # no single measured: no start
        scale = start[:3].norm() / given[:3].norm()
        torch.testing.assert_close(start[:3], given[:3] * scale, atol=1e-5, rtol=1e-5)  # the given effects, resized
        fitted = start[:3] @ effects.programs.detach()
        torch.testing.assert_close(fitted, (given @ programs)[:3] / config.saturation_init, atol=1e-4, rtol=1e-4)


def test_initial_effects_is_checked():
    with pytest.raises(ConfigError, match="initial_effects"):
        tiny_config(composition="mechanism", initial_effects="pca")
    with pytest.raises(ConfigError, match="initial_effects needs composition mechanism"):
        tiny_config(initial_effects="latent_shifts")
