"""Rank-value encoding (Geneformer's input scheme) and a transformer encoder that reads it.

Geneformer describes each cell by its genes ordered from most to least expressed *relative to that
gene's typical expression*: counts / total counts x 10,000, divided by the gene's median over the
pretraining corpus, zeros dropped, sorted descending, truncated to the model's maximum length; V2 adds
`<cls>` first and `<eos>` last. Only the order reaches the model.

Log-normalized input without counts: the order is invariant to any per-cell factor, so when
X = log1p(s_cell * counts), expm1(X) ranks genes exactly as the counts would. We therefore invert log1p
(with a warning) instead of refusing such data. The caveat: if X was scaled, z-scored, or log-transformed
differently (log2, other pseudocount) the reconstructed order is wrong; give counts in that case.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from perturbedvae.data.loading import COUNTS_LAYER, looks_like_counts
from perturbedvae.encoders.base import GeneCoverage
from perturbedvae.encoders.vocab import measure_coverage
from perturbedvae.errors import ConfigError, DataError

TARGET_SUM = 10_000.0
_CHUNK_ROWS = 2048


def relative_expression_source(adata: ad.AnnData) -> np.ndarray | sp.spmatrix:
    """Counts-scale expression of every cell: the counts layer, X if it holds counts, else expm1(X)."""
    if COUNTS_LAYER in adata.layers:
        return adata.layers[COUNTS_LAYER]
    if looks_like_counts(adata.X):
        return adata.X
    warnings.warn(
        "no counts found (layers['counts'] or integer X): treating X as log1p-normalized and inverting it with "
        "expm1. Gene ranks are exact when X = log1p(per-cell factor x counts); give counts otherwise",
        UserWarning,
        stacklevel=3,
    )
    return adata.X.expm1() if sp.issparse(adata.X) else np.expm1(np.asarray(adata.X))


@dataclass
class RankValueTokenizer:
    """Turns expression into ranked gene-token sequences.

    Attributes:
        token_of: Gene name as the data spells it (after `gene_alias`) -> token id.
        median_of: Gene -> normalization median; genes without one are not readable (as in Geneformer).
            None means no median division (a plain rank by expression).
        max_length: Longest sequence, special tokens included.
        pad_id, cls_id, eos_id: Special token ids (cls/eos None when the model has none).
        gene_alias: Dataset gene name -> the key of `token_of` (e.g. gene symbol -> Ensembl id).
    """

    token_of: Mapping[str, int]
    median_of: Mapping[str, float] | None
    max_length: int
    pad_id: int = 0
    cls_id: int | None = None
    eos_id: int | None = None
    gene_alias: Mapping[str, str] | None = None

    def key_of(self, gene: str) -> str | None:
        """The vocabulary key of a dataset gene, or None when the vocabulary cannot read it."""
        key = gene if gene in self.token_of else (self.gene_alias or {}).get(gene)
        if key is None or key not in self.token_of:
            return None
        if self.median_of is not None and key not in self.median_of:
            return None
        return key

    def readable_genes(self, genes: Sequence[str]) -> list[str]:
        return [gene for gene in genes if self.key_of(gene) is not None]

    @property
    def n_special(self) -> int:
        return (self.cls_id is not None) + (self.eos_id is not None)

    def tokenize(self, expression: np.ndarray | sp.spmatrix, genes: Sequence[str]) -> dict[str, torch.Tensor]:
        """Rank-value tokens of every cell (rows of `expression`, counts scale, columns = `genes`).

        Returns `input_ids`, `attention_mask` and `gene_mask` (True on gene tokens), padded to the
        longest cell. Ties keep column order (a stable sort; Geneformer's numpy argsort leaves it unspecified).

        Raises:
            DataError: when a cell expresses none of the readable genes (its sequence would be empty).
        """
        readable = [(index, key) for index, key in enumerate(map(self.key_of, genes)) if key is not None]
        if not readable:
            raise DataError("no gene of the data is in the encoder vocabulary; check gene naming (symbols vs Ensembl ids)")
        columns = np.array([index for index, _ in readable], dtype=np.int64)
        keys = [key for _, key in readable]
        tokens = np.array([self.token_of[key] for key in keys], dtype=np.int64)
        scale = 1.0 / np.array([self.median_of[key] for key in keys]) if self.median_of is not None else np.ones(len(keys))
        max_genes = self.max_length - self.n_special
        if max_genes < 1:
            raise ConfigError(f"max_length {self.max_length} leaves no room for gene tokens")
        expression = expression.tocsr() if sp.issparse(expression) else np.asarray(expression)
        ranked = [self._rank_chunk(expression[start : start + _CHUNK_ROWS], columns, tokens, scale, max_genes)
                  for start in range(0, expression.shape[0], _CHUNK_ROWS)]
        gene_ids = [row for chunk in ranked for row in chunk]
        empty = sum(len(row) == 0 for row in gene_ids)
        if empty:
            raise DataError(
                f"{empty} cells express none of the {len(columns)} vocabulary genes, so they have no tokens; "
                "drop them first (e.g. sc.pp.filter_cells(adata, min_genes=1))"
            )
        return self._pad(gene_ids)

    @staticmethod
    def _rank_chunk(chunk, columns: np.ndarray, tokens: np.ndarray, scale: np.ndarray, max_genes: int) -> list[np.ndarray]:
        dense = chunk[:, columns].toarray() if sp.issparse(chunk) else np.asarray(chunk)[:, columns]
        dense = dense.astype(np.float64)
        totals = np.asarray(chunk.sum(axis=1)).reshape(-1, 1)
        relative = dense / np.where(totals > 0, totals, 1.0) * TARGET_SUM * scale
        order = np.argsort(-relative, axis=1, kind="stable")
        n_expressed = np.minimum((relative > 0).sum(axis=1), max_genes)
        return [tokens[order[row, : n_expressed[row]]] for row in range(len(order))]

    def _pad(self, gene_ids: list[np.ndarray]) -> dict[str, torch.Tensor]:
        length = max(len(row) for row in gene_ids) + self.n_special
        input_ids = np.full((len(gene_ids), length), self.pad_id, dtype=np.int64)
        gene_mask = np.zeros((len(gene_ids), length), dtype=bool)
        attention = np.zeros((len(gene_ids), length), dtype=np.int64)
        offset = int(self.cls_id is not None)
        for row, ids in enumerate(gene_ids):
            if self.cls_id is not None:
                input_ids[row, 0] = self.cls_id
            input_ids[row, offset : offset + len(ids)] = ids
            gene_mask[row, offset : offset + len(ids)] = True
            if self.eos_id is not None:
                input_ids[row, offset + len(ids)] = self.eos_id
            attention[row, : offset + len(ids) + (self.eos_id is not None)] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention),
            "gene_mask": torch.from_numpy(gene_mask),
        }


def check_layer(name: str, layer: int, n_layers: int) -> None:
    """Raise unless `layer` indexes the n_layers + 1 hidden states (embeddings, then every layer)."""
    n_states = n_layers + 1
    if not -n_states <= layer < n_states:
        raise ConfigError(f"{name}: layer {layer} does not exist; the model has {n_states} hidden states (embeddings + {n_layers} layers)")


def layers_reaching(layer: int, n_layers: int) -> list[int] | None:
    """Transformer layers whose output reaches hidden state `layer` (None: all of them).

    Hidden state 0 is the embeddings and state i the output of layer i-1, so reading state -2 of a
    12-layer model uses layers 0-10: LoRA adapters on layer 11 would get no gradient.
    """
    index = layer if layer >= 0 else n_layers + 1 + layer
    return None if index == n_layers else list(range(index))


def pool_tokens(hidden: torch.Tensor, gene_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Cell embedding from token outputs: mean or per-dimension maximum over gene tokens (specials and padding
    excluded), or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "max":  # a cell without gene tokens pools to 0, as with the mean
        genes = gene_mask.bool().unsqueeze(-1)
        return hidden.masked_fill(~genes, float("-inf")).amax(1).where(genes.any(1), hidden.new_zeros(()))
    weights = gene_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class RankValueTransformerEncoder:
    """A HuggingFace transformer (BERT for Geneformer) reading rank-value tokens.

    `embed` reads the hidden states of `layer` (Python indexing over embeddings + every layer, so -2 is
    the second-to-last layer, Geneformer's usual choice) and pools them.
    """

    def __init__(self, name: str, tokenizer: RankValueTokenizer, model: torch.nn.Module, pooling: str = "mean", layer: int = -1):
        check_layer(name, layer, model.config.num_hidden_layers)
        if pooling == "cls" and tokenizer.cls_id is None:
            raise ConfigError(f"{name}: pooling 'cls' needs a <cls> token; this vocabulary has none, use pooling: mean")
        self.name = name
        self.tokenizer = tokenizer
        self.model = model
        self.pooling = pooling
        self.layer = layer

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def lora_layers(self) -> list[int] | None:
        """Layers LoRA should adapt: those that reach the embedding read (None: all)."""
        return layers_reaching(self.layer, int(self.model.config.num_hidden_layers))

    def prepare(self, adata: ad.AnnData) -> dict[str, torch.Tensor]:
        return self.tokenizer.tokenize(relative_expression_source(adata), list(map(str, adata.var_names)))

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        length = int(batch["attention_mask"].sum(1).max())
        attention = batch["attention_mask"][:, :length]
        device = next(self.model.parameters()).device
        output = self.model(
            input_ids=batch["input_ids"][:, :length].to(device),
            attention_mask=attention.to(device),
            output_hidden_states=True,
        )
        return pool_tokens(output.hidden_states[self.layer], batch["gene_mask"][:, :length].to(device), self.pooling)

    def gene_coverage(self, genes: Sequence[str], perturbed_genes: Sequence[str]) -> GeneCoverage:
        return measure_coverage(genes, perturbed_genes, set(self.tokenizer.readable_genes(list(genes) + list(perturbed_genes))))

    def gene_embeddings(self, genes: Sequence[str]) -> torch.Tensor | None:
        """Input token embeddings of `genes` (zero rows for genes outside the vocabulary)."""
        table = self.model.get_input_embeddings().weight.detach()
        rows = torch.zeros(len(genes), table.shape[1], dtype=table.dtype)
        for row, gene in enumerate(genes):
            key = self.tokenizer.key_of(gene)
            if key is not None:
                rows[row] = table[self.tokenizer.token_of[key]].cpu()
        return rows

    def trainable_module(self) -> torch.nn.Module:
        return self.model
