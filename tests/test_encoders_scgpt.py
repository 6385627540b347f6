"""scGPT kind: per-cell value binning, and a random-weight checkpoint with scGPT's key names loads and embeds."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from perturbedvae.encoders import load_encoder
from perturbedvae.encoders.scgpt import bin_values, read_scgpt_vocab
from perturbedvae.errors import CheckpointError, ConfigError
from tests.conftest import REPO, VOCAB_DIR

CARD = REPO / "adapters/scgpt.yaml"
ARGS = {"embsize": 16, "nheads": 2, "d_hid": 24, "nlayers": 2, "dropout": 0.2, "n_bins": 51,
        "pad_token": "<pad>", "pad_value": -2, "input_emb_style": "continuous", "n_layers_cls": 3}

pytestmark = pytest.mark.filterwarnings("ignore:loading")


def scgpt_state_dict(ntoken: int, d: int, d_hid: int, nlayers: int, flash: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names of scGPT's TransformerModel (scgpt/model/model.py), heads included."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "encoder.embedding.weight": (ntoken, d), "encoder.enc_norm.weight": (d,), "encoder.enc_norm.bias": (d,),
        "value_encoder.linear1.weight": (d, 1), "value_encoder.linear1.bias": (d,),
        "value_encoder.linear2.weight": (d, d), "value_encoder.linear2.bias": (d,),
        "value_encoder.norm.weight": (d,), "value_encoder.norm.bias": (d,),
        "flag_encoder.weight": (2, d), "decoder.fc.0.weight": (d, d), "decoder.fc.4.bias": (1,),
        "mvc_decoder.gene2query.weight": (d, d),
    }
    attention = "Wqkv." if flash else "in_proj_"
    for layer in range(nlayers):
        prefix = f"transformer_encoder.layers.{layer}."
        shapes |= {
            prefix + f"self_attn.{attention}weight": (3 * d, d), prefix + f"self_attn.{attention}bias": (3 * d,),
            prefix + "self_attn.out_proj.weight": (d, d), prefix + "self_attn.out_proj.bias": (d,),
            prefix + "linear1.weight": (d_hid, d), prefix + "linear1.bias": (d_hid,),
            prefix + "linear2.weight": (d, d_hid), prefix + "linear2.bias": (d,),
            prefix + "norm1.weight": (d,), prefix + "norm1.bias": (d,),
            prefix + "norm2.weight": (d,), prefix + "norm2.bias": (d,),
        }
    return {key: torch.randn(shape, generator=generator) * 0.2 for key, shape in shapes.items()}


def write_scgpt_checkpoint(directory, genes, flash: bool = False, args=ARGS):
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {gene: index for index, gene in enumerate(genes)} | {"<pad>": len(genes), "<cls>": len(genes) + 1}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "args.json").write_text(json.dumps(args))
    state = scgpt_state_dict(len(vocab) + 1, args["embsize"], args["d_hid"], args["nlayers"], flash)  # + "<eoc>"
    torch.save(state, directory / "best_model.pt")
    return state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, norman_data):
    directory = tmp_path_factory.mktemp("scgpt")
    genes = norman_data.genes[::2] + ["UNSEEN1", "UNSEEN2"]
    return directory, write_scgpt_checkpoint(directory, genes)


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return load_encoder(CARD, checkpoint[0], vocab_dir=VOCAB_DIR)


def test_binning_cuts_each_cell_at_its_own_quantiles():
    # 5 bins: edges at the 0, 1/3, 2/3, 1 quantiles of the cell's values = 1, 3, 5, 7
    assert bin_values(np.arange(1.0, 8.0), 5).tolist() == [1, 1, 2, 2, 3, 3, 4]
    values = np.random.default_rng(0).gamma(1.0, 2.0, size=300)
    bins = bin_values(values, 51)
    assert bins.min() == 1 and bins.max() == 50
    assert (np.diff(bins[np.argsort(values)]) >= 0).all()
    np.testing.assert_array_equal(bin_values(np.log1p(values), 51), bins)  # within-cell ranks only


def test_vocab_gets_special_tokens_appended(tmp_path):
    (tmp_path / "v.json").write_text(json.dumps({"A": 0, "B": 1, "<pad>": 2}))
    assert read_scgpt_vocab(tmp_path / "v.json") == {"A": 0, "B": 1, "<pad>": 2, "<cls>": 3, "<eoc>": 4}


@pytest.mark.parametrize("flash", [False, True], ids=["pytorch-attention", "flash-attention-keys"])
def test_checkpoint_with_scgpt_key_names_loads_exactly(tmp_path, norman_data, flash):
    state = write_scgpt_checkpoint(tmp_path, norman_data.genes, flash=flash)
    with pytest.warns(UserWarning, match="weights_only=True"):
        encoder = load_encoder(CARD, tmp_path, vocab_dir=VOCAB_DIR)
    loaded = encoder.model.state_dict()
    for key, value in state.items():
        key = key.replace("self_attn.Wqkv.", "self_attn.in_proj_")
        if key in loaded:
            torch.testing.assert_close(loaded[key], value)
    assert set(loaded) <= {key.replace("self_attn.Wqkv.", "self_attn.in_proj_") for key in state}
    assert encoder.hidden_size == ARGS["embsize"]


def test_prepare_puts_cls_first_bins_values_and_pads(encoder, norman_data):
    adata = norman_data.adata[:4]
    batch = encoder.prepare(adata)
    vocab = encoder.vocab
    assert (batch["gene_ids"][:, 0] == vocab["<cls>"]).all()
    assert (batch["values"][:, 0] == ARGS["pad_value"]).all()
    dense = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    for row in range(4):
        expressed = [vocab[gene] for gene, value in zip(adata.var_names, dense[row]) if value > 0 and gene in vocab]
        length = 1 + len(expressed)
        assert batch["gene_ids"][row, 1:length].tolist() == expressed
        assert batch["gene_mask"][row].sum() == len(expressed)
        assert (batch["gene_ids"][row, length:] == vocab["<pad>"]).all()
        assert batch["padding_mask"][row].tolist() == [False] * length + [True] * (batch["gene_ids"].shape[1] - length)
        values = batch["values"][row, 1:length]
        assert values.min() >= 1 and values.max() <= ARGS["n_bins"] - 1


def test_embedding_is_the_cls_output_and_ignores_padding(encoder, norman_data):
    batch = encoder.prepare(norman_data.adata[:8])
    with torch.no_grad():
        together = encoder.embed(batch)
        alone = encoder.embed({key: value[1:2] for key, value in batch.items()})
        states = encoder.model(batch["gene_ids"], batch["values"], batch["padding_mask"])
    assert together.shape == (8, ARGS["embsize"]) and torch.isfinite(together).all()
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together, states[-1][:, 0])


def test_input_embedding_follows_scgpt_architecture(encoder, checkpoint, norman_data):
    """Layer-0 state = LayerNorm(gene embedding) + LayerNorm(Linear(ReLU(Linear(bin value))))."""
    state = checkpoint[1]
    batch = encoder.prepare(norman_data.adata[:2])
    d = ARGS["embsize"]
    genes = F.layer_norm(state["encoder.embedding.weight"][batch["gene_ids"]], (d,), state["encoder.enc_norm.weight"], state["encoder.enc_norm.bias"])
    hidden = torch.relu(batch["values"].unsqueeze(-1) @ state["value_encoder.linear1.weight"].T + state["value_encoder.linear1.bias"])
    values = F.layer_norm(hidden @ state["value_encoder.linear2.weight"].T + state["value_encoder.linear2.bias"], (d,),
                          state["value_encoder.norm.weight"], state["value_encoder.norm.bias"])
    with torch.no_grad():
        first = encoder.model(batch["gene_ids"], batch["values"], batch["padding_mask"])[0]
    torch.testing.assert_close(first, genes + values, atol=1e-5, rtol=1e-4)


def test_long_cells_keep_their_most_expressed_genes(tmp_path):
    genes = ["A", "B", "C", "D"]
    write_scgpt_checkpoint(tmp_path, genes)
    encoder = load_encoder({"kind": "scgpt", "max_length": 3, "pooling": "cls"}, tmp_path)
    adata = ad.AnnData(np.array([[1.0, 5.0, 0.0, 3.0]], dtype=np.float32))
    adata.var_names = genes
    batch = encoder.prepare(adata)
    assert batch["gene_ids"][0].tolist() == [encoder.vocab["<cls>"], encoder.vocab["B"], encoder.vocab["D"]]


def test_coverage_uses_the_checkpoint_vocabulary(encoder, norman_data):
    coverage = encoder.gene_coverage(norman_data.genes, norman_data.perturbed_genes)
    assert coverage.n_covered == len(norman_data.genes[::2])
    rows = encoder.gene_embeddings([norman_data.genes[0], "NOT_A_GENE"])
    assert rows.shape == (2, ARGS["embsize"]) and rows[1].abs().sum() == 0 and rows[0].abs().sum() > 0


def test_default_scgpt_vocabulary_covers_norman(norman_data):
    vocab = read_scgpt_vocab(VOCAB_DIR / "scgpt/default_gene_vocab.json")
    assert sum(gene in vocab for gene in norman_data.perturbed_genes) == len(norman_data.perturbed_genes)


def test_broken_checkpoints_are_refused(tmp_path, norman_data):
    with pytest.raises(CheckpointError, match="args.json is missing"):
        (tmp_path / "empty").mkdir()
        load_encoder(CARD, tmp_path / "empty", vocab_dir=VOCAB_DIR)
    state = write_scgpt_checkpoint(tmp_path / "partial", norman_data.genes)
    del state["transformer_encoder.layers.1.linear2.weight"]
    torch.save(state, tmp_path / "partial" / "best_model.pt")
    with pytest.raises(CheckpointError, match="lacks 1 encoder weights"):
        load_encoder(CARD, tmp_path / "partial", vocab_dir=VOCAB_DIR)
    write_scgpt_checkpoint(tmp_path / "bigger", norman_data.genes, args={**ARGS, "embsize": 32})
    (tmp_path / "bigger" / "args.json").write_text(json.dumps(ARGS))
    with pytest.raises(CheckpointError, match="shapes do not match"):
        load_encoder(CARD, tmp_path / "bigger", vocab_dir=VOCAB_DIR)
    (tmp_path / "partial" / "best_model.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="weights-only state dict"):
        load_encoder(CARD, tmp_path / "partial", vocab_dir=VOCAB_DIR)
    (tmp_path / "partial" / "args.json").write_text(json.dumps({**ARGS, "input_emb_style": "scaling"}))
    with pytest.raises(ConfigError, match="not supported"):
        load_encoder(CARD, tmp_path / "partial", vocab_dir=VOCAB_DIR)
