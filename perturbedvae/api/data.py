"""One way in for data: a named dataset, an .h5ad path or an AnnData already in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad

from perturbedvae import datasets
from perturbedvae.data.loading import PerturbationData
from perturbedvae.data.loading import load_dataset as load_file_or_anndata


def load_dataset(source: str | Path | ad.AnnData | PerturbationData, **options: Any) -> PerturbationData:
    """Load and validate a perturbation dataset for a model, a split or the evaluator.

    Args:
        source: An AnnData in memory (copied, never modified), the path of an `.h5ad` file, or the name of
            a known dataset (`norman2019_subset`, read with its registered options), or data already loaded.
        options: Reading options of `perturbedvae.data.loading.load_dataset` (condition_key, control_labels,
            delimiter, obs_filter, n_top_genes, backed, counts...); for a name they override its own.

    Raises:
        DataError, ConditionError: with a message naming the fix (an unknown name lists the known ones).
    """
    if isinstance(source, PerturbationData):
        return source
    if isinstance(source, str) and datasets.names_a_dataset(source):
        return datasets.load(source, **options)
    return load_file_or_anndata(source, **options)
