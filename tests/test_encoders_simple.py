"""precomputed, expression and huggingface kinds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from perturbedvae.data.loading import load_dataset
from perturbedvae.encoders import load_encoder
from perturbedvae.encoders.simple import principal_components
from perturbedvae.errors import ConfigError, DataError
from tests.conftest import REPO
from tests.test_encoders_geneformer import write_tiny_geneformer


@pytest.fixture
def toy_data(toy_adata):
    return load_dataset(toy_adata)


def test_precomputed_reads_obsm(toy_data):
    vectors = np.random.default_rng(0).normal(size=(toy_data.adata.n_obs, 7)).astype(np.float32)
    toy_data.adata.obsm["X_mine"] = vectors
    encoder = load_encoder({"kind": "precomputed", "obsm_key": "X_mine"})
    with pytest.raises(ConfigError, match="known after prepare"):
        encoder.hidden_size
    batch = encoder.prepare(toy_data.adata)
    assert encoder.hidden_size == 7 and encoder.trainable_module() is None
    np.testing.assert_array_equal(encoder.embed({key: value[3:5] for key, value in batch.items()}).numpy(), vectors[3:5])
    with pytest.raises(DataError, match="obsm has no 'X_other'"):
        load_encoder({"kind": "precomputed", "obsm_key": "X_other"}).prepare(toy_data.adata)
    toy_data.adata.obsm["X_mine"][0, 0] = np.nan
    with pytest.raises(DataError, match="finite 2-d array"):
        encoder.prepare(toy_data.adata)


def test_expression_log_normalized_and_pca(toy_data):
    plain = load_encoder({"kind": "expression"})
    features = plain.embed(plain.prepare(toy_data.adata))
    np.testing.assert_allclose(features.numpy(), np.asarray(toy_data.adata.X))
    assert plain.hidden_size == toy_data.adata.n_vars
    pca = load_encoder(REPO / "adapters/expression.yaml")
    with pytest.raises(ConfigError, match=r"n_components \(for this data\) must lie in \[1, "):
        pca.prepare(toy_data.adata)  # 30 genes < 50 components
    pca = load_encoder({"kind": "expression", "representation": "pca", "n_components": 5})
    scores = pca.embed(pca.prepare(toy_data.adata)).numpy()
    assert scores.shape == (toy_data.adata.n_obs, 5) == (toy_data.adata.n_obs, pca.hidden_size)
    np.testing.assert_allclose(scores.mean(0), 0, atol=1e-4)
    variances = scores.var(0)
    assert (np.diff(variances) <= 1e-6).all()  # components ordered by explained variance
    np.testing.assert_array_equal(pca.prepare(toy_data.adata)["features"].numpy(), scores)
    coverage = pca.gene_coverage(toy_data.genes, ["G1", "NOT_MEASURED"])
    assert coverage.n_covered == toy_data.adata.n_vars and coverage.missing_perturbed == ["NOT_MEASURED"]


def test_principal_components_match_a_reference_decomposition():
    matrix = np.random.default_rng(1).normal(size=(40, 6)).astype(np.float32)
    scores = principal_components(matrix, 3)
    centred = matrix - matrix.mean(0)
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(centred.T)))[::-1][:3]
    np.testing.assert_allclose(scores.var(0, ddof=1), eigenvalues, rtol=1e-4)


def test_expression_rejects_unknown_representation():
    with pytest.raises(ConfigError, match="representation must be one of"):
        load_encoder({"kind": "expression", "representation": "umap"})


def test_huggingface_kind_with_a_user_gene_mapping(tmp_path, toy_data):
    write_tiny_geneformer(tmp_path / "model", vocab_size=40)
    mapping = {gene: index + 5 for index, gene in enumerate(toy_data.genes[:20])}
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "genes.json").write_text(json.dumps(mapping))
    card = {"kind": "huggingface", "vocab": {"gene_to_token": "genes.json"}, "cls_token_id": 2, "pooling": "cls"}
    encoder = load_encoder(card, tmp_path / "model", vocab_dir=tmp_path / "vocab")
    with pytest.warns(UserWarning, match="expm1"):
        batch = encoder.prepare(toy_data.adata)
    assert (batch["input_ids"][:, 0] == 2).all()
    assert set(batch["input_ids"][batch["gene_mask"]].tolist()) <= set(mapping.values())
    with torch.no_grad():
        assert encoder.embed(batch).shape == (toy_data.adata.n_obs, 16)
    assert encoder.gene_coverage(toy_data.genes, ["G0", "G25"]).missing_perturbed == ["G25"]
    (tmp_path / "vocab" / "genes.json").write_text(json.dumps({"G0": "five"}))
    with pytest.raises(ConfigError, match="integer token id"):
        load_encoder(card, tmp_path / "model", vocab_dir=tmp_path / "vocab")
