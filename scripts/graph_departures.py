"""Where a simulated screen's combinations depart from additivity: through the latent graph, or the decoder's curvature.

    python scripts/graph_departures.py --config configs/synthetic_graph.yaml --seeds 0 1

Read off the truth (`simulated_truth`), without cells or noise: each profile is the mean of
log1p(1e4 · expression fraction) over `--draws` states z_inv ~ N(0, I) shifted by the condition's latent
shift u. For each combination A+B it reports whether the graph makes u_AB differ from u_A + u_B (one
gene's target downstream of the other's, its edge cut), and the mean squared error, over the 20 genes of
largest true change, of two predictions of its change: additive (the sum of the singles' changes) and
latent-additive (u_A + u_B through the true decoder). Latent-additive errs only where the graph acts;
additive also errs through the decoder's curvature. What a head must learn beyond additivity, split
into the two parts. `key=value` arguments change fields of the config's `SimulationConfig`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from identifiability_ceiling import simulation_config
from perturbedvae.data.synthetic import SimulatedTruth, simulated_truth

REPO = Path(__file__).resolve().parent.parent
N_TOP_GENES = 20


def departures(truth: SimulatedTruth, n_draws: int = 4000, seed: int = 0) -> list[dict[str, object]]:
    """Per combination: its name, whether the graph acts on it, and the two predictions' mse on its top genes."""
    states = np.random.default_rng(seed).standard_normal((n_draws, truth.masks.shape[1]))

    def profile(shift: np.ndarray) -> np.ndarray:
        return np.log1p(1e4 * truth.expression_fractions(states + shift)).mean(axis=0)

    control = profile(np.zeros(truth.masks.shape[1]))
    singles = {gene: truth.composed_shift((gene,)) for pair in truth.combinations for gene in pair}
    changes = {gene: profile(shift) - control for gene, shift in singles.items()}
    rows = []
    for index, (first, second) in enumerate(truth.combinations):
        combined = truth.composed_shift((first, second))
        change = profile(combined) - control
        top = np.argsort(-np.abs(change))[:N_TOP_GENES]
        additive = changes[first] + changes[second]
        latent_additive = profile(singles[first] + singles[second]) - control
        rows.append({
            "combination": truth.combination_name(index),
            "graph_acts": bool(np.abs(combined - singles[first] - singles[second]).max() > 1e-9),
            "additive_mse": float(((additive - change)[top] ** 2).mean()),
            "latent_additive_mse": float(((latent_additive - change)[top] ** 2).mean()),
        })
    return rows


def summary(rows: list[dict[str, object]]) -> dict[str, float]:
    """The share of combinations the graph acts on, and each prediction's mean mse on both groups."""
    acts = np.array([row["graph_acts"] for row in rows])
    result = {"combinations": len(rows), "graph_acts_share": float(acts.mean())}
    for name in ("additive_mse", "latent_additive_mse"):
        values = np.array([row[name] for row in rows])
        result[name] = float(values.mean())
        result[f"{name}_graph_acts"] = float(values[acts].mean()) if acts.any() else float("nan")
        result[f"{name}_graph_silent"] = float(values[~acts].mean()) if (~acts).any() else float("nan")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "synthetic_graph.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("overrides", nargs="*", help="SimulationConfig fields, e.g. edge_prob=0.6")
    args = parser.parse_args(argv)
    base = simulation_config(args.config, args.overrides)
    print("| seed | combinations | graph acts on | additive mse (graph acts / silent) | latent-additive mse (graph acts / silent) |")
    print("|---|---|---|---|---|")
    for seed in args.seeds:
        result = summary(departures(simulated_truth(replace(base, seed=seed)), args.draws))
        print(f"| {seed} | {result['combinations']} | {result['graph_acts_share']:.0%} | {result['additive_mse']:.4f} "
              f"({result['additive_mse_graph_acts']:.4f} / {result['additive_mse_graph_silent']:.4f}) | "
              f"{result['latent_additive_mse']:.4f} ({result['latent_additive_mse_graph_acts']:.4f} / "
              f"{result['latent_additive_mse_graph_silent']:.4f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
