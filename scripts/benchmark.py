"""PerturbedVAE beside the four baselines on held-out doubles, over several seeds, in one command.

    python scripts/benchmark.py --data ../shared/data/norman2019_subset.h5ad --seeds 1 2 3

For each seed: make the config's split with that seed, train the head (`configs/norman_subset.yaml` by
default), predict the test conditions and score them beside the baselines trained on the same split.
Writes `metrics.csv` (tidy, with a seed column), `summary.md` (mean ± sd over seeds per subgroup) and
`timing.json` (training cells/s and wall time per seed) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from perturbedvae.errors import PerturbedVAEError
from perturbedvae.evaluate.benchmark import evaluate_beside_baselines
from perturbedvae.evaluate.report import HEADLINE_METRICS
from perturbedvae.train.config import load_config
from perturbedvae.train.runs import MODEL_NAME, load_run, train_from_config

REPO = Path(__file__).resolve().parents[1]


def run_seed(config_path: Path, data: str, seed: int, out: Path, overrides: list[str]) -> tuple[pd.DataFrame, dict]:
    """Train and evaluate one seed; returns its tidy metrics and timing."""
    run_dir = out / f"seed_{seed}"
    config = load_config(config_path, [
        f"data.path={data}", f"split.seed={seed}", f"train.seed={seed}", f"output.run_dir={run_dir}",
        "output.overwrite=true", *overrides,
    ])
    train_from_config(config)
    run = load_run(run_dir)
    predictable = {
        name: [c for c in members if c not in set(json.loads((run_dir / "run_info.json").read_text())["unpredictable_test_conditions"])]
        for name, members in run.split.test_subgroups.items()
    }
    conditions = sorted({c for members in predictable.values() for c in members})
    _, tidy = evaluate_beside_baselines(
        run.datamodule.data, run.split, {MODEL_NAME: run.predict(conditions)}, run.config.data.de_method, groups=predictable
    )
    info = json.loads((run_dir / "run_info.json").read_text())
    timing = {key: info[key] for key in ("train_cells_per_second", "train_seconds", "wall_seconds", "best_epoch", "epochs_done")}
    return tidy.assign(seed=seed), timing


def summarize(tidy: pd.DataFrame, metrics=HEADLINE_METRICS) -> str:
    """Mean ± sd over seeds of the per-seed subgroup means, as Markdown."""
    rows = tidy[tidy["metric"].isin(metrics) & tidy["condition"].notna()]
    per_seed = rows.groupby(["subgroup", "model", "metric", "seed"])["value"].mean()
    stats = per_seed.groupby(["subgroup", "model", "metric"]).agg(["mean", "std", "count"]).reset_index()
    lines = ["| subgroup | model | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
    for (subgroup, model), group in stats.groupby(["subgroup", "model"], sort=False):
        values = group.set_index("metric")
        cells = [f"{values.loc[m, 'mean']:.3f} ± {values.loc[m, 'std']:.3f}" for m in metrics]
        lines.append(f"| {subgroup} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the .h5ad to benchmark on")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "norman_subset.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=10")
    args = parser.parse_args(argv)
    try:
        results = [run_seed(args.config, str(Path(args.data).resolve()), seed, args.out, args.overrides) for seed in args.seeds]
    except PerturbedVAEError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tidy = pd.concat([frame for frame, _ in results], ignore_index=True)
    timing = {seed: info for seed, (_, info) in zip(args.seeds, results)}
    args.out.mkdir(parents=True, exist_ok=True)
    tidy.to_csv(args.out / "metrics.csv", index=False)
    (args.out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    summary = summarize(tidy)
    (args.out / "summary.md").write_text(summary + "\n")
    print(summary)
    for seed, info in timing.items():
        print(f"seed {seed}: {info['train_cells_per_second']:.0f} training cells/s, {info['wall_seconds']:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
