"""Pretraining a Geneformer-format BERT: masking, baselines, and a tiny run whose checkpoint the card loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from perturbedvae.data.loading import load_dataset
from perturbedvae.encoders import load_encoder
from perturbedvae.encoders.pretrain import (
    IGNORE,
    REPORT_FILE,
    PretrainConfig,
    frequency_baselines,
    mask_tokens,
    pretrain,
)
from tests.conftest import REPO, VOCAB_DIR

pytestmark = pytest.mark.filterwarnings("ignore:unpickling", "ignore:no counts found")
CARD = REPO / "adapters/geneformer-v1.yaml"


def test_frequency_baselines_overall_and_per_position():
    train = [np.array([5, 7, 9]), np.array([5, 8]), np.array([6, 8, 9, 9])]
    overall, per_position = frequency_baselines(train, max_length=5)
    assert overall == 9  # 9 appears three times
    assert per_position.tolist()[:4] == [5, 8, 9, 9] and per_position[4] == overall  # unseen position -> overall


def test_masking_follows_bert_proportions_on_real_tokens_only():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (400, 100))
    attention = torch.ones_like(ids)
    attention[:, 80:] = 0
    inputs, labels = mask_tokens(ids, attention, 0.15, mask_id=1, gene_ids=torch.arange(10, 1000), generator=generator)
    chosen = labels != IGNORE
    assert not chosen[:, 80:].any()
    assert chosen.float().mean() / 0.8 == pytest.approx(0.15, abs=0.01)
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs[chosen] == 1).float().mean()
    unchanged = (inputs[chosen] == ids[chosen]).float().mean()
    assert masked == pytest.approx(0.8, abs=0.03) and unchanged == pytest.approx(0.1 + 0.9e-3, abs=0.03)


def two_program_data(genes: list[str], cells: int = 200) -> object:
    """Two cell programs, each expressing its own 8 genes at fixed levels: the order is the program."""
    levels = np.zeros((2, len(genes)), dtype=np.float32)
    levels[0, :8] = np.arange(8, 0, -1) * 10
    levels[1, 8:16] = np.arange(1, 9) * 10
    program = np.arange(cells) % 2
    obs = pd.DataFrame({"condition": ["control"] * cells}, index=[f"c{i}" for i in range(cells)])
    adata = ad.AnnData(levels[program], obs=obs, var=pd.DataFrame(index=genes))
    return load_dataset(adata)


@pytest.fixture
def one_thread():
    """Many tiny optimizer steps: with other jobs on the 2 cores, 2 threads measured ~40x slower than 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_pretraining_learns_context_and_saves_a_loadable_checkpoint(tmp_path, norman_data, one_thread):
    data = two_program_data(norman_data.genes[:16])
    config = PretrainConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=32,
                            batch_size=16, learning_rate=1e-2, max_steps=200, held_out_fraction=0.3, seed=0)
    report = pretrain([data], tmp_path / "model", CARD, config, vocab_dir=VOCAB_DIR, log_every=0)
    assert (report.n_train_cells, report.n_held_out_cells, report.steps) == (140, 60, 200)
    assert json.loads((tmp_path / "model" / REPORT_FILE).read_text())["held_out_accuracy"] == report.held_out_accuracy
    assert report.baseline_per_position < 0.7  # rank position alone cannot tell the two programs apart
    assert report.held_out_accuracy > report.baseline_per_position + 0.3
    encoder = load_encoder(CARD, tmp_path / "model", vocab_dir=VOCAB_DIR)
    with torch.no_grad():
        embeddings = encoder.embed(encoder.prepare(data.adata[:4]))
    assert embeddings.shape == (4, 32)
    assert not torch.allclose(embeddings[0], embeddings[1], atol=1e-3)  # the two programs embed differently
    torch.testing.assert_close(embeddings[0], embeddings[2])


def test_an_encoder_not_above_a_frequency_baseline_is_warned_about(tmp_path, norman_data, one_thread):
    data = two_program_data(norman_data.genes[:16])
    config = PretrainConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_length=32,
                            batch_size=16, learning_rate=1e-9, max_steps=1, held_out_fraction=0.3, seed=0)
    with pytest.warns(UserWarning, match=r"not above the frequency baseline .* train longer") as caught:
        report = pretrain([data], tmp_path / "model", CARD, config, vocab_dir=VOCAB_DIR, log_every=0)
    assert report.held_out_accuracy <= max(report.baseline_per_position, report.baseline_most_frequent)
    assert report.shortfall() in {str(warning.message) for warning in caught}


def test_the_pretrain_script_reads_any_h5ad_and_warns_below_the_baseline(tmp_path, norman_data):
    two_program_data(norman_data.genes[:16]).adata.write_h5ad(tmp_path / "cells.h5ad")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/pretrain_encoder.py"), "--out", str(tmp_path / "enc"), "--data", str(tmp_path / "cells.h5ad"),
         "--card", str(CARD), "--vocab-dir", str(VOCAB_DIR), "--hidden-size", "16", "--layers", "1", "--heads", "2", "--max-length", "32",
         "--max-steps", "1", "--lr", "1e-9", "--threads", "1"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "enc" / "pretrain_report.json").read_text())
    assert report["n_train_cells"] + report["n_held_out_cells"] == 200 and report["embedding_throughput"]["cells"] == 200
    assert "warning: held-out masked-gene accuracy" in done.stderr
