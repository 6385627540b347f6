"""The one prediction format every model and baseline produces, so one evaluator scores them all.

A prediction is a mean log-normalized profile per canonical condition, optionally with predicted cells
for the distribution metrics. On disk it is an `.h5ad` with one row per condition, or per cell, and the
condition in `obs['condition']`, so predictions made by other tools (GEARS, scGPT...) can be read too.

It sits below training and evaluation (it needs only the data layer): the trainer's prediction path
produces it and the evaluator consumes it, without either importing the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbedvae.data.conditions import ConditionSyntax
from perturbedvae.data.loading import read_h5ad
from perturbedvae.errors import DataError

if TYPE_CHECKING:
    from perturbedvae.data.loading import PerturbationData
    from perturbedvae.data.splits import Split

PREDICTION_CONDITION_KEY = "condition"
"""obs column of a prediction AnnData holding each row's condition."""


@dataclass
class Predictions:
    """Predicted responses for a set of conditions.

    Attributes:
        means: Conditions (canonical names) x genes, mean log-normalized expression.
        cells: Optional predicted cells with canonical conditions in `obs['condition']` and the same genes.
    """

    means: pd.DataFrame
    cells: ad.AnnData | None = None

    def __post_init__(self) -> None:
        if self.means.index.has_duplicates:
            duplicated = self.means.index[self.means.index.duplicated()].unique()
            raise DataError(f"predictions name these conditions more than once: {', '.join(map(str, duplicated[:10]))}")
        values = self.means.to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            bad = self.means.index[~np.isfinite(values).all(axis=1)]
            raise DataError(f"predicted means contain NaN or infinite values for: {', '.join(map(str, bad[:10]))}")
        if self.cells is not None and PREDICTION_CONDITION_KEY not in self.cells.obs:
            raise DataError(f"predicted cells need obs[{PREDICTION_CONDITION_KEY!r}] with each cell's condition")

    @property
    def conditions(self) -> list[str]:
        return list(self.means.index)

    def aligned(self, genes: Sequence[str]) -> Predictions:
        """The same predictions with genes in the order of `genes`.

        Raises:
            DataError: listing missing and extra genes when the gene sets differ.
        """
        _check_same_genes(self.means.columns, genes)
        cells = self.cells
        if cells is not None:
            _check_same_genes(cells.var_names, genes)
            if list(cells.var_names) != list(genes):
                cells = cells[:, list(genes)].copy()  # once, not a view re-sliced for every condition
        return Predictions(self.means.loc[:, list(genes)], cells)

    def to_anndata(self) -> ad.AnnData:
        """One row per predicted cell if there are cells, else one row per condition; obs 'condition'."""
        if self.cells is not None:
            return self.cells.copy()
        obs = pd.DataFrame({PREDICTION_CONDITION_KEY: self.means.index.astype(str)}, index=self.means.index.astype(str))
        return ad.AnnData(
            X=self.means.to_numpy(dtype=np.float32), obs=obs, var=pd.DataFrame(index=self.means.columns.astype(str))
        )

    def write_h5ad(self, path: str | Path) -> None:
        """Write the predictions as AnnData, creating the folder if needed."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_anndata().write_h5ad(path)

    @classmethod
    def from_anndata(
        cls, adata: ad.AnnData, genes: Sequence[str], syntax: ConditionSyntax = ConditionSyntax()
    ) -> Predictions:
        """Read predictions with one row per condition or per cell and conditions in `obs['condition']`.

        Conditions are canonicalised with `syntax` (`B+A`, `A+ctrl` ... become canonical names). With more
        than one row for some condition the rows are taken as cells and `means` is their average.

        Raises:
            DataError: no condition column, or genes differing from `genes` (missing/extra listed).
            ConditionError: a malformed condition string.
        """
        if PREDICTION_CONDITION_KEY not in adata.obs:
            raise DataError(
                f"prediction AnnData needs obs[{PREDICTION_CONDITION_KEY!r}] naming each row's condition; "
                f"obs has: {', '.join(map(str, adata.obs.columns)) or 'no columns'}"
            )
        _check_same_genes(adata.var_names, genes)
        raw = adata.obs[PREDICTION_CONDITION_KEY].astype(str).to_numpy()
        unique_raw, inverse = np.unique(raw, return_inverse=True)
        canonical = np.asarray([syntax.canonical(text) for text in unique_raw], dtype=object)[inverse]
        matrix = adata[:, list(genes)].X
        matrix = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
        frame = pd.DataFrame(matrix.astype(np.float64), columns=list(genes))
        means = frame.groupby(canonical, sort=True).mean()
        means.index = means.index.astype(str)
        if len(means) == len(frame):
            return cls(means)
        cells = ad.AnnData(
            X=matrix.astype(np.float32),
            obs=pd.DataFrame({PREDICTION_CONDITION_KEY: canonical.astype(str)}, index=adata.obs_names.astype(str)),
            var=pd.DataFrame(index=list(genes)),
        )
        return cls(means, cells)

    @classmethod
    def read_h5ad(cls, path: str | Path, genes: Sequence[str], syntax: ConditionSyntax = ConditionSyntax()) -> Predictions:
        """`from_anndata` on an `.h5ad` file (clear DataError for a missing or unreadable file)."""
        return cls.from_anndata(read_h5ad(path), genes, syntax)


@runtime_checkable
class Predictor(Protocol):
    """What every model and baseline is to the evaluator: fitted on a split, asked for conditions.

    `fit` learns from the split's training conditions only and returns the predictor; `predict` takes
    conditions spelled as in the data and returns `Predictions` under their canonical names.
    `can_predict` says whether a condition is within reach (a head has no effect for a gene it never
    saw perturbed); predictors without it are taken to predict every condition.
    """

    def fit(self, data: PerturbationData, split: Split) -> Predictor: ...

    def predict(self, conditions: Sequence[str]) -> Predictions: ...


def _check_same_genes(present: Sequence[str], expected: Sequence[str]) -> None:
    present_set, expected_set = set(map(str, present)), set(map(str, expected))
    if len(present_set) != len(present):
        raise DataError("predicted genes contain duplicates; give each gene once")
    missing = sorted(expected_set - present_set)
    extra = sorted(present_set - expected_set)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} gene(s) of the data missing from the predictions (e.g. {', '.join(missing[:10])})")
        if extra:
            parts.append(f"{len(extra)} predicted gene(s) not in the data (e.g. {', '.join(extra[:10])})")
        raise DataError(
            "predictions and data have different genes: " + "; ".join(parts)
            + ". Predict exactly the data's genes (same names; order does not matter)"
        )
