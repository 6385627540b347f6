"""Encoders without a pretrained network: precomputed embeddings and expression itself.

`precomputed` reads embeddings a user computed elsewhere from `adata.obsm[key]`. `expression` feeds the
head the log-normalized expression, or its PCA, so the head runs stand-alone (and as a baseline for
what a pretrained encoder adds).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from perturbedvae.checks import check_number
from perturbedvae.encoders.base import GeneCoverage
from perturbedvae.encoders.cards import AdapterCard
from perturbedvae.encoders.vocab import measure_coverage
from perturbedvae.errors import ConfigError, DataError

FEATURES = "features"
REPRESENTATIONS = ("log_normalized", "pca")


class _FeatureEncoder:
    """Shared behaviour of encoders whose `prepare` already yields the embedding (its width is known once read)."""

    name: str
    _hidden_size: int | None = None

    @property
    def hidden_size(self) -> int:
        if self._hidden_size is None:
            raise ConfigError(f"{self.name}: the embedding size is known after prepare(adata) has read the data")
        return self._hidden_size

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch[FEATURES]

    def gene_embeddings(self, genes: Sequence[str]) -> torch.Tensor | None:
        return None

    def trainable_module(self) -> torch.nn.Module | None:
        return None


class PrecomputedEncoder(_FeatureEncoder):
    """Embeddings stored in `adata.obsm[obsm_key]`; every gene counts as covered (no vocabulary)."""

    def __init__(self, name: str, obsm_key: str):
        self.name = name
        self.obsm_key = obsm_key

    def prepare(self, adata: ad.AnnData) -> dict[str, torch.Tensor]:
        if self.obsm_key not in adata.obsm:
            raise DataError(f"obsm has no {self.obsm_key!r}; available: {', '.join(adata.obsm) or 'none'}. Set obsm_key in the card")
        values = np.asarray(adata.obsm[self.obsm_key], dtype=np.float32)
        if values.ndim != 2 or not np.isfinite(values).all():
            raise DataError(f"obsm[{self.obsm_key!r}] must be a finite 2-d array (cells x dims), got shape {values.shape}")
        self._hidden_size = values.shape[1]
        return {FEATURES: torch.from_numpy(values)}

    def gene_coverage(self, genes: Sequence[str], perturbed_genes: Sequence[str]) -> GeneCoverage:
        return measure_coverage(genes, perturbed_genes, set(genes) | set(perturbed_genes))


class ExpressionEncoder(_FeatureEncoder):
    """Log-normalized expression (as the loader makes it), or its top principal components.

    `prepare` fits its PCA on the AnnData it is given (the `embed` command's cache of a whole dataset).
    Training never does: a run with an expression card fits the PCA on its training cells only
    (`perturbedvae.train.representation`), reading `pca_components` from here.
    """

    def __init__(self, name: str, representation: str = "log_normalized", n_components: int = 50):
        if representation not in REPRESENTATIONS:
            raise ConfigError(f"{name}: representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}")
        self.name = name
        self.representation = representation
        self.n_components = n_components
        self._hidden_size = n_components if representation == "pca" else None

    @property
    def pca_components(self) -> int | None:
        """Principal components the card asks for; None for log-normalized expression itself."""
        return self.n_components if self.representation == "pca" else None

    def prepare(self, adata: ad.AnnData) -> dict[str, torch.Tensor]:
        matrix = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
        matrix = matrix.astype(np.float32)
        if self.representation == "pca":
            matrix = principal_components(matrix, self.n_components)
        self._hidden_size = matrix.shape[1]
        return {FEATURES: torch.from_numpy(np.ascontiguousarray(matrix))}

    def gene_coverage(self, genes: Sequence[str], perturbed_genes: Sequence[str]) -> GeneCoverage:
        return measure_coverage(genes, perturbed_genes, set(genes))


def principal_components(matrix: np.ndarray, n_components: int) -> np.ndarray:
    """Scores on the top principal components, signs fixed (largest loading positive) so runs agree."""
    check_number("n_components (for this data)", n_components, low=1, high=min(matrix.shape), integer=True)
    centred = matrix - matrix.mean(axis=0, keepdims=True)
    _, _, components = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    components = components[:n_components]
    signs = np.sign(components[np.arange(n_components), np.abs(components).argmax(axis=1)])
    return (centred @ (components * signs[:, None]).T).astype(np.float32)


def load_precomputed(card: AdapterCard, checkpoint: Path | None = None) -> PrecomputedEncoder:
    """Registry entry point; precomputed embeddings need no checkpoint."""
    return PrecomputedEncoder(card.name, card.option("obsm_key"))


def load_expression(card: AdapterCard, checkpoint: Path | None = None) -> ExpressionEncoder:
    """Registry entry point; expression needs no checkpoint."""
    return ExpressionEncoder(card.name, card.option("representation", "log_normalized"), card.option("n_components", 50))
