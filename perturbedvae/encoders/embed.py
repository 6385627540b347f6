"""`perturbedvae embed`: data file + adapter card (+ checkpoint) -> coverage report and embedding cache."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from perturbedvae.data.embedding_cache import cache_entry, embed_to_cache
from perturbedvae.data.loading import PerturbationData, load_dataset
from perturbedvae.encoders.base import CellEncoder
from perturbedvae.encoders.registry import load_encoder
from perturbedvae.encoders.vocab import check_coverage

COVERAGE_FILE = "coverage.json"


def check_encoder_coverage(
    encoder: CellEncoder,
    data: PerturbationData,
    min_gene_coverage: float | None = None,
    min_perturbed_coverage: float | None = None,
    report_path: str | Path | None = None,
) -> dict[str, Any]:
    """Log/save the encoder's coverage of `data`; thresholds default to the encoder's card (else 0).

    Raises:
        ConfigError: coverage below a threshold.
    """
    card = getattr(encoder, "card", None)
    return check_coverage(
        encoder.gene_coverage(data.genes, data.perturbed_genes),
        encoder.name,
        min_gene_coverage if min_gene_coverage is not None else getattr(card, "min_gene_coverage", 0.0),
        min_perturbed_coverage if min_perturbed_coverage is not None else getattr(card, "min_perturbed_coverage", 0.0),
        report_path,
    )


def run_embed(
    data: PerturbationData | str | Path,
    adapter: str | Path | Mapping[str, Any],
    checkpoint: str | Path | None = None,
    out: str | Path = "embeddings",
    batch_size: int = 64,
    *,
    vocab_dir: str | Path | None = None,
    min_gene_coverage: float | None = None,
    min_perturbed_coverage: float | None = None,
    **load_kwargs: Any,
) -> Path:
    """Check the encoder's coverage of the data and embed it into the cache under `out`.

    `data` is a loaded dataset or a path (then `load_kwargs` go to `load_dataset`).

    Returns:
        The cache entry directory; it also holds `coverage.json`.
    """
    if not isinstance(data, PerturbationData):
        data = load_dataset(data, **load_kwargs)
    encoder = load_encoder(adapter, checkpoint, vocab_dir=vocab_dir)
    entry = cache_entry(out, data, encoder)
    check_encoder_coverage(encoder, data, min_gene_coverage, min_perturbed_coverage, entry / COVERAGE_FILE)
    return embed_to_cache(data, encoder, out, batch_size)
