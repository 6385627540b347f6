"""Embedding cache: exact round trip, resume after interruption, and no silent reuse of a bad cache."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from perturbedvae.data.embedding_cache import (
    MANIFEST,
    cache_entry,
    embed_to_cache,
    load_embeddings,
    open_embedding_shards,
)
from perturbedvae.data.loading import load_dataset
from perturbedvae.encoders import load_encoder
from perturbedvae.encoders.embed import COVERAGE_FILE, run_embed
from perturbedvae.errors import CheckpointError, ConfigError
from tests.conftest import make_toy_adata

PCA_CARD = {"kind": "expression", "representation": "pca", "n_components": 4}


@pytest.fixture
def data():
    return load_dataset(make_toy_adata(cells_per_condition=10))  # 60 cells


@pytest.fixture
def encoder():
    return load_encoder(PCA_CARD)


class Interrupted(RuntimeError):
    pass


class CountingEncoder:
    """Wraps an encoder, counts embedded cells and can fail after a number of batches."""

    def __init__(self, inner, fail_after_batches: int | None = None):
        self.inner, self.fail_after_batches = inner, fail_after_batches
        self.name, self.fingerprint = inner.name, inner.fingerprint
        self.batches = self.cells = 0

    @property
    def hidden_size(self):
        return self.inner.hidden_size

    def prepare(self, adata):
        return self.inner.prepare(adata)

    def embed(self, batch):
        if self.fail_after_batches is not None and self.batches >= self.fail_after_batches:
            raise Interrupted
        self.batches += 1
        output = self.inner.embed(batch)
        self.cells += len(output)
        return output


def direct_embeddings(encoder, data) -> np.ndarray:
    return encoder.embed(encoder.prepare(data.adata)).numpy()


def test_round_trip_equals_direct_embedding(tmp_path, data, encoder):
    entry = embed_to_cache(data, encoder, tmp_path, batch_size=7, shard_size=25)
    assert entry == cache_entry(tmp_path, data, encoder) and entry.name == f"{data.fingerprint}-{encoder.fingerprint}"
    assert sorted(path.name for path in entry.glob("shard-*")) == ["shard-00000", "shard-00001", "shard-00002"]
    expected = direct_embeddings(encoder, data)
    np.testing.assert_array_equal(load_embeddings(tmp_path, data, encoder), expected)
    np.testing.assert_array_equal(load_embeddings(entry, data, encoder), expected)
    shards = open_embedding_shards(tmp_path, data, encoder)
    assert all(shard.cache_files for shard in shards)  # memory-mapped Arrow files, not in-memory tables


def test_resume_skips_finished_shards(tmp_path, data, encoder):
    failing = CountingEncoder(encoder, fail_after_batches=3)  # batches of 10, shards of 20: dies inside shard 2
    with pytest.raises(Interrupted):
        embed_to_cache(data, failing, tmp_path, batch_size=10, shard_size=20)
    entry = cache_entry(tmp_path, data, encoder)
    assert list(json.loads((entry / MANIFEST).read_text())["shards"]) == ["shard-00000"]
    with pytest.raises(CheckpointError, match="incomplete"):
        load_embeddings(tmp_path, data, encoder)
    resumed = CountingEncoder(encoder)
    embed_to_cache(data, resumed, tmp_path, batch_size=10, shard_size=20)
    assert resumed.cells == 40  # shards 1 and 2 only
    np.testing.assert_array_equal(load_embeddings(tmp_path, data, encoder), direct_embeddings(encoder, data))
    again = CountingEncoder(encoder)
    embed_to_cache(data, again, tmp_path, batch_size=10, shard_size=20)
    assert again.cells == 0


def test_corrupt_or_truncated_shard_is_refused(tmp_path, data, encoder):
    entry = embed_to_cache(data, encoder, tmp_path, shard_size=30)
    arrow = next((entry / "shard-00001").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="shard-00001 is corrupt"):
        load_embeddings(tmp_path, data, encoder)
    (entry / MANIFEST).write_text("{ not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_embeddings(tmp_path, data, encoder)


def test_cache_of_other_data_or_encoder_is_never_reused(tmp_path, data, encoder):
    entry = embed_to_cache(data, encoder, tmp_path)
    other_encoder = load_encoder({**PCA_CARD, "n_components": 3})
    assert other_encoder.fingerprint != encoder.fingerprint
    with pytest.raises(CheckpointError, match="no embedding cache"):
        load_embeddings(tmp_path, data, other_encoder)
    with pytest.raises(CheckpointError, match="another encoder"):
        load_embeddings(entry, data, other_encoder)
    other_data = load_dataset(make_toy_adata(cells_per_condition=10, seed=1))
    with pytest.raises(CheckpointError, match="another data"):
        load_embeddings(entry, other_data, encoder)


def test_encoder_without_fingerprint_is_refused(tmp_path, data, encoder):
    encoder.fingerprint = None
    with pytest.raises(ConfigError, match="has no fingerprint"):
        embed_to_cache(data, encoder, tmp_path)


def test_nan_embeddings_are_not_cached(tmp_path, data, encoder):
    class NaNEncoder(CountingEncoder):
        def embed(self, batch):
            return torch.full((len(batch["features"]), 4), float("nan"))

    with pytest.raises(CheckpointError, match="NaN"):
        embed_to_cache(data, NaNEncoder(encoder), tmp_path)


def test_run_embed_writes_coverage_and_cache(tmp_path, caplog):
    path = tmp_path / "toy.h5ad"
    make_toy_adata(cells_per_condition=10).write_h5ad(path)
    with caplog.at_level(logging.INFO, logger="perturbedvae"):
        entry = run_embed(path, PCA_CARD, out=tmp_path / "cache", batch_size=16)
    report = json.loads((entry / COVERAGE_FILE).read_text())
    assert report["n_genes"] == 30 and report["n_perturbed_covered"] == 3 and report["fraction"] == 1.0
    assert "covers 30/30 genes" in caplog.text
    assert load_embeddings(tmp_path / "cache", load_dataset(path), load_encoder(PCA_CARD)).shape == (60, 4)


def test_run_embed_stops_below_the_coverage_threshold(tmp_path):
    path = tmp_path / "unmeasured.h5ad"
    make_toy_adata(conditions=["control", "G0", "GX"], cells_per_condition=10).write_h5ad(path)  # GX not measured
    with pytest.raises(ConfigError, match="50.0% of perturbed genes covered, below min_perturbed_coverage"):
        run_embed(path, {**PCA_CARD, "min_perturbed_coverage": 0.9}, out=tmp_path / "cache")
    entry = run_embed(path, PCA_CARD, out=tmp_path / "cache", min_perturbed_coverage=0.5)
    assert json.loads((entry / COVERAGE_FILE).read_text())["missing_perturbed"] == ["GX"]
