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

from perturbedvae.compare import train_and_predict
from perturbedvae.errors import PerturbedVAEError
from perturbedvae.evaluate.benchmark import evaluate_beside_baselines
from perturbedvae.evaluate.report import HEADLINE_METRICS, seed_summary_markdown
from perturbedvae.train.config import load_config
from perturbedvae.train.runs import MODEL_NAME

REPO = Path(__file__).resolve().parents[1]


def run_seed(config_path: Path, data: str, seed: int, out: Path, overrides: list[str]) -> tuple[pd.DataFrame, dict]:
    """Train and evaluate one seed; returns its tidy metrics and timing."""
    config = load_config(config_path, [
        f"data.path={data}", f"split.seed={seed}", f"train.seed={seed}", f"output.run_dir={out / f'seed_{seed}'}",
        "output.overwrite=true", *overrides,
    ])
    trained = train_and_predict(config)
    run = trained.run
    _, tidy = evaluate_beside_baselines(
        run.datamodule.data, run.split, {MODEL_NAME: trained.predictions}, run.config.data.de_method, groups=trained.groups
    )
    keys = ("train_cells_per_second", "train_seconds", "wall_seconds", "best_epoch", "epochs_done")
    return tidy.assign(seed=seed), {key: trained.run_info[key] for key in keys}


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
    summary = seed_summary_markdown(tidy, HEADLINE_METRICS)
    (args.out / "summary.md").write_text(summary + "\n")
    print(summary)
    for seed, info in timing.items():
        print(f"seed {seed}: {info['train_cells_per_second']:.0f} training cells/s, {info['wall_seconds']:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
