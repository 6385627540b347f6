"""Adapter cards: the shipped cards validate, bad cards fail with a ConfigError naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from perturbedvae.encoders import load_card, load_encoder
from perturbedvae.encoders.cards import KINDS, VOCAB_DIR_ENV
from perturbedvae.errors import CheckpointError, ConfigError
from tests.conftest import REPO, VOCAB_DIR

CARDS = sorted((REPO / "adapters").glob("*.yaml"))


def test_one_shipped_card_per_family():
    assert {path.stem for path in CARDS} == {"geneformer-v1", "geneformer-v2", "scgpt", "huggingface", "precomputed", "expression"}
    assert {load_card(path).kind for path in CARDS} == set(KINDS)


@pytest.mark.parametrize("path", CARDS, ids=lambda path: path.stem)
def test_shipped_card_vocabularies_resolve(path, monkeypatch):
    monkeypatch.setenv(VOCAB_DIR_ENV, str(VOCAB_DIR))
    card = load_card(path)
    for role, file in card.vocab_files.items():
        assert file.parent.parent == VOCAB_DIR
        if card.kind != "huggingface":  # its mapping is the user's own file
            assert card.vocab_file(role).is_file()


def test_geneformer_cards_say_what_geneformer_does(monkeypatch):
    v1, v2 = load_card(REPO / "adapters/geneformer-v1.yaml"), load_card(REPO / "adapters/geneformer-v2.yaml")
    assert (v1.max_length, v2.max_length) == (2048, 4096)
    assert (v1.option("special_tokens"), v2.option("special_tokens")) == (False, True)
    assert v1.layer == v2.layer == -2 and v1.pooling == "mean"
    assert v1.lora_target_modules == ("query", "value")


def test_vocab_dir_precedence(tmp_path, monkeypatch):
    card = {"kind": "scgpt", "vocab": {"gene_vocab": "scgpt/default_gene_vocab.json"}, "vocab_dir": "from_card"}
    monkeypatch.delenv(VOCAB_DIR_ENV, raising=False)
    assert load_card(card).vocab_files["gene_vocab"] == Path("from_card/scgpt/default_gene_vocab.json")
    monkeypatch.setenv(VOCAB_DIR_ENV, str(tmp_path / "env"))
    assert load_card(card).vocab_files["gene_vocab"].parent.parent == tmp_path / "env"
    assert load_card(card, vocab_dir=tmp_path / "arg").vocab_files["gene_vocab"].parent.parent == tmp_path / "arg"


def test_card_vocab_dir_is_relative_to_the_card_file(tmp_path, monkeypatch):
    monkeypatch.delenv(VOCAB_DIR_ENV, raising=False)
    path = tmp_path / "cards" / "mine.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"kind": "scgpt", "vocab_dir": "../vocab", "vocab": {"gene_vocab": "v.json"}}))
    card = load_card(path)
    assert card.vocab_files["gene_vocab"] == path.parent / "../vocab/v.json"
    assert card.name == "mine"
    with pytest.raises(ConfigError, match="does not exist.*PERTURBEDVAE_VOCAB_DIR"):
        card.vocab_file("gene_vocab")


@pytest.mark.parametrize(
    ("card", "message"),
    [
        ({"kind": "bert"}, "kind must be one of"),
        ({"kind": "expression", "colour": "red"}, "unknown key.*colour"),
        ({"kind": "expression", "n_components": "ten"}, "n_components must be an integer"),
        ({"kind": "expression", "max_length": 0}, "positive integer"),
        ({"kind": "expression", "pooling": "sum"}, "pooling must be one of"),
        ({"kind": "expression", "min_gene_coverage": 1.5}, "fraction between 0 and 1"),
        ({"kind": "expression", "lora_target_modules": "query"}, "list of module names"),
        ({"kind": "expression", "class": "no_colon"}, "package.module:ClassName"),
        ({"kind": "precomputed"}, "needs obsm_key"),
        ({"kind": "scgpt", "tokenization": "rank_value"}, "uses tokenization 'value_binning'"),
        ({"kind": "geneformer", "vocab": {"token_dictionary": "t.pkl"}}, "vocab is missing gene_median_dictionary"),
        ({"kind": "scgpt", "vocab": {"tokens": "v.json"}}, "unknown vocab role"),
        ({"kind": "geneformer", "special_tokens": "yes"}, "special_tokens must be true/false"),
    ],
)
def test_bad_cards_raise_config_error(card, message):
    with pytest.raises(ConfigError, match=message):
        load_card(card)


def test_unreadable_card_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_card(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("kind: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_card(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- kind\n- expression\n")
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_card(tmp_path / "list.yaml")


def test_model_kinds_need_a_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="needs a model directory"):
        load_encoder(REPO / "adapters/geneformer-v1.yaml")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_encoder(REPO / "adapters/geneformer-v1.yaml", tmp_path / "nowhere")


class ConstantEncoder:
    """A user encoder implementing the protocol, loaded through `class: module:Class`."""

    name = "constant"
    hidden_size = 3

    def __init__(self, card, checkpoint):
        self.card_seen, self.checkpoint_seen = card, checkpoint

    def prepare(self, adata):
        import torch

        return {"ones": torch.ones(adata.n_obs, 3)}

    def embed(self, batch):
        return batch["ones"]

    def gene_coverage(self, genes, perturbed_genes):
        from perturbedvae.encoders.vocab import measure_coverage

        return measure_coverage(genes, perturbed_genes, genes)

    def gene_embeddings(self, genes):
        return None

    def trainable_module(self):
        return None


class NotAnEncoder:
    def __init__(self, card, checkpoint):
        pass


def test_user_class_from_card(tmp_path):
    encoder = load_encoder({"kind": "expression", "class": "tests.test_adapter_cards:ConstantEncoder", "name": "mine"}, tmp_path)
    assert isinstance(encoder, ConstantEncoder)
    assert encoder.checkpoint_seen == tmp_path and encoder.card.name == "mine"
    assert len(encoder.fingerprint) == 16
    with pytest.raises(ConfigError, match="does not implement the CellEncoder protocol"):
        load_encoder({"kind": "expression", "class": "tests.test_adapter_cards:NotAnEncoder"})
    with pytest.raises(ConfigError, match="cannot import class"):
        load_encoder({"kind": "expression", "class": "tests.no_such_module:Encoder"})


def test_fingerprint_follows_card_and_checkpoint_files(tmp_path):
    card = {"kind": "expression", "class": "tests.test_adapter_cards:ConstantEncoder"}
    (tmp_path / "weights.bin").write_bytes(b"a")
    first = load_encoder(card, tmp_path).fingerprint
    assert load_encoder(card, tmp_path).fingerprint == first
    (tmp_path / "weights.bin").write_bytes(b"b")
    assert load_encoder(card, tmp_path).fingerprint != first
    assert load_encoder({**card, "name": "renamed"}, tmp_path).fingerprint != load_encoder(card, tmp_path).fingerprint
