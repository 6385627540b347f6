"""Pretrained cell encoders in the trainer: frozen through the embedding cache, LoRA-tuned end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import BertModel

from perturbedvae.api.fitting import train_from_config
from perturbedvae.data.embedding_cache import MANIFEST
from perturbedvae.encoders import load_encoder
from perturbedvae.encoders.lora import count_trainable
from perturbedvae.encoders.rank_value import RankValueTransformerEncoder
from perturbedvae.errors import ConfigError
from perturbedvae.train.config import ExperimentConfig, load_config
from perturbedvae.train.representation import CachedEmbeddings, EncoderWithHead, head_of
from perturbedvae.train.runs import build_datamodule, load_data, load_or_make_split, load_run, new_module
from perturbedvae.train.trainer import Trainer, TrainingArguments
from tests.conftest import REPO, VOCAB_DIR
from tests.test_encoders_geneformer import write_tiny_geneformer
from tests.test_lora import expected_lora_parameters

pytestmark = [
    pytest.mark.usefixtures("fresh_accelerate_state"),
    pytest.mark.filterwarnings("ignore:unpickling", "ignore:no counts found", "ignore:loading"),
]
CARD = REPO / "adapters/geneformer-v1.yaml"
CONDITIONS = ["control", "KLF1", "MAP2K6", "TGFBR2", "MAP2K3", "MAPK1",
              "KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+MAP2K6", "MAPK1+TGFBR2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_geneformer(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def data_path(tmp_path_factory, norman_data) -> Path:
    """12 real Norman cells of each of 10 conditions (real gene symbols, so the V1 vocabulary reads them)."""
    adata = norman_data.adata
    keep = np.concatenate([np.flatnonzero(adata.obs["condition"].to_numpy() == name)[:12] for name in CONDITIONS])
    path = tmp_path_factory.mktemp("data") / "tiny_norman.h5ad"
    adata[keep].copy().write_h5ad(path)
    return path


def encoder_config(data_path: Path, checkpoint: Path, run_dir: Path, **representation) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "data": {"path": str(data_path), "n_de_genes": 10},
        "split": {"scheme": "doubles", "seed": 1, "params": {"test_fraction": 0.5, "val_fraction": 0.5}},
        "representation": {"kind": "encoder", "adapter": str(CARD), "checkpoint": str(checkpoint),
                           "vocab_dir": str(VOCAB_DIR), "embed_batch_size": 32, **representation},
        "model": {"likelihood": "gaussian", "n_latent": 4, "n_hidden": 16, "n_layers": 1},
        "train": {"epochs": 2, "batch_size": 32, "lr": 1e-2, "kl_warmup_epochs": 1, "sparsity_warmup_epochs": 1,
                  "n_control_cells": 12},
        "output": {"run_dir": str(run_dir)},
    })


def count_embed_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = RankValueTransformerEncoder.embed

    def counted(self, batch):
        calls.append(len(batch["input_ids"]))
        return original(self, batch)

    monkeypatch.setattr(RankValueTransformerEncoder, "embed", counted)
    return calls


def test_frozen_encoder_embeds_once_into_the_cache_and_later_runs_reuse_it(data_path, checkpoint, tmp_path, monkeypatch):
    calls = count_embed_calls(monkeypatch)
    config = encoder_config(data_path, checkpoint, tmp_path / "first", cache_dir=str(tmp_path / "cache"))
    train_from_config(config)
    n_cells = len(CONDITIONS) * 12
    assert sum(calls) == n_cells  # every cell once, none again during training, validation or testing
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and (entries[0] / MANIFEST).is_file()

    AcceleratorState._reset_state(reset_partial_state=True)
    calls.clear()
    second = train_from_config(encoder_config(data_path, checkpoint, tmp_path / "second", cache_dir=str(tmp_path / "cache")))
    assert calls == [] and list((tmp_path / "cache").iterdir()) == entries
    assert json.loads((second / "metrics.json").read_text())["perturbedvae"]["overall"]
    info = json.loads((second / "run_info.json").read_text())
    assert not (second / "adapters").exists()

    run = load_run(second)
    cached = run.datamodule.representation.matrix
    assert isinstance(cached, CachedEmbeddings) and cached.shape == (n_cells, 16)
    encoder = load_encoder(CARD, checkpoint, vocab_dir=VOCAB_DIR)
    rows = np.array([5, 0, n_cells - 1, 40])
    inputs = encoder.prepare(run.datamodule.data.adata[rows])
    with torch.no_grad():
        np.testing.assert_allclose(cached[rows], encoder.embed(inputs).numpy(), rtol=1e-5, atol=1e-6)
    assert info["trainable_parameters"] == count_trainable(run.model.module)


def test_uncached_frozen_encoder_runs_in_the_step_with_nothing_trainable_in_it(data_path, checkpoint, tmp_path):
    config = encoder_config(data_path, checkpoint, tmp_path, cache_embeddings=False)
    data = load_data(config.data)
    datamodule = build_datamodule(config, data, load_or_make_split(config.split, data))
    batch = datamodule.collate(datamodule.train_cells[:4])
    assert "h" not in batch and batch["encoder_inputs"]["input_ids"].shape[0] == 4
    module = new_module(config, datamodule)
    result = Trainer(module, TrainingArguments.for_head(config.train, head_of(module)), datamodule, tmp_path).fit()
    module = result.module
    assert isinstance(module, EncoderWithHead) and count_trainable(module.backbone) == 0
    assert result.run_info["trainable_parameters"] == count_trainable(module.head)
    module.train()
    assert module.head.training and not module.backbone.training  # frozen: no dropout, like the cache
    reference = load_encoder(CARD, checkpoint, vocab_dir=VOCAB_DIR)
    inputs = reference.prepare(data.adata[:8])
    with torch.no_grad():
        torch.testing.assert_close(module.embed_cells(inputs), reference.embed(inputs))


def test_the_experiments_pooling_reaches_the_cached_embeddings(data_path, checkpoint, tmp_path):
    config = encoder_config(data_path, checkpoint, tmp_path, pooling="max", cache_dir=str(tmp_path / "cache"))
    data = load_data(config.data)
    representation = build_datamodule(config, data, load_or_make_split(config.split, data)).representation
    assert representation.encoder.card.pooling == "max"
    reference = load_encoder(CARD, checkpoint, vocab_dir=VOCAB_DIR, pooling="max")
    rows = np.array([0, 7, 30])
    with torch.no_grad():
        expected = reference.embed(reference.prepare(data.adata[rows])).numpy()
    np.testing.assert_allclose(representation.matrix[rows], expected, rtol=1e-5, atol=1e-6)


def test_standardizing_the_embeddings_of_an_encoder_in_the_step_is_refused(data_path, checkpoint, tmp_path):
    config = encoder_config(data_path, checkpoint, tmp_path, finetune="lora", lora_r=2, lora_alpha=4)
    config = ExperimentConfig.from_dict({**config.to_dict(), "model": {**config.model, "standardize_inputs": True}})
    data = load_data(config.data)
    datamodule = build_datamodule(config, data, load_or_make_split(config.split, data))
    with pytest.raises(ConfigError, match="inside the training step"):
        new_module(config, datamodule)


def test_lora_trains_adapters_and_head_while_base_weights_stay(data_path, checkpoint, tmp_path):
    config = encoder_config(data_path, checkpoint, tmp_path, finetune="lora", lora_r=2, lora_alpha=4, lora_dropout=0.0)
    data = load_data(config.data)
    datamodule = build_datamodule(config, data, load_or_make_split(config.split, data))
    module = new_module(config, datamodule)
    result = Trainer(module, TrainingArguments.for_head(config.train, head_of(module)), datamodule, tmp_path).fit()
    module = result.module
    assert isinstance(module, EncoderWithHead)

    original = BertModel.from_pretrained(str(checkpoint), add_pooling_layer=False).state_dict()
    trained = {name.replace(".base_layer", ""): value for name, value in module.backbone.state_dict().items() if "lora_" not in name}
    assert trained.keys() == original.keys()
    for name, value in original.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=0)
    moved = {name.split(".")[2]: bool(value.abs().sum() > 0) for name, value in module.backbone.named_parameters() if "lora_B" in name}
    assert moved == {"0": True}  # B starts at zero and moved; the card reads state -2, so layer 1 has no adapters

    all_layers = expected_lora_parameters(BertModel.from_pretrained(str(checkpoint), add_pooling_layer=False), ("query", "value"), r=2)
    lora = all_layers // 2  # layer 0 of the 2 layers
    head = sum(parameter.numel() for parameter in module.head.parameters())
    assert count_trainable(module) == result.run_info["trainable_parameters"] == head + lora
    assert {name.split(".")[0] for name, parameter in module.named_parameters() if parameter.requires_grad} == {"backbone", "head"}


def test_a_lora_run_saves_adapters_and_predicts_with_them_after_reload(data_path, checkpoint, tmp_path):
    config = encoder_config(data_path, checkpoint, tmp_path / "lora", finetune="lora", lora_r=4, lora_dropout=0.0)
    run_dir = train_from_config(config)
    assert (run_dir / "adapters" / "adapter_config.json").is_file() and (run_dir / "model").is_dir()
    saved = json.loads((run_dir / "metrics.json").read_text())["perturbedvae"]["per_condition"]

    run = load_run(run_dir)
    assert isinstance(run.predictor, EncoderWithHead) and count_trainable(run.predictor.backbone) == 0
    predicted = run.predict(sorted(saved))
    observed = run.datamodule.data
    control = observed.adata.X[observed.conditions == "control"].mean(axis=0).A1
    for name, scores in saved.items():
        truth = observed.adata.X[observed.conditions == name].mean(axis=0).A1
        delta = np.corrcoef(predicted.means.loc[name].to_numpy() - control, truth - control)[0, 1]
        assert delta == pytest.approx(scores["pearson_delta"], abs=1e-5)

    without_adapters = EncoderWithHead(load_encoder(CARD, checkpoint, vocab_dir=VOCAB_DIR), run.model.module, finetune=False)
    inputs = run.datamodule.control_inputs(run.datamodule.control_cells(12, 0))["encoder_inputs"]
    assert not torch.allclose(run.predictor.embed_cells(inputs), without_adapters.embed_cells(inputs), atol=1e-4)


@pytest.mark.slow
def test_two_cpu_processes_train_a_lora_run(data_path, checkpoint, tmp_path):
    config = tmp_path / "lora.yaml"
    encoder_config(data_path, checkpoint, tmp_path / "ddp", finetune="lora").save(config)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "scripts" / "train.py"), "--config", str(config)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["distributed_type"].endswith("MULTI_CPU")
    assert (run_dir / "adapters" / "adapter_model.safetensors").is_file()
    assert load_config(run_dir / "config.yaml").representation.finetune == "lora"
    assert load_run(run_dir).predict(["KLF1+MAP2K6"]).conditions == ["KLF1+MAP2K6"]


def test_encoder_gene_embeddings_give_genes_held_out_by_the_split_an_effect(data_path, checkpoint, tmp_path):
    config = encoder_config(data_path, checkpoint, tmp_path / "unseen", cache_dir=str(tmp_path / "cache"))
    values = {**config.to_dict(), "split": {"scheme": "unseen_singles", "seed": 1, "params": {"test_fraction": 0.2}},
              "gene_features": {"sources": ["encoder"]}, "train": {**config.to_dict()["train"], "selection": "last"}}
    config = ExperimentConfig.from_dict(values)
    data = load_data(config.data)
    split = load_or_make_split(config.split, data)
    datamodule = build_datamodule(config, data, split)
    held_out = sorted({gene for name in split.test for gene in name.split("+")} - {gene for name in split.train for gene in name.split("+")})
    assert held_out and set(held_out) <= set(datamodule.perturbation_genes)
    encoder = datamodule.representation.encoder
    expected = encoder.gene_embeddings(datamodule.perturbation_genes).numpy()
    np.testing.assert_allclose(datamodule.gene_features.values, expected, atol=1e-6)  # V1 covers every gene: no identity columns
    run_dir = train_from_config(config)
    metrics = json.loads((run_dir / "metrics.json").read_text())["perturbedvae"]
    assert "unseen_single" in metrics["per_subgroup"] and set(metrics["per_condition"]) == set(split.test)
