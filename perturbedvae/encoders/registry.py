"""`load_encoder`: adapter card (+ checkpoint directory) -> a ready CellEncoder.

Every encoder it returns also carries `card` (the validated AdapterCard, whose LoRA targets `apply_lora`
reads) and `fingerprint` (a hash of the card, its vocabulary files and every checkpoint file), which keys
the embedding cache so a changed card, vocabulary or weight file never reuses stale embeddings.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from perturbedvae.encoders.base import CellEncoder
from perturbedvae.encoders.cards import AdapterCard, load_card, with_pooling
from perturbedvae.errors import CheckpointError, ConfigError
from perturbedvae.files import file_digest

# kind -> "module:function" building it from (card, checkpoint); imported on use so a precomputed or
# expression encoder never pays for importing transformers.
LOADERS: dict[str, str] = {
    "geneformer": "perturbedvae.encoders.geneformer:load_geneformer",
    "scgpt": "perturbedvae.encoders.scgpt:load_scgpt",
    "huggingface": "perturbedvae.encoders.huggingface:load_huggingface",
    "precomputed": "perturbedvae.encoders.simple:load_precomputed",
    "expression": "perturbedvae.encoders.simple:load_expression",
}


def load_encoder(
    card: str | Path | Mapping[str, Any],
    checkpoint: str | Path | None = None,
    *,
    vocab_dir: str | Path | None = None,
    pooling: str | None = None,
) -> CellEncoder:
    """Build the encoder an adapter card describes.

    Args:
        card: Path of a YAML card (e.g. `adapters/geneformer-v1.yaml`) or the card as a mapping.
        checkpoint: Model directory; overrides the card's `checkpoint`. Needed by geneformer, scgpt, huggingface.
        vocab_dir: Vocabulary directory; overrides `PERTURBEDVAE_VOCAB_DIR` and the card.
        pooling: Overrides the card's pooling (`mean`, `cls`, `max`); it joins the card in the fingerprint.

    Raises:
        ConfigError: invalid card, or a `class:` that cannot be imported or does not implement CellEncoder.
        CheckpointError: missing or unreadable checkpoint.
    """
    adapter = load_card(card, vocab_dir)
    if pooling is not None:
        adapter = with_pooling(adapter, pooling)
    directory = _checkpoint_dir(adapter, checkpoint)
    if adapter.encoder_class:
        encoder = _user_encoder(adapter, directory)
    else:
        module_name, function_name = LOADERS[adapter.kind].split(":")
        encoder = getattr(importlib.import_module(module_name), function_name)(adapter, directory)
    encoder.card = adapter
    encoder.fingerprint = encoder_fingerprint(adapter, directory)
    return encoder


def _checkpoint_dir(card: AdapterCard, checkpoint: str | Path | None) -> Path | None:
    directory = Path(checkpoint) if checkpoint is not None else card.checkpoint
    if directory is None:
        if card.schema.needs_checkpoint and not card.encoder_class:
            raise CheckpointError(f"{card.name}: kind {card.kind!r} needs a model directory: pass checkpoint=... (CLI: --checkpoint DIR)")
        return None
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} is not a directory; give the folder holding the model files")
    return directory


def _user_encoder(card: AdapterCard, checkpoint: Path | None) -> CellEncoder:
    """Instantiate `class: module:Class` as `Class(card, checkpoint)`; the user named the module, so importing it is theirs."""
    module_name, class_name = card.encoder_class.split(":")
    try:
        encoder_type = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{card.name}: cannot import class {card.encoder_class!r} ({error}); is its package installed?") from None
    encoder = encoder_type(card, checkpoint)
    if not isinstance(encoder, CellEncoder):
        raise ConfigError(
            f"{card.encoder_class} does not implement the CellEncoder protocol (name, hidden_size, prepare, embed, "
            "gene_coverage, gene_embeddings, trainable_module); see perturbedvae/encoders/base.py"
        )
    return encoder


def encoder_fingerprint(card: AdapterCard, checkpoint: Path | None) -> str:
    """Hash of the card, its vocabulary files and every file under the checkpoint directory."""
    digest = hashlib.sha256(json.dumps(card.raw, sort_keys=True, default=str).encode())
    files = [path for path in card.vocab_files.values() if path.is_file()]
    if checkpoint is not None:
        files += sorted(path for path in checkpoint.rglob("*") if path.is_file())
    for path in files:
        digest.update(path.name.encode())
        digest.update(file_digest(path).encode())
    return digest.hexdigest()[:16]
