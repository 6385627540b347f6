"""Score named predictions on a split's test conditions with every baseline beside them.

The one place where a split, DE genes, the evaluator and the baselines meet, so the CLI, the benchmark
script and reports put every model next to the same baselines computed the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from perturbedvae.data.de import compute_de_genes
from perturbedvae.data.loading import PerturbationData
from perturbedvae.data.splits import Split
from perturbedvae.evaluate.baselines import predict_baselines
from perturbedvae.evaluate.evaluator import Evaluator, compare
from perturbedvae.evaluate.predictions import Predictions


def evaluate_beside_baselines(
    data: PerturbationData,
    split: Split,
    predictions: Mapping[str, Predictions],
    de_method: str = "t-test",
    groups: Mapping[str, list[str]] | None = None,
    n_de_genes: int = 20,
) -> tuple[dict, pd.DataFrame]:
    """Metrics of `predictions` and of every baseline (trained on `split.train`) on the test conditions.

    Args:
        groups: Subgroups to score (default: the split's test subgroups); baselines predict their conditions.
        n_de_genes: Size of the DE gene sets of the `_de` metrics (the run's `data.n_de_genes`).

    Returns:
        The JSON-able results per model and the tidy table (model, subgroup, condition, metric, value).
    """
    split.check_matches(data)
    groups = dict(split.test_subgroups if groups is None else groups)
    groups = {name: conditions for name, conditions in groups.items() if conditions}
    conditions = sorted({condition for members in groups.values() for condition in members})
    evaluator = Evaluator(data, compute_de_genes(data, method=de_method, n_top=n_de_genes), groups)
    named = {**predictions, **predict_baselines(data, split.train, conditions)}
    return compare(evaluator, named)
