"""Score named predictions on a split's test conditions with every baseline beside them.

The one place where a split, DE genes, the evaluator and the baselines meet, so the CLI, the benchmark
script and reports put every model next to the same baselines computed the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import pandas as pd

from perturbedvae.data.de import compute_de_genes
from perturbedvae.data.loading import PerturbationData
from perturbedvae.data.splits import Split
from perturbedvae.evaluate.baselines import all_baselines
from perturbedvae.evaluate.evaluator import Evaluator, evaluate_named
from perturbedvae.predictions import Predictions, Predictor


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
    baselines = {name: baseline.fit(data, split).predict(conditions) for name, baseline in all_baselines().items()}
    return evaluate_named(evaluator, {**predictions, **baselines})


def evaluate_predictors(
    data: PerturbationData,
    split: Split,
    predictors: Mapping[str, Predictor],
    de_method: str = "t-test",
    n_de_genes: int = 20,
) -> tuple[dict, pd.DataFrame]:
    """Fitted models (any `Predictor`: the PerturbedVAE model class, a `Baseline`...) beside every baseline.

    Every model is scored on the same conditions: the split's test conditions that all of them can
    predict (a head has no effect for a gene never perturbed in training); the others are left out with
    a warning that names them.

    Returns:
        As `evaluate_beside_baselines`.
    """
    groups, left_out = {}, set()
    for name, members in split.test_subgroups.items():
        kept = [c for c in members if all(getattr(p, "can_predict", lambda _: True)(c) for p in predictors.values())]
        left_out.update(set(members) - set(kept))
        groups[name] = kept
    if left_out:
        warnings.warn(f"{len(left_out)} test condition(s) left out, not predictable by every model: {', '.join(sorted(left_out))}",
                      UserWarning, stacklevel=2)
    conditions = sorted({condition for members in groups.values() for condition in members})
    predictions = {name: predictor.predict(conditions) for name, predictor in predictors.items()}
    return evaluate_beside_baselines(data, split, predictions, de_method, groups, n_de_genes)
