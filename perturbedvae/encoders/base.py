"""The encoder protocol: how any cell encoder feeds the PerturbedVAE head.

An encoder turns an AnnData into per-cell model inputs once (`prepare`: tokenization, gene mapping) and
maps a batch of those inputs to cell embeddings (`embed`). The head only ever sees the embeddings, so a
frozen encoder can run once into a cache, and a LoRA-adapted one can run inside every training step.

Attributes added outside the protocol (so hand-written encoders need not define them):
`load_encoder` sets `card` (the validated AdapterCard) and `fingerprint` (hash of card, vocabulary and
checkpoint files; the embedding cache requires it), and `apply_lora` sets `peft_model`. Encoders with
weights are returned in eval mode; a trainer fine-tuning one calls `trainable_module().train()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import anndata as ad
import torch


@dataclass
class GeneCoverage:
    """How much of a dataset an encoder's vocabulary can see."""

    n_genes: int
    n_covered: int
    n_perturbed: int
    n_perturbed_covered: int
    missing_perturbed: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.n_covered / self.n_genes if self.n_genes else 0.0

    @property
    def perturbed_fraction(self) -> float:
        return self.n_perturbed_covered / self.n_perturbed if self.n_perturbed else 1.0


@runtime_checkable
class CellEncoder(Protocol):
    """What every encoder kind implements (see `perturbedvae.encoders` for the kinds and cards)."""

    name: str

    @property
    def hidden_size(self) -> int:
        """Dimension of the cell embeddings `embed` returns."""

    def prepare(self, adata: ad.AnnData) -> dict[str, torch.Tensor]:
        """Per-cell model inputs, every tensor with one row per cell (row i = cell i of `adata`)."""

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cell embeddings [n_cells, hidden_size] of a batch of `prepare` rows; differentiable when trainable."""

    def gene_coverage(self, genes: Sequence[str], perturbed_genes: Sequence[str]) -> GeneCoverage:
        """How many dataset genes and perturbed genes the encoder's vocabulary covers."""

    def gene_embeddings(self, genes: Sequence[str]) -> torch.Tensor | None:
        """Optional per-gene embeddings [len(genes), d] used as perturbation features (None if unavailable)."""

    def trainable_module(self) -> torch.nn.Module | None:
        """The backbone nn.Module to fine-tune (LoRA wraps it), or None for encoders without weights."""
