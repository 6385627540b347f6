"""A trained model as one directory that holds everything it predicts with and points nowhere outside.

    <dir>/perturbedvae_model.json  format name and version, package version, the number of genes,
                                   the control cells predictions start from (obs names), training history
    <dir>/config.yaml              the experiment settings (the data section names no file)
    <dir>/split.json               the split: training cells and the perturbation vocabulary come from it
    <dir>/head/                    the head (`PerturbedVAEHead.save_pretrained`: config, safetensors, vocabulary)
    <dir>/representation.npz       the PCA basis of a PCA representation
    <dir>/adapter_card.yaml        the encoder's adapter card, copied (encoder representations)
    <dir>/adapters/                LoRA adapters of a fine-tuned encoder (PEFT format)

The data is given back on loading, as scvi-tools' `load(dir, adata)` takes it, and is checked against
the model: the same genes in the same order, the control cells present. Nothing in the directory is an
absolute path to the data, so it works after being moved or copied. An encoder representation keeps a
copy of its card; the encoder's weights and vocabulary files (often gigabytes, shared by many models) are
named by absolute path in config.yaml and must stay where they are.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from perturbedvae import __version__
from perturbedvae.data.conditions import CONTROL
from perturbedvae.data.loading import PerturbationData
from perturbedvae.data.splits import Split
from perturbedvae.encoders import CellEncoder
from perturbedvae.encoders.lora import save_adapters
from perturbedvae.errors import CheckpointError, ConfigError, DataError
from perturbedvae.model import PerturbedVAEHead
from perturbedvae.train.config import ExperimentConfig, load_config
from perturbedvae.train.representation import ADAPTERS_DIR, attach_encoder, head_of
from perturbedvae.train.runs import build_datamodule

if TYPE_CHECKING:
    from perturbedvae.api.model import PerturbedVAE

FORMAT = "perturbedvae-model"
FORMAT_VERSION = 1
MANIFEST_FILE = "perturbedvae_model.json"
CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.json"
HEAD_DIR = "head"
CARD_FILE = "adapter_card.yaml"


def save_model(model: PerturbedVAE, directory: Path, overwrite: bool = False) -> Path:
    """Write a trained model into `directory` (created; an existing model there only with `overwrite`).

    Raises:
        ConfigError: an untrained model, a folder that holds other files, or cell names that repeat.
    """
    state = model.state
    data = state.datamodule.data
    representation = state.datamodule.representation
    config, card = _config_to_save(state.config, representation.encoder)  # before an old folder is replaced
    names = pd.Index(data.adata.obs_names)
    if not names.is_unique:
        raise ConfigError("the data's cell names (obs_names) repeat, so the control cells cannot be named; "
                          "call adata.obs_names_make_unique() before loading the data")
    if directory.exists() and any(directory.iterdir()):
        if not overwrite or not (directory / MANIFEST_FILE).is_file():
            raise ConfigError(f"{directory} is not empty; choose a new folder (or overwrite=True to replace a saved model)")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    head = head_of(state.predictor)
    PerturbedVAEHead(head.config, head, state.datamodule.perturbation_genes, data.genes).save_pretrained(directory / HEAD_DIR)
    representation.save(directory)
    if representation.finetune:
        save_adapters(representation.encoder, directory / ADAPTERS_DIR)
    config.save(directory / CONFIG_FILE)
    if card is not None:
        (directory / CARD_FILE).write_bytes(card)
    state.datamodule.split.save(directory / SPLIT_FILE)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "perturbedvae_version": __version__,
        "n_genes": len(data.genes),
        "data_fingerprint": data.fingerprint,
        "control_cells": [str(name) for name in names[state.controls]],
        "history": state.history,
        "run_info": state.run_info,
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return directory


def _config_to_save(config: ExperimentConfig, encoder: CellEncoder | None) -> tuple[ExperimentConfig, bytes | None]:
    """The config naming the encoder's card by `CARD_FILE` inside the saved folder, and the card's bytes.

    The copy is byte for byte, so the encoder's fingerprint, and with it the embedding cache entry, stays the
    same; the vocabulary directory and weights the card resolved to are pinned by absolute path.
    """
    card = getattr(encoder, "card", None)
    if config.representation.kind != "encoder" or card is None or card.source is None:
        return config, None
    checkpoint = config.representation.checkpoint or card.checkpoint
    representation = dataclasses.replace(
        config.representation,
        adapter=CARD_FILE,
        vocab_dir=str(Path(card.vocab_dir).resolve()) if card.vocab_files else config.representation.vocab_dir,
        checkpoint=str(Path(checkpoint).resolve()) if checkpoint else None,
    )
    return dataclasses.replace(config, representation=representation), Path(card.source).read_bytes()


def load_model(cls: type[PerturbedVAE], directory: Path, data: PerturbationData) -> PerturbedVAE:
    """Read a directory written by `save_model`, predicting from `data` (see the module docstring)."""
    from perturbedvae.api.model import TrainedState, settings_of

    manifest = read_manifest(directory)
    head = PerturbedVAEHead.from_pretrained(directory / HEAD_DIR)
    check_genes(data.genes, head.gene_names)
    config = load_config(directory / CONFIG_FILE)
    split = Split.load(directory / SPLIT_FILE)
    datamodule = build_datamodule(config, data, split, run_dir=directory)
    if head.perturbation_genes != datamodule.perturbation_genes:
        raise CheckpointError(f"{directory / HEAD_DIR} has another perturbation vocabulary than its split.json; re-save the model")
    controls = control_rows(manifest["control_cells"], data)
    state = TrainedState(config, datamodule, attach_encoder(datamodule.representation, head.module), controls,
                         manifest.get("history", []), manifest.get("run_info", {}))
    model = cls(data, split, representation=config.representation)
    model._restore(settings_of(config), state)
    return model


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a saved model, checked for format name and version.

    Raises:
        CheckpointError: not a saved model, a damaged manifest, or a format this version cannot read.
    """
    path = directory / MANIFEST_FILE
    if not path.is_file():
        hint = " (a run directory of `perturbedvae train`: use perturbedvae.train.runs.load_run)" if (directory / "model").is_dir() else ""
        raise CheckpointError(f"{directory} holds no saved PerturbedVAE model ({MANIFEST_FILE} missing){hint}; save one with model.save(dir)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); re-save the model") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest; re-save the model with model.save(dir)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {manifest.get('format_version')!r}; this perturbedvae ({__version__}) reads "
            f"version {FORMAT_VERSION}: load it with the perturbedvae that saved it ({manifest.get('perturbedvae_version')})"
        )
    return manifest


def check_genes(data_genes: Sequence[str], model_genes: Sequence[str]) -> None:
    """Refuse data whose genes are not the model's, in the model's order, saying what differs.

    Raises:
        DataError: naming missing and extra genes, or that only the order differs, and the fix.
    """
    if list(data_genes) == list(model_genes):
        return
    missing, extra = sorted(set(model_genes) - set(data_genes)), sorted(set(data_genes) - set(model_genes))
    if not missing and not extra:
        detail = "the same genes in another order (reorder them: adata[:, model.genes])"
    else:
        detail = (f"{len(missing)} of the model's {len(model_genes)} genes missing from the data (e.g. {', '.join(missing[:5])}), "
                  f"{len(extra)} of the data's genes unknown to the model (e.g. {', '.join(extra[:5])})")
    raise DataError(
        f"the data does not match the saved model's genes: {detail}. Load the data the model was trained on, with "
        "the same reading options (obs_filter, n_top_genes...)"
    )


def control_rows(names: Sequence[str], data: PerturbationData) -> Any:
    """Row numbers in `data` of the model's control cells, named by obs name, in the saved order.

    Raises:
        DataError: a control cell missing from the data, or a cell that is no control cell there.
    """
    index = pd.Index(data.adata.obs_names)
    if not index.is_unique:
        raise DataError("the data's cell names (obs_names) repeat; load the data the model was trained on, with unique cell names")
    rows = index.get_indexer(list(names))
    missing = [name for name, row in zip(names, rows) if row < 0]
    if missing:
        raise DataError(
            f"{len(missing)} of the model's {len(names)} control cells are not in the data (e.g. {', '.join(missing[:3])}); "
            "predictions start from them: load the data the model was trained on (same cells and cell names)"
        )
    not_control = [name for name, row in zip(names, rows) if data.conditions[row] != CONTROL]
    if not_control:
        raise DataError(f"cells {', '.join(not_control[:3])} are control cells for the model but not in this data; load the data it was trained on")
    return rows
