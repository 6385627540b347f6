"""Cell representations `h`: what the head's encoder reads for each cell.

The head is agnostic to where `h` comes from (the project's point: any cell encoder can feed it), so
this module turns a `RepresentationConfig` into one of two things:

- a matrix with a row per cell (expression, its PCA, an obsm entry, or a frozen encoder's embeddings
  read memory-mapped from the embedding cache, so the backbone runs once, not every epoch);
- per-cell encoder inputs (`prepare` rows: token ids, attention) for an encoder that runs inside the
  training step, LoRA-tuned or frozen without the cache; `EncoderWithHead` then makes backbone and head
  one nn.Module, so Accelerate's DDP, mixed precision and checkpoints cover both.

Anything fitted (the PCA basis) is fitted on training cells only, so held-out conditions never leak
into the inputs, and is saved in the run directory so predictions after training use the very same
projection; trained LoRA adapters are saved there too (`ADAPTERS_DIR`) and reattached on reload.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from perturbedvae.data.embedding_cache import embed_to_cache, open_embedding_shards
from perturbedvae.data.loading import PerturbationData
from perturbedvae.data.matrix import ExpressionRows
from perturbedvae.encoders import CellEncoder, load_encoder
from perturbedvae.encoders.embed import check_encoder_coverage
from perturbedvae.encoders.lora import apply_lora, load_adapters
from perturbedvae.encoders.simple import ExpressionEncoder
from perturbedvae.errors import CheckpointError, ConfigError
from perturbedvae.model import LossOutput, LossWeights, PerturbedVAEConfig, PerturbedVAEModule
from perturbedvae.train.config import RepresentationConfig

PCA_FILE = "representation.npz"
ADAPTERS_DIR = "adapters"
ENCODER_INPUTS_KEY = "encoder_inputs"
"""Batch key of the encoder's `prepare` rows when the encoder runs inside the training step."""
DEFAULT_CACHE_DIR = Path("~/.cache/perturbedvae/embeddings")
_PCA_FIT_MAX_CELLS = 50_000


class CachedEmbeddings:
    """Rows of the embedding cache as a read-only [n_cells, dim] matrix backed by memory-mapped Arrow files.

    Indexing with row numbers gathers only those rows, so a training batch touches its cells' pages and
    the full matrix never has to fit in memory.
    """

    def __init__(self, blocks: list[np.ndarray]) -> None:
        self.blocks = blocks
        self.starts = np.cumsum([0] + [len(block) for block in blocks])

    @classmethod
    def open(cls, cache_dir: str | Path, data: PerturbationData, encoder: CellEncoder) -> CachedEmbeddings:
        """Verify the cache entry (see `open_embedding_shards`) and view its embeddings without copying."""
        blocks = []
        for shard in open_embedding_shards(cache_dir, data, encoder):
            for chunk in shard.data.column("embedding").chunks:
                width = chunk.type.list_size
                blocks.append(chunk.flatten().to_numpy(zero_copy_only=True).reshape(-1, width))
        return cls(blocks)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.starts[-1]), int(self.blocks[0].shape[1]) if self.blocks else 0

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        block_of = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        for block in np.unique(block_of):
            hits = block_of == block
            out[hits] = self.blocks[block][rows[hits] - self.starts[block]]
        return out


@dataclass
class Representation:
    """`h` of every cell: a `matrix` [n_cells, dim], or encoder `inputs` when the encoder runs in the loop.

    Attributes:
        matrix: Dense (PCA, obsm), expression rows or cached embeddings; None when `inputs` is set.
        fitted: Arrays that define the representation beyond the config (PCA `mean`, `components`).
        encoder: The cell encoder (kind "encoder"); it also gives gene features.
        inputs: The encoder's `prepare` tensors (row i = cell i) for an encoder run inside each step.
        finetune: Whether the in-loop encoder trains (LoRA) or stays frozen.
        embed_batch_size: Cells per encoder call outside training (predictions).
    """

    matrix: np.ndarray | ExpressionRows | CachedEmbeddings | None
    fitted: dict[str, np.ndarray] = field(default_factory=dict)
    encoder: CellEncoder | None = None
    inputs: dict[str, torch.Tensor] | None = None
    finetune: bool = False
    embed_batch_size: int = 64

    @property
    def in_loop(self) -> bool:
        """Whether the encoder runs inside every training step (batches carry its inputs, not `h`)."""
        return self.inputs is not None

    @property
    def dim(self) -> int:
        return int(self.encoder.hidden_size) if self.matrix is None else int(self.matrix.shape[1])

    def save(self, run_dir: Path) -> None:
        if self.fitted:
            np.savez(run_dir / PCA_FILE, **self.fitted)


def build_representation(
    config: RepresentationConfig,
    data: PerturbationData,
    train_cells: np.ndarray,
    run_dir: Path | None = None,
) -> Representation:
    """Build `h` for every cell; with `run_dir`, reuse what the run fitted (PCA basis, LoRA adapters).

    Raises:
        ConfigError: for an absent obsm key, a PCA wider than the data, or an encoder whose vocabulary
            covers too little of the data.
        CheckpointError: `run_dir` lacks the PCA basis or adapters the config implies.
    """
    if config.kind == "obsm":
        return Representation(_obsm_matrix(data, config.obsm_key))
    if config.kind == "encoder":
        if data.backed:
            raise ConfigError(
                "encoder representations read the whole matrix; load the data in memory (data.backed=false), "
                "or embed it once and give the embeddings as representation.kind=obsm"
            )
        return _encoder_representation(config, data, train_cells, run_dir)
    return _expression_representation(data, train_cells, config.n_components, run_dir)


def _expression_representation(data: PerturbationData, train_cells: np.ndarray, n_components: int | None,
                               run_dir: Path | None) -> Representation:
    """Log-normalized expression, or its projection on the principal axes of the training cells (or the run's)."""
    expression = data.expression
    if n_components is None:
        return Representation(expression)
    fitted = _load_pca(run_dir) if run_dir is not None else _fit_pca(expression, train_cells, n_components)
    return Representation(_project(expression, fitted["mean"], fitted["components"]), fitted)


def _encoder_representation(config: RepresentationConfig, data: PerturbationData, train_cells: np.ndarray,
                            run_dir: Path | None) -> Representation:
    """Frozen: embeddings from the cache (embedded on first use). LoRA: fresh adapters, or the run's.

    An `expression` card is the expression representation: its PCA is fitted here on the training cells,
    never by the card's encoder on every cell (held-out conditions would shape the inputs).
    """
    encoder = load_encoder(config.adapter, config.checkpoint, vocab_dir=config.vocab_dir, pooling=config.pooling)
    if isinstance(encoder, ExpressionEncoder):
        return _expression_representation(data, train_cells, encoder.pca_components, run_dir)
    check_encoder_coverage(encoder, data)
    if config.finetune == "lora":
        if run_dir is None:
            apply_lora(encoder, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout)
        else:
            load_adapters(encoder, run_dir / ADAPTERS_DIR)
    elif config.cache_embeddings:
        cache_dir = Path(config.cache_dir) if config.cache_dir else DEFAULT_CACHE_DIR.expanduser()
        entry = embed_to_cache(data, encoder, cache_dir, config.embed_batch_size)
        return Representation(CachedEmbeddings.open(entry, data, encoder), encoder=encoder)
    inputs = encoder.prepare(data.adata)
    return Representation(None, encoder=encoder, inputs=inputs, finetune=config.finetune == "lora",
                          embed_batch_size=config.embed_batch_size)


class EncoderWithHead(torch.nn.Module):
    """Encoder backbone and PerturbedVAE head as one module: `h` is computed from token inputs in each step.

    The backbone is registered as a submodule, so the optimizer, DDP gradient sync, mixed precision and
    checkpoints see its (LoRA) parameters beside the head's. A frozen backbone stays in eval mode (no
    dropout), matching the cached embeddings it replaces. It exposes the head's `config` and `predict`,
    so code that predicts from `h` works with either module.
    """

    def __init__(self, encoder: CellEncoder, head: PerturbedVAEModule, finetune: bool, embed_batch_size: int = 64) -> None:
        super().__init__()
        backbone = encoder.trainable_module()
        if backbone is None:
            raise ConfigError(f"{encoder.name} has no network weights to run inside training; use a frozen cached encoder")
        if not finetune:
            backbone.requires_grad_(False)  # frozen means no optimizer state and no gradient sync for it
        self.backbone = backbone
        self.head = head
        self.finetune = finetune
        self.embed_batch_size = embed_batch_size
        self._encoder = encoder

    @property
    def config(self) -> PerturbedVAEConfig:
        return self.head.config

    def train(self, mode: bool = True) -> EncoderWithHead:
        super().train(mode)
        self.backbone.train(mode and self.finetune)
        return self

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cell embeddings of a batch of encoder inputs, in float32 whatever precision the backbone ran in."""
        return self._encoder.embed(inputs).float()

    @torch.no_grad()
    def embed_cells(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings of many cells in eval mode, `embed_batch_size` cells per backbone call."""
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self.embed(batch) for batch in _row_batches(inputs, self.embed_batch_size)])
        finally:
            self.train(was_training)

    def forward(self, batch: dict[str, torch.Tensor], weights: LossWeights | None = None) -> LossOutput:
        inputs = {key: value for key, value in batch.items() if key != ENCODER_INPUTS_KEY}
        inputs["h"] = self.embed(batch[ENCODER_INPUTS_KEY])
        return self.head(inputs, weights)

    def predict(self, h_control: torch.Tensor, perturbations: torch.Tensor, library_size: torch.Tensor | None = None,
                sample: bool = False, covariates: torch.Tensor | None = None) -> torch.Tensor:
        return self.head.predict(h_control, perturbations, library_size=library_size, sample=sample, covariates=covariates)


def head_of(module: torch.nn.Module) -> PerturbedVAEModule:
    """The PerturbedVAE head of a training module: the module itself, or the head of an `EncoderWithHead`."""
    return module.head if isinstance(module, EncoderWithHead) else module


def attach_encoder(representation: Representation, head: PerturbedVAEModule) -> torch.nn.Module:
    """The module that maps a batch to the loss: the head alone, or encoder + head for in-loop encoders."""
    if not representation.in_loop:
        return head
    return EncoderWithHead(representation.encoder, head, representation.finetune, representation.embed_batch_size)


def _row_batches(inputs: dict[str, torch.Tensor], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    n_rows = len(next(iter(inputs.values())))
    for start in range(0, n_rows, batch_size):
        yield {key: value[start : start + batch_size] for key, value in inputs.items()}


def _obsm_matrix(data: PerturbationData, key: str | None) -> np.ndarray:
    obsm = data.adata.obsm
    if key not in obsm:
        raise ConfigError(f"representation.obsm_key {key!r} not in adata.obsm; available: {', '.join(obsm.keys()) or 'none'}")
    matrix = obsm[key]
    matrix = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    if matrix.ndim != 2 or not np.isfinite(matrix).all():
        raise ConfigError(f"adata.obsm[{key!r}] must be a finite 2-D matrix with one row per cell")
    return matrix.astype(np.float32)


def _fit_pca(matrix: ExpressionRows, train_cells: np.ndarray, n_components: int) -> dict[str, np.ndarray]:
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


def _project(matrix: ExpressionRows, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """PCA coordinates of every cell, chunk by chunk: (x - mean) @ components without densifying the matrix."""
    out = np.empty((matrix.shape[0], components.shape[1]), dtype=np.float32)
    offset = mean @ components
    for start, rows in matrix.chunks():
        out[start : start + rows.shape[0]] = np.asarray(rows @ components) - offset
    return out


def _load_pca(run_dir: Path) -> dict[str, np.ndarray]:
    path = run_dir / PCA_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run's PCA basis is needed to rebuild its inputs; retrain the run")
    with np.load(path) as saved:
        return {"mean": saved["mean"], "components": saved["components"]}
