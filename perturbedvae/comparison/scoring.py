"""Every variant's predictions scored beside the baselines, seed by seed, on conditions all of them predict."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from perturbedvae.comparison.plan import ComparePlan
from perturbedvae.comparison.trained import TestPredictions, VariantResult
from perturbedvae.data.conditions import genes_of
from perturbedvae.data.de import DEGenes
from perturbedvae.data.loading import PerturbationData
from perturbedvae.evaluate.baselines import predict_baselines
from perturbedvae.evaluate.beside_baselines import evaluate_beside_baselines
from perturbedvae.evaluate.gi import interaction_table


def shared_groups(results: Mapping[str, VariantResult], seed: int) -> dict[str, list[str]]:
    """Test conditions every variant could predict for `seed`, by subgroup (one set scored for all)."""
    groups = [result.groups[seed] for result in results.values()]
    names = groups[0].keys()
    return {name: [c for c in groups[0][name] if all(c in g.get(name, []) for g in groups[1:])] for name in names}


def score_over_seeds(plan: ComparePlan, data: PerturbationData, first: TestPredictions, results: Mapping[str, VariantResult],
                     de: DEGenes) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tidy metrics and GI table over seeds (variant, seed, ...), baselines included once per seed.

    Every variant shares the first run's split and DE settings (`run_compare` checks the split and data).
    """
    split, settings = first.model.split, first.model.state.config.data
    frames, interactions = [], []
    keep = set(plan.variants) | set(plan.settings.baselines)
    for seed in plan.settings.seeds:
        groups = shared_groups(results, seed)
        named = {variant: result.predictions[seed] for variant, result in results.items()}
        _, tidy = evaluate_beside_baselines(data, split, named, settings.de_method, groups=groups, n_de_genes=settings.n_de_genes)
        frames.append(tidy[tidy["model"].isin(keep)].assign(seed=seed))
        doubles = sorted({c for members in groups.values() for c in members if len(genes_of(c)) == 2})
        baselines = {name: p for name, p in predict_baselines(data, split.train, doubles).items() if name in keep}
        table = interaction_table(data, {**named, **baselines}, doubles, de)
        interactions.append(table.assign(seed=seed))
    tidy = pd.concat(frames, ignore_index=True).rename(columns={"model": "variant"})
    tidy = tidy[["variant", "seed", "subgroup", "condition", "metric", "value"]]
    return tidy, pd.concat(interactions, ignore_index=True)


__all__ = ["score_over_seeds", "shared_groups"]
