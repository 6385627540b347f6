"""The `scgpt` kind: scGPT's input scheme and encoder architecture, loading a real scGPT checkpoint directory.

Input (as scGPT's cell-embedding task does it): the genes a cell expresses that are in vocab.json, each
with its value binned per cell into `n_bins` (51) bins: the cell's non-zero values are cut at their own
quantiles, so bin 1..n_bins-1 is a within-cell rank and 0 means not expressed. Binning depends only on
the within-cell order, so counts and log-normalized values give the same bins. `<cls>` comes first (with
value `pad_value`), `<pad>` pads. Two deliberate differences: ties between bin edges take the lower bin
(scGPT spreads them at random), and cells longer than `max_length` keep their most expressed genes
(scGPT samples genes at random); both make embeddings reproducible.

Architecture (our own module; scGPT's state-dict key names are the contract): `encoder` = gene embedding
+ LayerNorm, `value_encoder` = continuous (Linear-ReLU-Linear-LayerNorm on the bin value, clipped at 512)
or category (embedding + LayerNorm of the bin), summed, then `transformer_encoder.layers` = post-norm
transformer layers named as PyTorch's `TransformerEncoderLayer` (scGPT's non-flash path). Checkpoints trained with flash attention name the fused projection
`self_attn.Wqkv`; it is renamed to PyTorch's `self_attn.in_proj_*`. Heads of the checkpoint (decoder,
mvc_decoder, cls_decoder, ...) are not needed for embeddings and are skipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from perturbedvae.encoders.base import GeneCoverage
from perturbedvae.encoders.cards import AdapterCard
from perturbedvae.encoders.rank_value import check_layer, layers_reaching, pool_tokens
from perturbedvae.encoders.vocab import load_json_dictionary, measure_coverage
from perturbedvae.errors import CheckpointError, ConfigError

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
VALUE_CLIP = 512.0
ARGS_FILE, VOCAB_FILE, WEIGHTS_FILE = "args.json", "vocab.json", "best_model.pt"


@dataclass(frozen=True)
class ScGPTConfig:
    """The fields of scGPT's args.json that shape the encoder."""

    ntoken: int
    embsize: int = 512
    nheads: int = 8
    d_hid: int = 512
    nlayers: int = 12
    dropout: float = 0.2
    pad_token: str = "<pad>"
    pad_value: float = -2.0
    input_emb_style: str = "continuous"
    n_bins: int = 51

    @classmethod
    def from_args(cls, args: Mapping[str, object], ntoken: int) -> ScGPTConfig:
        known = {key: args[key] for key in cls.__dataclass_fields__ if key in args and key != "ntoken"}
        config = cls(ntoken=ntoken, **known)
        if config.input_emb_style not in ("continuous", "category"):
            raise ConfigError(f"scGPT input_emb_style {config.input_emb_style!r} is not supported; use continuous or category")
        return config


class GeneTokenEmbedding(nn.Module):
    """Gene id -> vector, layer-normalized (scGPT's `encoder`)."""

    def __init__(self, ntoken: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(ntoken, dim)
        self.enc_norm = nn.LayerNorm(dim)

    def forward(self, gene_ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(gene_ids))


class ContinuousValueEmbedding(nn.Module):
    """Binned value as a real number -> vector through a small MLP (scGPT's continuous `value_encoder`)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(1, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.linear1(values.clamp(max=VALUE_CLIP).unsqueeze(-1)))
        return self.dropout(self.norm(self.linear2(hidden)))


class PostNormEncoderLayer(nn.Module):
    """Transformer layer with PyTorch's names and post-norm order: x = norm1(x + attn(x)); x = norm2(x + ffn(x)).

    Written out instead of `nn.TransformerEncoderLayer` because that layer's inference fast path reads
    `linear1.weight` directly and would silently skip LoRA adapters on the feed-forward layers.
    """

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        attended = self.self_attn(hidden, hidden, hidden, key_padding_mask=padding_mask, need_weights=False)[0]
        hidden = self.norm1(hidden + self.dropout(attended))
        return self.norm2(hidden + self.dropout(self.linear2(self.dropout(torch.relu(self.linear1(hidden))))))


class EncoderStack(nn.Module):
    """Holds the layers under `layers.N`, the key names of PyTorch's TransformerEncoder (and so of scGPT)."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            PostNormEncoderLayer(config.embsize, config.nheads, config.d_hid, config.dropout) for _ in range(config.nlayers)
        )


class ScGPTBackbone(nn.Module):
    """scGPT's encoder path: gene + value embeddings through a post-norm transformer encoder."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.config = config
        self.encoder = GeneTokenEmbedding(config.ntoken, config.embsize)
        if config.input_emb_style == "continuous":
            self.value_encoder: nn.Module = ContinuousValueEmbedding(config.embsize, config.dropout)
        else:
            # scGPT's category style reserves two ids beyond the bins: pad (n_bins) and mask (n_bins + 1).
            self.value_encoder = GeneTokenEmbedding(config.n_bins + 2, config.embsize)
        self.transformer_encoder = EncoderStack(config)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states: the input embeddings, then the output of every layer."""
        if self.config.input_emb_style == "category":
            values = values.clamp(min=0).long()
        hidden = self.encoder(gene_ids) + self.value_encoder(values)
        states = [hidden]
        for block in self.transformer_encoder.layers:
            hidden = block(hidden, padding_mask)
            states.append(hidden)
        return states


def bin_values(values: np.ndarray, n_bins: int) -> np.ndarray:
    """scGPT's per-cell binning of one cell's non-zero values into 1..n_bins-1 (lower bin on ties)."""
    edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    return np.digitize(values, edges)


class ScGPTEncoder:
    """Cell encoder running a scGPT checkpoint (see the module docstring for the input scheme)."""

    def __init__(self, name: str, vocab: Mapping[str, int], model: ScGPTBackbone, max_length: int = 1200,
                 pooling: str = "cls", layer: int = -1):
        check_layer(name, layer, model.config.nlayers)
        self.name = name
        self.vocab = vocab
        self.model = model
        self.max_length = max_length
        self.pooling = pooling
        self.layer = layer

    @property
    def hidden_size(self) -> int:
        return self.model.config.embsize

    def lora_layers(self) -> list[int] | None:
        """Layers LoRA should adapt: those that reach the embedding read (None: all)."""
        return layers_reaching(self.layer, self.model.config.nlayers)

    def prepare(self, adata: ad.AnnData) -> dict[str, torch.Tensor]:
        """`gene_ids`, binned `values`, `padding_mask` (True on padding) and `gene_mask` per cell."""
        genes = list(map(str, adata.var_names))
        columns = np.array([index for index, gene in enumerate(genes) if gene in self.vocab], dtype=np.int64)
        if columns.size == 0:
            raise ConfigError(f"{self.name}: no gene of the data is in the scGPT vocabulary; it uses gene symbols")
        gene_ids = np.array([self.vocab[genes[index]] for index in columns])
        matrix = adata.X.tocsr()[:, columns] if sp.issparse(adata.X) else np.asarray(adata.X)[:, columns]
        rows = [self._cell_tokens(self._row(matrix, cell), gene_ids) for cell in range(adata.n_obs)]
        return self._pad(rows)

    @staticmethod
    def _row(matrix, cell: int) -> np.ndarray:
        row = matrix[cell]
        return np.asarray(row.toarray()).ravel() if sp.issparse(row) else np.asarray(row).ravel()

    def _cell_tokens(self, row: np.ndarray, gene_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        expressed = np.flatnonzero(row > 0)
        bins = bin_values(row[expressed], self.model.config.n_bins) if expressed.size else np.zeros(0, dtype=np.int64)
        if expressed.size > self.max_length - 1:
            keep = np.sort(np.argsort(-row[expressed], kind="stable")[: self.max_length - 1])
            expressed, bins = expressed[keep], bins[keep]
        return gene_ids[expressed], bins

    def _pad(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        config = self.model.config
        length = 1 + max(len(ids) for ids, _ in rows)
        gene_ids = np.full((len(rows), length), self.vocab[config.pad_token], dtype=np.int64)
        values = np.full((len(rows), length), config.pad_value, dtype=np.float32)
        gene_mask = np.zeros((len(rows), length), dtype=bool)
        gene_ids[:, 0] = self.vocab["<cls>"]
        for row, (ids, bins) in enumerate(rows):
            gene_ids[row, 1 : 1 + len(ids)] = ids
            values[row, 1 : 1 + len(ids)] = bins
            gene_mask[row, 1 : 1 + len(ids)] = True
        padding = gene_ids == self.vocab[config.pad_token]
        return {
            "gene_ids": torch.from_numpy(gene_ids),
            "values": torch.from_numpy(values),
            "padding_mask": torch.from_numpy(padding),
            "gene_mask": torch.from_numpy(gene_mask),
        }

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        length = int((~batch["padding_mask"]).sum(1).max())
        device = next(self.model.parameters()).device
        states = self.model(
            batch["gene_ids"][:, :length].to(device),
            batch["values"][:, :length].to(device),
            batch["padding_mask"][:, :length].to(device),
        )
        return pool_tokens(states[self.layer], batch["gene_mask"][:, :length].to(device), self.pooling)

    def gene_coverage(self, genes: Sequence[str], perturbed_genes: Sequence[str]) -> GeneCoverage:
        return measure_coverage(genes, perturbed_genes, self.vocab)

    def gene_embeddings(self, genes: Sequence[str]) -> torch.Tensor | None:
        """scGPT gene-token embeddings (after its LayerNorm) of `genes`, zero rows for genes outside the vocabulary."""
        known = [gene in self.vocab for gene in genes]
        ids = torch.tensor([self.vocab[gene] if ok else 0 for gene, ok in zip(genes, known)], dtype=torch.long)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            rows = self.model.encoder(ids.to(device)).cpu()
        return rows * torch.tensor(known, dtype=rows.dtype).unsqueeze(1)

    def trainable_module(self) -> nn.Module:
        return self.model


def read_scgpt_vocab(path: Path) -> dict[str, int]:
    """vocab.json with scGPT's special tokens appended when missing (as scGPT itself does)."""
    vocab = {str(key): int(value) for key, value in load_json_dictionary(path).items()}
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            vocab[token] = max(vocab.values(), default=-1) + 1
    return vocab


def load_scgpt_weights(model: ScGPTBackbone, weights_path: Path) -> None:
    """Load a scGPT state dict (weights only) into `model`, renaming flash-attention keys, skipping heads."""
    warnings.warn(
        f"loading {weights_path} with torch.load(weights_only=True): only tensors are read, but use checkpoints you trust",
        UserWarning,
        stacklevel=2,
    )
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or non-tensor pickles
        raise CheckpointError(f"{weights_path} could not be read as a weights-only state dict: {error}") from None
    state = {key.replace("self_attn.Wqkv.", "self_attn.in_proj_"): value for key, value in state.items()}
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    if missing:
        raise CheckpointError(
            f"{weights_path} lacks {len(missing)} encoder weights (e.g. {', '.join(missing[:4])}); "
            "is it a scGPT checkpoint matching args.json?"
        )
    wrong = [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
             if state[key].shape != value.shape]
    if wrong:
        raise CheckpointError(f"{weights_path}: weight shapes do not match args.json/vocab.json: {'; '.join(wrong[:4])}")
    model.load_state_dict({key: state[key] for key in expected})


def load_scgpt(card: AdapterCard, checkpoint: Path) -> ScGPTEncoder:
    """scGPT encoder from a checkpoint directory (args.json, vocab.json, best_model.pt)."""
    args_path, weights_path = checkpoint / ARGS_FILE, checkpoint / WEIGHTS_FILE
    for path in (args_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{checkpoint} is not a scGPT checkpoint directory: {path.name} is missing (need args.json, vocab.json, best_model.pt)")
    vocab_path = checkpoint / VOCAB_FILE if (checkpoint / VOCAB_FILE).is_file() else card.vocab_file("gene_vocab")
    if vocab_path is None:
        raise CheckpointError(f"{checkpoint} has no vocab.json and the card names no vocab.gene_vocab")
    vocab = read_scgpt_vocab(vocab_path)
    args = load_json_dictionary(args_path)
    if card.option("n_bins") is not None:
        args = {**args, "n_bins": card.option("n_bins")}
    model = ScGPTBackbone(ScGPTConfig.from_args(args, ntoken=max(vocab.values()) + 1))
    load_scgpt_weights(model, weights_path)
    model.eval()
    return ScGPTEncoder(card.name, vocab, model, card.max_length or 1200, card.pooling, card.layer)
