"""Differentially expressed (DE) genes of every condition versus control, computed the GEARS way.

The field scores predictions on each condition's top-20 DE genes because most genes do not respond to a
perturbation and would otherwise dominate every metric. To keep our numbers comparable with GEARS we
rank genes with scanpy's `rank_genes_groups` exactly as GEARS does (all conditions against the control
group, `rankby_abs=True`, every gene ranked; t-test by default) and derive GEARS' "non-dropout" top-N:
the first N ranked genes that are expressed in the condition, or silent in both the condition and
control, so that a gene switched off by the perturbation (a dropout) does not count as DE.

Backed data (expression left in the file) is ranked with the same Welch t statistic computed from
per-condition sums and sums of squares gathered in one chunked pass (`condition_moments`, shared with
the mean profiles), so memory does not grow with cells; the Wilcoxon test needs every value of a gene at once and is refused there.

Rankings take seconds to minutes on large data, so they can be cached on disk keyed by the data
fingerprint; a cache that does not match is an error, never silently reused.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from perturbedvae.data.conditions import CONTROL
from perturbedvae.data.loading import PerturbationData
from perturbedvae.errors import CheckpointError, DataError

DE_METHODS: tuple[str, ...] = ("t-test", "wilcoxon")
"""Tests accepted by `compute_de_genes`: scanpy's default t-test (GEARS) and the Wilcoxon rank-sum test."""

_GROUP_COLUMN = "condition"
_FORMAT_VERSION = 1


@dataclass
class DEGenes:
    """Ranked DE genes of every perturbed condition, as gene indices into the data's gene order.

    Attributes:
        method: The scanpy test used ("t-test" or "wilcoxon").
        n_top: How many top genes `top` and `non_dropout` hold by default (GEARS: 20).
        ranked: Canonical condition -> indices of all genes, most differentially expressed first.
        non_dropout: Canonical condition -> the first `n_top` ranked genes that are not dropouts.
        fingerprint: `PerturbationData.fingerprint` of the data they were computed on.
    """

    method: str
    n_top: int
    ranked: dict[str, np.ndarray]
    non_dropout: dict[str, np.ndarray]
    fingerprint: str | None = field(default=None)

    @property
    def conditions(self) -> list[str]:
        return list(self.ranked)

    def top(self, condition: str, n: int | None = None) -> np.ndarray:
        """Indices of the `n` (default `n_top`) most differentially expressed genes of `condition`."""
        if condition not in self.ranked:
            raise DataError(
                f"no DE genes for condition {condition!r}; it is not a perturbed condition of the data the "
                "DE genes were computed on (recompute them with compute_de_genes on this data)"
            )
        return self.ranked[condition][: self.n_top if n is None else n]

    def save(self, path: str | Path) -> None:
        """Write an `.npz` file (no pickles): rankings as one matrix, non-dropout lists flattened."""
        names = self.conditions
        lengths = [len(self.non_dropout[name]) for name in names]
        meta = {
            "version": _FORMAT_VERSION,
            "method": self.method,
            "n_top": self.n_top,
            "fingerprint": self.fingerprint,
            "conditions": names,
        }
        ranked = np.stack([self.ranked[name] for name in names]) if names else np.zeros((0, 0), np.int64)
        flat = np.concatenate([self.non_dropout[name] for name in names]) if names else np.zeros(0, np.int64)
        with open(path, "wb") as handle:
            np.savez(
                handle,
                meta=np.array(json.dumps(meta)),
                ranked=ranked.astype(np.int64),
                non_dropout=flat.astype(np.int64),
                non_dropout_lengths=np.asarray(lengths, dtype=np.int64),
            )

    @classmethod
    def load(cls, path: str | Path) -> DEGenes:
        """Read a file written by `save`.

        Raises:
            CheckpointError: when the file is missing, unreadable or inconsistent; delete it to recompute.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such DE gene file")
        try:
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
                ranked_matrix = archive["ranked"]
                flat = archive["non_dropout"]
                lengths = archive["non_dropout_lengths"]
            names = list(meta["conditions"])
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            consistent = (
                meta.get("version") == _FORMAT_VERSION
                and ranked_matrix.shape[0] == len(names) == len(lengths)
                and bounds[-1] == len(flat)
            )
            result = cls(
                method=str(meta["method"]),
                n_top=int(meta["n_top"]),
                ranked={name: ranked_matrix[row] for row, name in enumerate(names)},
                non_dropout={name: flat[bounds[row] : bounds[row + 1]] for row, name in enumerate(names)},
                fingerprint=meta.get("fingerprint"),
            )
        except Exception as error:  # zip, json and key errors all mean the same thing: a corrupt file
            raise CheckpointError(
                f"{path} is not a valid DE gene file ({type(error).__name__}: {error}); delete it to recompute"
            ) from error
        if not consistent:
            raise CheckpointError(f"{path} is not a valid DE gene file (inconsistent contents); delete it to recompute")
        return result


def compute_de_genes(
    data: PerturbationData,
    method: str = "t-test",
    n_top: int = 20,
    cache_dir: str | Path | None = None,
) -> DEGenes:
    """Rank the genes of every perturbed condition against control (GEARS' recipe).

    Args:
        data: The dataset; never modified (scanpy runs on a separate AnnData sharing `X`).
        method: "t-test" (scanpy's default, used by GEARS) or "wilcoxon".
        n_top: Size of the top and non-dropout lists (GEARS: 20).
        cache_dir: If given, read the result from / write it to
            `cache_dir/de_<fingerprint>_<method>_top<n_top>.npz`.

    Raises:
        DataError: for an unknown method, a non-positive `n_top` or a condition with fewer than 2 cells.
        CheckpointError: when the cache file exists but is corrupt or was made from other data.
    """
    if method not in DE_METHODS:
        raise DataError(f"unknown DE method {method!r}; use one of {', '.join(DE_METHODS)}")
    if n_top <= 0:
        raise DataError(f"n_top must be a positive number of genes, got {n_top}")
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"de_{data.fingerprint}_{method}_top{n_top}.npz"
        if cache_path.exists():
            return _load_matching(cache_path, data, method, n_top)
    with _torch_threads_kept():
        ranked = _rank_genes_streamed(data, method) if data.backed else _rank_genes(data, method)
    de = DEGenes(method, n_top, ranked, _non_dropout_top(data, ranked, n_top), data.fingerprint)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        de.save(cache_path)
    return de


@contextlib.contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """Give torch back its intra-op thread count after scanpy's ranking, which resets it.

    On the Norman subset `rank_genes_groups` left torch at 2 threads in a process started with
    OMP_NUM_THREADS=1, overriding that setting and the trainer's thread share. The first validation of a
    `val_conditions` run ranks DE genes, so every later epoch ran 2 threads on cores other jobs kept
    busy: configs/norman_geneformer_frozen.yaml trained at 368 cells per CPU-second against 4,875 for
    configs/norman_subset.yaml, whose selection ranks nothing (load average 12, issue 13).
    """
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _load_matching(path: Path, data: PerturbationData, method: str, n_top: int) -> DEGenes:
    de = DEGenes.load(path)
    expected_conditions = [name for name in data.condition_names if name != CONTROL]
    if (
        de.fingerprint != data.fingerprint
        or de.method != method
        or de.n_top != n_top
        or sorted(de.conditions) != sorted(expected_conditions)
        or any(len(order) != data.adata.n_vars for order in de.ranked.values())
    ):
        raise CheckpointError(f"{path} does not match this data, method or n_top; delete it to recompute")
    return de


def _rank_genes(data: PerturbationData, method: str) -> dict[str, np.ndarray]:
    """All genes of each perturbed condition, ranked by |score| of the test against control."""
    import scanpy as sc

    _check_cells_per_condition(data)
    # A fresh AnnData over the same matrix: scanpy writes its results into this object's uns only.
    scratch = ad.AnnData(
        X=data.adata.X,
        obs=pd.DataFrame({_GROUP_COLUMN: pd.Categorical(data.conditions)}, index=data.adata.obs_names),
        var=pd.DataFrame(index=data.adata.var_names),
    )
    with warnings.catch_warnings():
        # scanpy fills its result table column by column, which pandas flags once per condition.
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        sc.tl.rank_genes_groups(
            scratch,
            groupby=_GROUP_COLUMN,
            reference=CONTROL,
            method=method,
            rankby_abs=True,
            n_genes=scratch.n_vars,
            use_raw=False,
        )
    names = scratch.uns["rank_genes_groups"]["names"]
    gene_index = pd.Index(data.genes)
    return {
        condition: gene_index.get_indexer(np.asarray(names[condition], dtype=object)).astype(np.int64)
        for condition in data.condition_names
        if condition != CONTROL
    }


def _rank_genes_streamed(data: PerturbationData, method: str) -> dict[str, np.ndarray]:
    """scanpy's t-test ranking (Welch, unbiased variances, NaN scores as 0, |score| order) from chunked sums."""
    from scipy import stats

    if method != "t-test":
        raise DataError(f"DE method {method!r} needs the data in memory; use t-test for backed data or load without backed")
    _check_cells_per_condition(data)
    names = data.condition_names
    n_cells, sums, sum_squares = data.condition_moments
    n_cells = n_cells[:, None]
    means = sums / n_cells
    variances = np.maximum(sum_squares / n_cells - means**2, 0.0) * n_cells / (n_cells - 1)
    control = names.index(CONTROL)
    ranked = {}
    for row, condition in enumerate(names):
        if condition == CONTROL:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            scores, _ = stats.ttest_ind_from_stats(
                means[row], np.sqrt(variances[row]), n_cells[row, 0],
                means[control], np.sqrt(variances[control]), n_cells[control, 0], equal_var=False,
            )
        magnitude = np.abs(np.nan_to_num(scores, nan=0.0))
        ranked[condition] = np.argsort(-magnitude, kind="stable").astype(np.int64)
    return ranked


def _check_cells_per_condition(data: PerturbationData) -> None:
    names, counts = np.unique(data.conditions, return_counts=True)
    too_small = [f"{name} ({count})" for name, count in zip(names, counts) if count < 2]
    if too_small:
        raise DataError(
            "DE genes need at least 2 cells per condition; drop or merge these conditions first: "
            + ", ".join(too_small[:10])
        )


def _non_dropout_top(data: PerturbationData, ranked: dict[str, np.ndarray], n_top: int) -> dict[str, np.ndarray]:
    """First `n_top` ranked genes expressed in the condition mean, or zero in both it and control."""
    means = data.mean_profiles
    control_zero = means.loc[CONTROL].to_numpy() == 0
    result = {}
    for condition, order in ranked.items():
        keep = (means.loc[condition].to_numpy() != 0) | control_zero
        result[condition] = order[keep[order]][:n_top]
    return result
