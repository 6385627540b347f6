"""What a trained `pv.PerturbedVAE` learned, read through its methods: latents, masks, effects, gene programs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

import perturbedvae as pv
from perturbedvae.api.latents import ACTIVE_MASK_PROBABILITY
from perturbedvae.errors import ConfigError
from perturbedvae.train.datamodule import multi_hot
from perturbedvae.train.representation import head_of
from tests.conftest import make_toy_adata

N_LATENT = 4


@pytest.fixture(scope="module")
def model() -> pv.PerturbedVAE:
    data = pv.load_dataset(make_toy_adata(cells_per_condition=30))
    split = pv.splits.doubles(data, seed=1)
    trained = pv.PerturbedVAE(data, split, representation={"kind": "expression", "n_components": 10}, n_latent=N_LATENT,
                              n_hidden=16).train(max_epochs=2)
    yield trained
    AcceleratorState._reset_state(reset_partial_state=True)


def _by_hand_latent(model: pv.PerturbedVAE, cells: np.ndarray) -> np.ndarray:
    """The head's encoder on the representation rows: q(z_inv | h)'s mean, from the layers themselves."""
    head = head_of(model.state.predictor).eval()
    h = torch.from_numpy(np.asarray(model.state.datamodule.representation.matrix[cells], dtype=np.float32))
    with torch.no_grad():
        return head.qz_mean(head.encoder(h)).numpy()


def test_the_control_cells_latent_is_what_the_heads_encoder_gives(model) -> None:
    controls = model.state.controls
    head = head_of(model.state.predictor).train()
    latent = model.latent_representation(controls)
    assert head.training, "the call leaves the module in the mode it found it"
    assert latent.shape == (len(controls), N_LATENT)
    np.testing.assert_allclose(latent, _by_hand_latent(model, controls), rtol=1e-5, atol=1e-6)
    assert model.latent_representation().shape == (model.data.adata.n_obs, N_LATENT)  # default: every cell


def test_the_shifted_latent_adds_each_cells_own_perturbation_shift(model) -> None:
    conditions = model.data.conditions
    cells = np.concatenate([np.flatnonzero(conditions == name)[:5] for name in ("control", "G0", "G0+G1")])
    invariant = model.latent_representation(cells)
    shift = model.latent_representation(cells, shifted=True) - invariant
    np.testing.assert_allclose(shift[:5], 0.0, atol=1e-6)  # a control cell has no perturbation
    head = head_of(model.state.predictor)
    for block, name in ((slice(5, 10), "G0"), (slice(10, 15), "G0+G1")):
        perturbation = torch.from_numpy(multi_hot([name], model.perturbation_genes))
        with torch.no_grad():
            expected = head.perturbation_effect(perturbation, deterministic=True).z_p.numpy()
        np.testing.assert_allclose(shift[block], np.repeat(expected, 5, axis=0), rtol=1e-5, atol=1e-6)
    assert np.abs(shift[5:]).max() > 0, "a trained perturbation moves the latent"


def test_masks_effects_and_gene_programs_are_labelled_by_gene_and_dimension(model) -> None:
    masks, effects = model.mask_probabilities(), model.effect_vectors()
    assert list(masks.index) == list(effects.index) == model.perturbation_genes == ["G0", "G1", "G2"]
    assert masks.shape == effects.shape == (3, N_LATENT)
    assert ((masks.to_numpy() >= 0) & (masks.to_numpy() <= 1)).all()
    programs = model.gene_programs()
    assert list(programs.index) == list(range(N_LATENT)) and list(programs.columns) == model.genes
    head = head_of(model.state.predictor)
    unit = torch.zeros(1, N_LATENT)
    unit[0, 2] = 1.0
    with torch.no_grad():  # mechanism design: a program is the decoded unit response of its latent node
        np.testing.assert_allclose(programs.loc[2], head.effects.decode(unit)[0].double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(model.gene_programs([2]).loc[2], programs.loc[2])
    with pytest.raises(ConfigError, match="latent dimensions are 0 to 3"):
        model.gene_programs([N_LATENT])
    with pytest.raises(ConfigError, match="row numbers"):
        model.latent_representation([model.data.adata.n_obs])


def test_latent_views_gather_the_same_numbers_for_a_report(model) -> None:
    views = model.latent_views(n_cells=40, max_programs=2, seed=3)
    again = model.latent_views(n_cells=40, max_programs=2, seed=3)
    np.testing.assert_array_equal(views.invariant, again.invariant)
    assert views.invariant.shape == views.shifted.shape == (40, N_LATENT) and len(views.conditions) == 40
    every_cell = np.arange(model.data.adata.n_obs)  # every toy condition is predictable: all are candidates
    rows = np.sort(np.random.default_rng(3).choice(every_cell, 40, replace=False))
    np.testing.assert_allclose(views.invariant, model.latent_representation(rows), rtol=1e-6)
    np.testing.assert_allclose(views.shifted, model.latent_representation(rows, shifted=True), rtol=1e-6, atol=1e-7)
    active = views.masks.columns[views.masks.max() >= ACTIVE_MASK_PROBABILITY]
    assert set(views.programs.index) <= set(active) and len(views.programs) == min(2, len(active))
    np.testing.assert_allclose(views.programs.to_numpy(), model.gene_programs(list(views.programs.index)).to_numpy())
    table = views.program_table(4)
    assert list(table.columns) == ["latent dim", "perturbations (effect)", "top up genes", "top down genes"]


def test_an_untrained_model_says_to_train_first() -> None:
    data = pv.load_dataset(make_toy_adata())
    with pytest.raises(ConfigError, match="not trained yet"):
        pv.PerturbedVAE(data, pv.splits.doubles(data, seed=1)).latent_representation()
