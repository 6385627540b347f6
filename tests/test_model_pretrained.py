"""The shareable checkpoint directory: round trip, damaged files, and the perturbation vocabulary."""

from __future__ import annotations

import json

import pytest
import torch

from perturbedvae.errors import CheckpointError, ConditionError, ConfigError
from perturbedvae.model import PerturbedVAEConfig, PerturbedVAEHead, PerturbedVAEModule
from perturbedvae.model.pretrained import CONFIG_FILE, GENE_FEATURES_FILE, VOCAB_FILE, WEIGHTS_FILE

PERTURBATION_GENES = ["KLF1", "CEBPA", "CEBPB", "SET"]
GENE_NAMES = [f"gene{i}" for i in range(9)]


def build(likelihood: str = "gaussian", with_features: bool = False, standardize_inputs: bool = False) -> PerturbedVAEHead:
    torch.manual_seed(0)
    config = PerturbedVAEConfig(
        n_input=6,
        n_genes=len(GENE_NAMES),
        n_perturbations=len(PERTURBATION_GENES),
        n_latent=4,
        n_hidden=16,
        n_layers=1,
        likelihood=likelihood,
        gene_feature_dim=5 if with_features else None,
        standardize_inputs=standardize_inputs,
    )
    features = torch.randn(len(PERTURBATION_GENES), 5) if with_features else None
    module = PerturbedVAEModule(config, gene_features=features)
    with torch.no_grad():  # as if trained: a non-trivial DAG and interaction
        module.effects.causal.weight.normal_()
        module.effects.interaction.output.weight.normal_()
    if standardize_inputs:
        module.initialize_inputs_from_data(3.0 + 0.1 * torch.randn(20, 6))
    return PerturbedVAEHead(config, module, PERTURBATION_GENES, GENE_NAMES)


CONDITIONS = [[], ["KLF1"], ["CEBPA", "KLF1"], ["CEBPB", "SET", "CEBPA"]]


def predictions(model: PerturbedVAEHead) -> torch.Tensor:
    h = torch.randn(len(CONDITIONS), 6, generator=torch.Generator().manual_seed(1))
    return model.module.predict(h, model.perturbation_matrix(CONDITIONS))


@pytest.mark.parametrize("likelihood, with_features, standardize_inputs",
                         [("gaussian", False, False), ("nb", False, False), ("gaussian", True, False), ("gaussian", False, True)])
def test_round_trip_gives_identical_predictions(tmp_path, likelihood, with_features, standardize_inputs):
    model = build(likelihood, with_features, standardize_inputs)
    model.save_pretrained(tmp_path / "head")
    expected_files = {CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE} | ({GENE_FEATURES_FILE} if with_features else set())
    assert {path.name for path in (tmp_path / "head").iterdir()} == expected_files
    loaded = PerturbedVAEHead.from_pretrained(tmp_path / "head")
    assert loaded.config == model.config
    assert loaded.perturbation_genes == PERTURBATION_GENES and loaded.gene_names == GENE_NAMES
    assert not loaded.module.training
    torch.testing.assert_close(predictions(loaded), predictions(model), rtol=0, atol=0)
    torch.testing.assert_close(loaded.module.mask_probabilities(), model.module.mask_probabilities(), rtol=0, atol=0)
    if standardize_inputs:  # the training cells' scale travels with the weights
        torch.testing.assert_close(loaded.module.input_mean, model.module.input_mean, rtol=0, atol=0)
        assert loaded.module.input_mean.abs().min() > 2.0


def test_perturbation_matrix_is_multi_hot_in_vocabulary_order():
    matrix = build().perturbation_matrix(CONDITIONS)
    assert matrix.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1]]


def test_unknown_gene_is_a_condition_error_with_close_matches():
    model = build()
    with pytest.raises(ConditionError, match=r"'KLF2' \(close matches: KLF1\)"):
        model.perturbation_matrix([["KLF1"], ["KLF2"]])
    with pytest.raises(ConditionError, match="'ZZZZ' \\(no close match\\)"):
        model.predict(torch.zeros(2, 6), ["ZZZZ"])
    with pytest.raises(ConditionError, match="list"):
        model.perturbation_matrix(["CEBPA+KLF1"])


def test_wrapper_predict_uses_gene_names():
    model = build()
    h = torch.randn(3, 6)
    by_name = model.predict(h, ["CEBPA", "KLF1"])
    by_index = model.module.predict(h, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(by_name, by_index)


def test_adding_unseen_genes_needs_gene_features(tmp_path):
    with pytest.raises(ConfigError, match="gene features"):
        build().add_perturbation_genes(["GATA1"], torch.randn(1, 5))
    model = build(with_features=True)
    model.add_perturbation_genes(["GATA1"], torch.randn(1, 5))
    assert model.perturbation_genes[-1] == "GATA1" and model.config.n_perturbations == 5
    assert model.module.effect_vectors()[-1].abs().sum() > 0
    assert not torch.equal(model.predict(torch.zeros(2, 6), ["GATA1"]), model.predict(torch.zeros(2, 6), []))
    model.save_pretrained(tmp_path / "extended")
    loaded = PerturbedVAEHead.from_pretrained(tmp_path / "extended")
    torch.testing.assert_close(loaded.predict(torch.ones(2, 6), ["GATA1"]), model.predict(torch.ones(2, 6), ["GATA1"]))
    with pytest.raises(ConditionError, match="already"):
        model.add_perturbation_genes(["KLF1"], torch.randn(1, 5))


def test_vocabularies_must_match_the_config():
    model = build()
    with pytest.raises(ConfigError, match="perturbation_genes"):
        PerturbedVAEHead(model.config, model.module, PERTURBATION_GENES[:3], GENE_NAMES)
    with pytest.raises(ConfigError, match="more than once"):
        PerturbedVAEHead(model.config, model.module, ["A", "A", "B", "C"], GENE_NAMES)


@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "head"
    build(with_features=True).save_pretrained(directory)
    return directory


def test_missing_directory_and_files_are_checkpoint_errors(tmp_path, saved):
    with pytest.raises(CheckpointError, match="not a directory"):
        PerturbedVAEHead.from_pretrained(tmp_path / "nowhere")
    for name in (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE, GENE_FEATURES_FILE):
        content = (saved / name).read_bytes()
        (saved / name).unlink()
        with pytest.raises(CheckpointError, match=name):
            PerturbedVAEHead.from_pretrained(saved)
        (saved / name).write_bytes(content)
    PerturbedVAEHead.from_pretrained(saved)  # intact again


@pytest.mark.parametrize("name", [WEIGHTS_FILE, GENE_FEATURES_FILE])
def test_truncated_or_garbage_weights_are_checkpoint_errors(saved, name):
    content = (saved / name).read_bytes()
    (saved / name).write_bytes(content[: len(content) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        PerturbedVAEHead.from_pretrained(saved)
    (saved / name).write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        PerturbedVAEHead.from_pretrained(saved)


def test_corrupt_json_files_are_checkpoint_errors(saved):
    (saved / CONFIG_FILE).write_text("{broken")
    with pytest.raises(CheckpointError, match="config"):
        PerturbedVAEHead.from_pretrained(saved)


def test_vocab_without_lists_is_a_checkpoint_error(saved):
    (saved / VOCAB_FILE).write_text(json.dumps({"perturbation_genes": "KLF1"}))
    with pytest.raises(CheckpointError, match="lists"):
        PerturbedVAEHead.from_pretrained(saved)


def test_config_that_does_not_match_the_weights_is_a_checkpoint_error(saved):
    values = json.loads((saved / CONFIG_FILE).read_text())
    (saved / CONFIG_FILE).write_text(json.dumps({**values, "n_hidden": 32}))
    with pytest.raises(CheckpointError, match="does not match"):
        PerturbedVAEHead.from_pretrained(saved)
    (saved / CONFIG_FILE).write_text(json.dumps({**values, "n_latnet": 4}))
    with pytest.raises(CheckpointError, match="n_latnet"):
        PerturbedVAEHead.from_pretrained(saved)


def test_vocabulary_that_does_not_match_the_config_is_a_checkpoint_error(saved):
    vocab = json.loads((saved / VOCAB_FILE).read_text())
    vocab["gene_names"] = vocab["gene_names"][:-1]
    (saved / VOCAB_FILE).write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match="gene_names"):
        PerturbedVAEHead.from_pretrained(saved)
