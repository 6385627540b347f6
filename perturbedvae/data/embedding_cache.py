"""Cell embeddings of a frozen encoder, computed once and cached as an Arrow dataset.

A cache entry lives in `<cache_dir>/<data fingerprint>-<encoder fingerprint>/`: the data fingerprint
(`PerturbationData.fingerprint`) changes with the expression, genes or conditions, the encoder's
(`encoder.fingerprint`, set by `load_encoder`) with its card, vocabulary files or any checkpoint file.
Embeddings are written shard by shard (HuggingFace `datasets`, `save_to_disk`) under a tqdm bar; each
finished shard is recorded with the SHA-256 of its Arrow files in `manifest.json`, so an interrupted run
resumes at the first unfinished shard. Reading memory-maps the shards, and a shard whose files no longer
match its hash, or a manifest for other data or another encoder, raises `CheckpointError`: a cache is
never silently reused.

The encoder is used through its protocol only (`prepare`, `embed`, `hidden_size`, `fingerprint`), so this
module imports nothing from `perturbedvae.encoders` (data sits below encoders).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from perturbedvae.checks import check_number
from perturbedvae.data.loading import PerturbationData
from perturbedvae.errors import CheckpointError, ConfigError, DataError
from perturbedvae.files import file_digest

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
SHARD_PREFIX = "shard-"
DEFAULT_SHARD_SIZE = 1024


def cache_entry(cache_dir: str | Path, data: PerturbationData, encoder: Any) -> Path:
    """Directory of the cache entry for this data and encoder (it may not exist yet)."""
    return Path(cache_dir) / f"{data.fingerprint}-{_encoder_fingerprint(encoder)}"


def embed_to_cache(
    data: PerturbationData,
    encoder: Any,
    cache_dir: str | Path,
    batch_size: int = 64,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> Path:
    """Embed every cell of `data` with a frozen `encoder` into the cache; resume if partly done.

    Returns:
        The cache entry directory (give it, or `cache_dir`, to `load_embeddings`).
    """
    check_number("batch_size", batch_size, low=1, integer=True)
    check_number("shard_size", shard_size, low=1, integer=True)
    if data.backed:
        raise DataError("embedding cells needs their expression in memory; load the data without backed mode")
    entry = cache_entry(cache_dir, data, encoder)
    manifest = _open_manifest(entry, data, encoder, shard_size)
    n_cells = data.adata.n_obs
    shard_size = manifest["shard_size"]
    pending = [shard for shard in range(math.ceil(n_cells / shard_size)) if _shard_name(shard) not in manifest["shards"]]
    if not pending:
        return entry
    inputs = encoder.prepare(data.adata)
    manifest["hidden_size"] = int(encoder.hidden_size)
    done_cells = n_cells - sum(len(_shard_rows(shard, shard_size, n_cells)) for shard in pending)
    with tqdm(total=n_cells, initial=done_cells, unit="cell", desc=f"embedding with {encoder.name}") as bar:
        for shard in pending:
            rows = _shard_rows(shard, shard_size, n_cells)
            embeddings = _embed_rows(encoder, inputs, rows, batch_size, bar)
            manifest["shards"][_shard_name(shard)] = _write_shard(entry, shard, rows, embeddings)
            _write_json(entry / MANIFEST, manifest)
    return entry


def load_embeddings(cache_dir: str | Path, data: PerturbationData, encoder: Any) -> np.ndarray:
    """All cell embeddings [n_cells, hidden_size] (float32) from a complete, verified cache entry."""
    import datasets

    shards = open_embedding_shards(cache_dir, data, encoder)
    table = datasets.concatenate_datasets(shards).with_format("numpy")[:]
    return np.asarray(table["embedding"], dtype=np.float32)


def open_embedding_shards(cache_dir: str | Path, data: PerturbationData, encoder: Any) -> list:
    """The verified shards as memory-mapped `datasets.Dataset`s (columns `cell`, `embedding`), in cell order.

    Raises:
        CheckpointError: no entry, an entry for other data or another encoder, an unfinished entry, or a
            shard whose files are missing, truncated or changed.
    """
    import datasets

    cache_dir = Path(cache_dir)
    entry = cache_dir if (cache_dir / MANIFEST).is_file() else cache_entry(cache_dir, data, encoder)
    if not (entry / MANIFEST).is_file():
        raise CheckpointError(
            f"no embedding cache for this data and encoder under {cache_dir} (expected {entry.name}); "
            "create it with embed_to_cache(...) or `perturbedvae embed`"
        )
    manifest = _read_manifest(entry)
    _check_identity(manifest, entry, data, encoder)
    n_cells, shard_size = manifest["n_cells"], manifest["shard_size"]
    shards = []
    for shard in range(math.ceil(n_cells / shard_size)):
        name = _shard_name(shard)
        if name not in manifest["shards"]:
            raise CheckpointError(f"{entry} is incomplete ({name} was never finished); run embed_to_cache again to resume it")
        if _shard_digest(entry / name) != manifest["shards"][name]:
            raise CheckpointError(f"{entry / name} is corrupt or was modified (hash mismatch); delete {entry} and embed again")
        dataset = datasets.load_from_disk(str(entry / name))
        expected = _shard_rows(shard, shard_size, n_cells)
        cells = dataset.with_format("numpy")[:]["cell"]
        if not np.array_equal(cells, expected):
            raise CheckpointError(f"{entry / name} holds the wrong cells; delete {entry} and embed again")
        shards.append(dataset)
    return shards


def _encoder_fingerprint(encoder: Any) -> str:
    fingerprint = getattr(encoder, "fingerprint", None)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ConfigError(
            f"encoder {getattr(encoder, 'name', encoder)!r} has no fingerprint; encoders from load_encoder have one, "
            "otherwise set encoder.fingerprint to a string that changes whenever its weights or inputs change"
        )
    return fingerprint


def _open_manifest(entry: Path, data: PerturbationData, encoder: Any, shard_size: int) -> dict[str, Any]:
    """The entry's manifest (checked against data and encoder), or a new one; drops half-written shards."""
    if (entry / MANIFEST).is_file():
        manifest = _read_manifest(entry)
        _check_identity(manifest, entry, data, encoder)
    else:
        entry.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": CACHE_FORMAT,
            "data_fingerprint": data.fingerprint,
            "encoder_fingerprint": encoder.fingerprint,
            "encoder": encoder.name,
            "n_cells": int(data.adata.n_obs),
            "shard_size": int(shard_size),
            "shards": {},
        }
    for leftover in entry.glob(f"{SHARD_PREFIX}*"):
        if leftover.name not in manifest["shards"]:
            shutil.rmtree(leftover)
    return manifest


def _read_manifest(entry: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if manifest.get("format") != CACHE_FORMAT or not isinstance(manifest.get("shards"), dict):
            raise ValueError("unknown format")
        return manifest
    except (ValueError, OSError) as error:
        raise CheckpointError(f"{entry / MANIFEST} is unreadable ({error}); delete {entry} and embed again") from None


def _check_identity(manifest: dict[str, Any], entry: Path, data: PerturbationData, encoder: Any) -> None:
    for field, actual, what in (
        ("data_fingerprint", data.fingerprint, "data"),
        ("encoder_fingerprint", _encoder_fingerprint(encoder), "encoder (card, vocabulary or checkpoint files)"),
        ("n_cells", int(data.adata.n_obs), "number of cells"),
    ):
        if manifest.get(field) != actual:
            raise CheckpointError(
                f"{entry} was made for another {what} ({field} {manifest.get(field)} != {actual}); "
                "point to the right cache or embed again"
            )


def _shard_name(shard: int) -> str:
    return f"{SHARD_PREFIX}{shard:05d}"


def _shard_rows(shard: int, shard_size: int, n_cells: int) -> np.ndarray:
    return np.arange(shard * shard_size, min((shard + 1) * shard_size, n_cells))


def _embed_rows(encoder: Any, inputs: dict[str, torch.Tensor], rows: np.ndarray, batch_size: int, bar) -> np.ndarray:
    parts = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            index = torch.from_numpy(rows[start : start + batch_size])
            batch = {key: value[index] for key, value in inputs.items()}
            parts.append(encoder.embed(batch).float().cpu().numpy())
            bar.update(len(index))
    embeddings = np.concatenate(parts)
    if not np.isfinite(embeddings).all():
        raise CheckpointError(f"encoder {encoder.name} produced NaN/inf embeddings; check the checkpoint")
    return embeddings


def _write_shard(entry: Path, shard: int, rows: np.ndarray, embeddings: np.ndarray) -> str:
    """Save one shard via a temporary directory and an atomic rename; return its digest."""
    import datasets
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    features = datasets.Features({
        "cell": datasets.Value("int64"),
        "embedding": datasets.List(datasets.Value("float32"), length=embeddings.shape[1]),
    })
    dataset = datasets.Dataset.from_dict({"cell": rows, "embedding": embeddings}, features=features)
    final = entry / _shard_name(shard)
    partial = entry / f".partial-{final.name}"
    shutil.rmtree(partial, ignore_errors=True)
    bars_were_on = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        dataset.save_to_disk(str(partial))
    finally:
        if bars_were_on:
            enable_progress_bars()
    partial.rename(final)
    return _shard_digest(final)


def _shard_digest(shard_dir: Path) -> str:
    """SHA-256 over the shard's Arrow files; missing files give a digest that matches nothing."""
    digest = hashlib.sha256()
    for path in sorted(shard_dir.glob("*.arrow")):
        digest.update(path.name.encode())
        digest.update(bytes.fromhex(file_digest(path)))  # the same bytes as before, read in blocks
    return digest.hexdigest()


def _write_json(path: Path, value: dict[str, Any]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    partial.replace(path)
