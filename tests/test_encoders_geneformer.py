"""Geneformer kind: rank-value encoding as Geneformer documents it, real V1/V2 dictionaries, BERT embeddings."""

from __future__ import annotations

import pickle
import warnings

import anndata as ad
import numpy as np
import pytest
import torch
import yaml

from perturbedvae.data.loading import load_dataset
from perturbedvae.encoders import load_encoder
from perturbedvae.encoders.pretrain import PretrainConfig, new_geneformer_bert
from perturbedvae.encoders.rank_value import RankValueTokenizer, relative_expression_source
from perturbedvae.encoders.vocab import load_pickle_dictionary
from perturbedvae.errors import CheckpointError, ConfigError, DataError
from tests.conftest import REPO, VOCAB_DIR, make_toy_adata

V1_CARD = REPO / "adapters/geneformer-v1.yaml"
V2_CARD = REPO / "adapters/geneformer-v2.yaml"
TINY = PretrainConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_length=64)

pytestmark = pytest.mark.filterwarnings("ignore:unpickling", "ignore:no counts found")


def write_tiny_geneformer(directory, vocab_size: int = 25_426, config: PretrainConfig = TINY):
    """A random-weight Geneformer-format BertForMaskedLM checkpoint (V1 vocabulary size by default)."""
    new_geneformer_bert(vocab_size, config).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_geneformer(tmp_path_factory.mktemp("geneformer"))


@pytest.fixture(scope="module")
def v1_encoder(tiny_checkpoint):
    return load_encoder(V1_CARD, tiny_checkpoint, vocab_dir=VOCAB_DIR)


def card_dict(path) -> dict:
    return yaml.safe_load(path.read_text())


def toy_tokenizer(**overrides) -> RankValueTokenizer:
    settings = dict(
        token_of={"<pad>": 0, "<mask>": 1, "E1": 2, "E2": 3, "E3": 4, "E4": 5, "<cls>": 6, "<eos>": 7},
        median_of={"E1": 1.0, "E2": 2.0, "E3": 0.5, "E4": 1.0},
        max_length=10,
        gene_alias={"A": "E1", "B": "E2", "C": "E3", "D": "E4"},
    )
    return RankValueTokenizer(**{**settings, **overrides})


GENES = ["A", "B", "C", "D", "X"]  # X is outside the vocabulary but counts towards the total
COUNTS = np.array([[4, 6, 1, 0, 10], [0, 1, 5, 3, 0]], dtype=np.float32)


def test_rank_value_order_divides_by_median_and_drops_zeros():
    # cell 0: A 4/1, B 6/2, C 1/0.5, D 0 -> A, B, C; cell 1: C 10, D 3, B 0.5 -> C, D, B
    batch = toy_tokenizer().tokenize(COUNTS, GENES)
    assert batch["input_ids"].tolist() == [[2, 3, 4], [4, 5, 3]]
    assert batch["gene_mask"].all() and batch["attention_mask"].all()


def test_v2_special_tokens_truncation_and_padding():
    tokenizer = toy_tokenizer(cls_id=6, eos_id=7, max_length=4)  # room for two genes
    batch = tokenizer.tokenize(np.array([[4, 6, 1, 0, 10], [0, 0, 5, 0, 1]], dtype=np.float32), GENES)
    assert batch["input_ids"].tolist() == [[6, 2, 3, 7], [6, 4, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["gene_mask"].tolist() == [[False, True, True, False], [False, True, False, False]]


def test_log_normalized_input_ranks_exactly_like_counts():
    counts = make_toy_adata(counts=True)
    encoder_tokens = toy_tokenizer(
        token_of={f"G{i}": i + 2 for i in range(counts.n_vars)}, median_of=None, gene_alias=None, max_length=64
    )
    from_counts = encoder_tokens.tokenize(relative_expression_source(counts), list(counts.var_names))
    normalized = load_dataset(counts).adata  # log1p(counts / total * 1e4), counts kept in layers
    del normalized.layers["counts"]
    with pytest.warns(UserWarning, match="inverting it with expm1"):
        source = relative_expression_source(normalized)
    from_log = encoder_tokens.tokenize(source, list(normalized.var_names))
    assert torch.equal(from_counts["input_ids"], from_log["input_ids"])


def test_cells_without_vocabulary_genes_are_refused():
    with pytest.raises(DataError, match="express none of"):
        toy_tokenizer().tokenize(np.array([[0, 0, 0, 0, 5]], dtype=np.float32), GENES)
    with pytest.raises(DataError, match="no gene of the data"):
        toy_tokenizer().tokenize(np.ones((1, 2)), ["X", "Y"])


def test_real_v1_dictionaries_on_norman(v1_encoder, norman_data):
    coverage = v1_encoder.gene_coverage(norman_data.genes, norman_data.perturbed_genes)
    assert (coverage.n_genes, coverage.n_perturbed) == (500, len(norman_data.perturbed_genes))
    assert coverage.n_covered > 400 and coverage.perturbed_fraction == 1.0
    batch = v1_encoder.prepare(norman_data.adata[:5])
    # cell 0 by hand: symbol -> Ensembl -> token, expm1 of log-normalized values / median, sorted descending
    names = load_pickle_dictionary(VOCAB_DIR / "geneformer_v1/gene_name_id_dict_gc30M.pkl")
    collapse = load_pickle_dictionary(VOCAB_DIR / "geneformer_v1/ensembl_mapping_dict_gc30M.pkl")
    medians = load_pickle_dictionary(VOCAB_DIR / "geneformer_v1/gene_median_dictionary_gc30M.pkl")
    tokens = load_pickle_dictionary(VOCAB_DIR / "geneformer_v1/token_dictionary_gc30M.pkl")
    row = np.expm1(norman_data.adata.X[0].toarray().ravel() if hasattr(norman_data.adata.X, "toarray") else norman_data.adata.X[0])
    scored = []
    for gene, value in zip(norman_data.genes, row):
        ensembl = collapse.get(names.get(gene), names.get(gene))
        if value > 0 and ensembl in tokens and ensembl in medians:
            scored.append((-value / medians[ensembl], tokens[ensembl]))
    expected = [token for _, token in sorted(scored, key=lambda item: item[0])]
    length = int(batch["attention_mask"][0].sum())
    assert batch["input_ids"][0, :length].tolist() == expected


def test_v2_dictionaries_add_cls_and_eos(tiny_checkpoint, norman_data):
    encoder = load_encoder(V2_CARD, tiny_checkpoint, vocab_dir=VOCAB_DIR)
    batch = encoder.prepare(norman_data.adata[:3])
    lengths = batch["attention_mask"].sum(1)
    tokens = load_pickle_dictionary(VOCAB_DIR / "geneformer_v2/token_dictionary_gc95M.pkl")
    assert (batch["input_ids"][:, 0] == tokens["<cls>"]).all()
    assert all(batch["input_ids"][row, lengths[row] - 1] == tokens["<eos>"] for row in range(3))
    assert (batch["gene_mask"].sum(1) == lengths - 2).all()


def test_embeddings_ignore_padding_and_read_the_chosen_layer(v1_encoder, norman_data):
    batch = v1_encoder.prepare(norman_data.adata[:6])
    with torch.no_grad():
        together = v1_encoder.embed(batch)
        alone = v1_encoder.embed({key: value[:1] for key, value in batch.items()})
        states = v1_encoder.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states
    assert together.shape == (6, v1_encoder.hidden_size) == (6, TINY.hidden_size)
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)
    mask = batch["gene_mask"].unsqueeze(-1).float()
    manual = (states[-2] * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(together, manual, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(manual, (states[-1] * mask).sum(1) / mask.sum(1))


def test_max_pooling_overrides_the_card_and_takes_each_dimensions_largest_gene_token(tiny_checkpoint, v1_encoder, norman_data):
    encoder = load_encoder(V1_CARD, tiny_checkpoint, vocab_dir=VOCAB_DIR, pooling="max")
    assert encoder.card.pooling == "max" and encoder.fingerprint != v1_encoder.fingerprint  # never the mean's cache entry
    batch = encoder.prepare(norman_data.adata[:6])
    with torch.no_grad():
        pooled = encoder.embed(batch)
        states = encoder.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states[-2]
    for row in range(6):  # padding excluded, though its outputs may be larger
        genes = batch["gene_mask"][row].bool()
        torch.testing.assert_close(pooled[row], states[row, genes].amax(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled, v1_encoder.embed(batch).detach())
    with pytest.raises(ConfigError, match="pooling must be one of"):
        load_encoder(V1_CARD, tiny_checkpoint, vocab_dir=VOCAB_DIR, pooling="sum")


def test_max_pooling_of_a_cell_without_gene_tokens_is_zero():
    from perturbedvae.encoders.rank_value import pool_tokens

    hidden = torch.randn(2, 3, 4) - 5.0
    gene_mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    pooled = pool_tokens(hidden, gene_mask, "max")
    torch.testing.assert_close(pooled[0], hidden[0, :2].amax(0))
    assert torch.equal(pooled[1], torch.zeros(4))


def test_gene_embeddings_are_input_token_rows(v1_encoder):
    rows = v1_encoder.gene_embeddings(["KLF1", "NOT_A_GENE"])
    tokens = load_pickle_dictionary(VOCAB_DIR / "geneformer_v1/token_dictionary_gc30M.pkl")
    names = load_pickle_dictionary(VOCAB_DIR / "geneformer_v1/gene_name_id_dict_gc30M.pkl")
    table = v1_encoder.model.get_input_embeddings().weight
    torch.testing.assert_close(rows[0], table[tokens[names["KLF1"]]].detach())
    assert rows[1].abs().sum() == 0


def test_card_and_checkpoint_must_agree(tmp_path, tiny_checkpoint):
    small = write_tiny_geneformer(tmp_path / "small", vocab_size=100)
    with pytest.raises(CheckpointError, match="pair V1 weights with the V1 card"):
        load_encoder(V1_CARD, small, vocab_dir=VOCAB_DIR)
    with pytest.raises(ConfigError, match="needs a <cls> token"):
        load_encoder({**card_dict(V1_CARD), "pooling": "cls"}, tiny_checkpoint, vocab_dir=VOCAB_DIR)
    with pytest.raises(ConfigError, match="layer 7 does not exist"):
        load_encoder({**card_dict(V1_CARD), "layer": 7}, tiny_checkpoint, vocab_dir=VOCAB_DIR)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a BERT checkpoint"):
        load_encoder(V1_CARD, tmp_path / "empty", vocab_dir=VOCAB_DIR)


def test_pickles_warn_and_bad_pickles_raise(tmp_path):
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.warns(UserWarning, match="pickles can execute code"):
        assert load_pickle_dictionary(path) == {"a": 1}
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="expected a dictionary"):
            load_pickle_dictionary(tmp_path / "list.pkl")


def test_counts_are_preferred_over_inverting_log1p():
    data = load_dataset(make_toy_adata(counts=True)).adata
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # counts present: no inversion warning
        assert relative_expression_source(data) is data.layers["counts"]
        raw = ad.AnnData(data.layers["counts"].copy())
        assert relative_expression_source(raw) is raw.X


def test_loading_prints_no_load_report_and_warns_only_about_missing_weights(tmp_path, tiny_checkpoint, capfd):
    from transformers import BertModel

    from perturbedvae.encoders.checkpoints import load_quietly

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the unused masked-LM head (cls.*) is no warning
        model = load_quietly(BertModel, tiny_checkpoint, add_pooling_layer=False)
    assert "LOAD REPORT" not in capfd.readouterr().err and model.config.num_hidden_layers == TINY.num_layers
    with pytest.warns(UserWarning, match=r"weight\(s\) of BertModel are not in the checkpoint .* encoder\.layer\.\d+"):
        load_quietly(BertModel, tiny_checkpoint, add_pooling_layer=False, num_hidden_layers=TINY.num_layers + 1)
    assert "LOAD REPORT" not in capfd.readouterr().err
