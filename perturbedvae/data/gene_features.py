"""Features of perturbation genes, so a gene never perturbed in training still gets an effect.

The head's feature network maps a gene's feature row to its latent effect; it learns that map on the
genes perturbed in training and applies it to held-out genes. Sources (`GeneFeaturesConfig.sources`):

- `coexpression`: the gene's row of a rank-k factorisation of the gene-gene correlation over the
  *training* cells (V_k·sqrt(Λ_k) of its eigendecomposition, so row products approximate correlations).
  Needs no download, but only describes genes measured in the data. GEARS builds its gene graph from
  co-expression the same way; a knock-down tends to move the genes its target co-varies with.
- `encoder`: an encoder's gene (token) embeddings; a zero row means the encoder does not know the gene.
- `table`: the user's genes × features table (CSV/TSV with the gene in the first column, parquet, or
  an .h5ad whose obs names are genes).

Blocks are concatenated in the order of the sources, zeros where a source does not cover a gene.
A *training* gene no source covers gets one identity column of its own, which lets the network learn
a free effect for it (an MLP of a one-hot is a lookup) without letting covered genes bypass their
features; a held-out gene no source covers cannot be predicted, and the run says so before training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbedvae.data.matrix import ExpressionRows, chunk_cells
from perturbedvae.errors import ConfigError, DataError

SOURCES: tuple[str, ...] = ("coexpression", "encoder", "table")
IDENTITY = "identity"
"""Name of the block of identity columns in `GeneFeatures.columns`."""


@dataclass(frozen=True)
class FeatureBlock:
    """One source's features of a list of genes.

    Attributes:
        source: Name of the source (one of `SOURCES`).
        values: [n_genes, width] features, zero rows where the source does not cover the gene.
        covered: [n_genes] whether the source describes the gene.
    """

    source: str
    values: np.ndarray
    covered: np.ndarray


@dataclass(frozen=True)
class GeneFeatures:
    """The assembled feature matrix of the head's perturbation vocabulary.

    Attributes:
        genes: The vocabulary (training genes and the held-out genes some source covers), sorted.
        values: [len(genes), width] float32.
        columns: (source, width) of each block, identity columns last.
        sources_of: Per gene, the sources that cover it (empty for a gene on identity columns).
    """

    genes: list[str]
    values: np.ndarray
    columns: list[tuple[str, int]]
    sources_of: dict[str, list[str]]


def coexpression_block(expression: ExpressionRows, measured: Sequence[str], train_cells: np.ndarray, genes: Sequence[str],
                       n_components: int) -> FeatureBlock:
    """Rows of the rank-`n_components` factor of the gene-gene correlation over `train_cells`, for `genes`.

    Only training cells enter the correlation: the held-out cells of a perturbation are where its gene
    is knocked down, and reading them would leak the answer into the features. Genes not measured, or
    constant over the training cells, are not covered. Each factor's sign is fixed (largest entry
    positive) so equal data give equal features.

    Args:
        expression: Log-normalized expression rows of all cells.
        measured: The data's gene names (the columns of `expression`).
        train_cells: Row numbers of the training cells.
        genes: Perturbation genes to describe.
        n_components: Rank k (at most the number of measured genes).
    """
    if len(train_cells) < 2:
        raise DataError("co-expression gene features need at least two training cells")
    correlation, variable = _correlation(expression, np.sort(train_cells))
    k = min(n_components, int(variable.sum()))
    eigenvalues, eigenvectors = np.linalg.eigh(correlation)
    order = np.argsort(eigenvalues)[::-1][:k]
    factors = eigenvectors[:, order] * np.sqrt(np.clip(eigenvalues[order], 0.0, None))
    factors *= np.sign(factors[np.abs(factors).argmax(axis=0), np.arange(k)])
    column = {name: index for index, name in enumerate(measured)}
    values = np.zeros((len(genes), n_components), dtype=np.float32)
    covered = np.array([gene in column and bool(variable[column[gene]]) for gene in genes])
    for row, gene in enumerate(genes):
        if covered[row]:
            values[row, :k] = factors[column[gene]]
    return FeatureBlock("coexpression", values, covered)


def _correlation(expression: ExpressionRows, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gene-gene Pearson correlation over `cells`, which genes vary), from sums read in chunks (float64).

    Constant genes get zero rows and columns, so they add nothing to the factors.
    """
    n_genes = expression.shape[1]
    total, cross = np.zeros(n_genes), np.zeros((n_genes, n_genes))
    step = chunk_cells(n_genes)
    for start in range(0, len(cells), step):
        block = expression[cells[start : start + step]]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        block = block.astype(np.float64)
        total += block.sum(axis=0)
        cross += block.T @ block
    mean = total / len(cells)
    covariance = cross / len(cells) - np.outer(mean, mean)
    spread = np.sqrt(np.clip(np.diag(covariance), 0.0, None))
    variable = spread > 1e-8 * max(1.0, float(spread.max(initial=0.0)))
    scale = np.where(variable, 1.0 / np.where(variable, spread, 1.0), 0.0)
    return covariance * np.outer(scale, scale), variable


def embedding_block(embeddings: np.ndarray) -> FeatureBlock:
    """An encoder's gene embeddings as a block; its zero rows are the genes outside its vocabulary."""
    values = np.asarray(embeddings, dtype=np.float32)
    return FeatureBlock("encoder", values, np.abs(values).sum(axis=1) > 0)


def table_block(path: str | Path, genes: Sequence[str]) -> FeatureBlock:
    """The user's feature table's rows of `genes` (genes absent from the table are not covered)."""
    table = read_feature_table(path)
    covered = np.array([gene in table.index for gene in genes])
    values = np.zeros((len(genes), table.shape[1]), dtype=np.float32)
    present = [gene for gene in genes if gene in table.index]
    values[covered] = table.loc[present].to_numpy(dtype=np.float32)
    return FeatureBlock("table", values, covered)


def read_feature_table(path: str | Path) -> pd.DataFrame:
    """A genes × features table: .csv/.tsv/.txt (gene in the first column), .parquet, or .h5ad (obs names).

    Raises:
        ConfigError: missing file, unknown extension, non-numeric or missing values, repeated genes.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"gene_features.table {path}: no such file; give a genes × features CSV/TSV, parquet or .h5ad")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        table = pd.read_csv(path, sep="," if suffix == ".csv" else "\t", index_col=0)
    elif suffix == ".parquet":
        table = pd.read_parquet(path)
        if isinstance(table.index, pd.RangeIndex) and table.shape[1] and not pd.api.types.is_numeric_dtype(table.dtypes.iloc[0]):
            table = table.set_index(table.columns[0])  # genes in a column rather than the index
    elif suffix == ".h5ad":
        import anndata as ad

        adata = ad.read_h5ad(path)
        matrix = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
        table = pd.DataFrame(matrix, index=adata.obs_names, columns=[str(name) for name in adata.var_names])
    else:
        raise ConfigError(f"gene_features.table {path}: unknown extension {suffix!r}; use .csv, .tsv, .parquet or .h5ad")
    table.index = table.index.astype(str)
    text = [str(column) for column, kind in table.dtypes.items() if not pd.api.types.is_numeric_dtype(kind)]
    if text:
        raise ConfigError(f"gene_features.table {path}: column(s) {', '.join(text[:5])} are not numeric; "
                          "the first column holds gene names, every other column a number per gene")
    repeated = table.index[table.index.duplicated()].unique().tolist()
    if repeated:
        raise ConfigError(f"gene_features.table {path}: gene(s) {', '.join(repeated[:5])} appear more than once; keep one row per gene")
    if table.shape[1] == 0 or not np.isfinite(table.to_numpy(dtype=np.float64)).all():
        raise ConfigError(f"gene_features.table {path}: needs at least one feature column and no missing or infinite values")
    return table


def assemble(blocks: Sequence[FeatureBlock], genes: Sequence[str], train_genes: Sequence[str]) -> GeneFeatures:
    """Concatenate the blocks of `genes`; keep held-out genes some block covers; identity columns last.

    Args:
        blocks: One per source, each over `genes` in that order.
        genes: Every candidate gene (training genes and the held-out genes of the split).
        train_genes: The genes perturbed in training conditions: always kept.
    """
    train = set(train_genes)
    covered = np.zeros(len(genes), dtype=bool)
    for block in blocks:
        covered |= block.covered
    keep = [index for index, gene in enumerate(genes) if gene in train or covered[index]]
    on_identity = [index for index in keep if not covered[index]]
    identity = np.zeros((len(genes), len(on_identity)), dtype=np.float32)
    identity[on_identity, np.arange(len(on_identity))] = 1.0
    parts = [block.values for block in blocks] + [identity]
    values = np.concatenate(parts, axis=1)[keep]
    order = np.argsort([genes[index] for index in keep], kind="stable")
    kept = [genes[keep[position]] for position in order]
    columns = [(block.source, block.values.shape[1]) for block in blocks] + ([(IDENTITY, len(on_identity))] if on_identity else [])
    sources_of = {genes[index]: [block.source for block in blocks if block.covered[index]] for index in keep}
    return GeneFeatures(kept, values[order], columns, {gene: sources_of[gene] for gene in kept})
