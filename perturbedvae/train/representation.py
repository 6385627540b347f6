"""Cell representations `h`: what the head's encoder reads for each cell.

The head is agnostic to where `h` comes from (the project's point: any cell encoder can feed it), so
this module turns a `RepresentationConfig` into one matrix with a row per cell. Anything fitted (the PCA
basis) is fitted on training cells only, so held-out conditions never leak into the inputs, and is
saved in the run directory so predictions after training use the very same projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from perturbedvae.data.loading import PerturbationData
from perturbedvae.encoders import CellEncoder, load_encoder
from perturbedvae.errors import CheckpointError, ConfigError
from perturbedvae.train.config import RepresentationConfig

PCA_FILE = "representation.npz"
_PCA_FIT_MAX_CELLS = 50_000
_PROJECT_CHUNK = 8192


@dataclass
class Representation:
    """A representation of every cell: `matrix` [n_cells, dim], sparse only for raw expression.

    Attributes:
        fitted: Arrays that define the representation beyond the config (PCA `mean`, `components`).
        encoder: The cell encoder that embedded the cells (kind "encoder"); it also gives gene features.
    """

    matrix: np.ndarray | sp.csr_matrix
    fitted: dict[str, np.ndarray] = field(default_factory=dict)
    encoder: CellEncoder | None = None

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def save(self, run_dir: Path) -> None:
        if self.fitted:
            np.savez(run_dir / PCA_FILE, **self.fitted)


def build_representation(
    config: RepresentationConfig,
    data: PerturbationData,
    train_cells: np.ndarray,
    run_dir: Path | None = None,
) -> Representation:
    """Build `h` for every cell; with `run_dir`, reuse the PCA basis saved there instead of refitting.

    Raises:
        ConfigError: for an absent obsm key, a PCA wider than the data, or LoRA fine-tuning (which
            would have to run inside every training step; not supported yet).
    """
    if config.kind == "obsm":
        return Representation(_obsm_matrix(data, config.obsm_key))
    if config.kind == "encoder":
        if config.finetune != "frozen":
            raise ConfigError(
                f"representation.finetune {config.finetune!r} is not supported by the trainer yet; "
                "use representation.finetune=frozen"
            )
        encoder = load_encoder(config.adapter, config.checkpoint)
        return Representation(embed_cells(encoder, data.adata, config.embed_batch_size), encoder=encoder)
    matrix = data.adata.X
    if config.n_components is None:
        return Representation(sp.csr_matrix(matrix) if sp.issparse(matrix) else np.asarray(matrix, dtype=np.float32))
    fitted = _load_pca(run_dir) if run_dir is not None else _fit_pca(matrix, train_cells, config.n_components)
    return Representation(_project(matrix, fitted["mean"], fitted["components"]), fitted)


@torch.no_grad()
def embed_cells(encoder: CellEncoder, adata: ad.AnnData, batch_size: int) -> np.ndarray:
    """Run a frozen encoder once over every cell, in batches of `batch_size` cells."""
    inputs = encoder.prepare(adata)
    blocks = []
    for start in range(0, adata.n_obs, batch_size):
        batch = {key: value[start : start + batch_size] for key, value in inputs.items()}
        blocks.append(encoder.embed(batch).float().cpu().numpy())
    return np.concatenate(blocks) if blocks else np.zeros((0, encoder.hidden_size), dtype=np.float32)


def _obsm_matrix(data: PerturbationData, key: str | None) -> np.ndarray:
    obsm = data.adata.obsm
    if key not in obsm:
        raise ConfigError(f"representation.obsm_key {key!r} not in adata.obsm; available: {', '.join(obsm.keys()) or 'none'}")
    matrix = obsm[key]
    matrix = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    if matrix.ndim != 2 or not np.isfinite(matrix).all():
        raise ConfigError(f"adata.obsm[{key!r}] must be a finite 2-D matrix with one row per cell")
    return matrix.astype(np.float32)


def _fit_pca(matrix, train_cells: np.ndarray, n_components: int) -> dict[str, np.ndarray]:
    """Principal axes of the training cells from the gene covariance (deterministic, sparse-friendly)."""
    n_genes = matrix.shape[1]
    if n_components > n_genes:
        raise ConfigError(f"representation.n_components ({n_components}) exceeds the {n_genes} genes; lower it")
    cells = np.sort(train_cells)
    if len(cells) > _PCA_FIT_MAX_CELLS:
        cells = np.sort(np.random.default_rng(0).choice(cells, _PCA_FIT_MAX_CELLS, replace=False))
    rows = matrix[cells]
    mean = np.asarray(rows.mean(axis=0), dtype=np.float64).ravel()
    gram = rows.T @ rows
    gram = gram.toarray() if sp.issparse(gram) else np.asarray(gram)
    covariance = gram.astype(np.float64) / len(cells) - np.outer(mean, mean)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    components = eigenvectors[:, np.argsort(eigenvalues)[::-1][:n_components]]
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(n_components)])
    return {"mean": mean.astype(np.float32), "components": (components * signs).astype(np.float32)}


def _project(matrix, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    out = np.empty((matrix.shape[0], components.shape[1]), dtype=np.float32)
    for start in range(0, matrix.shape[0], _PROJECT_CHUNK):
        rows = matrix[start : start + _PROJECT_CHUNK]
        rows = rows.toarray() if sp.issparse(rows) else np.asarray(rows)
        out[start : start + len(rows)] = (rows - mean) @ components
    return out


def _load_pca(run_dir: Path) -> dict[str, np.ndarray]:
    path = run_dir / PCA_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run's PCA basis is needed to rebuild its inputs; retrain the run")
    with np.load(path) as saved:
        return {"mean": saved["mean"], "components": saved["components"]}
