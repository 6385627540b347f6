"""The benchmark every model claim is judged by: cross-validated held-out combinations, paired verdicts.

    perturbedvae benchmark --config configs/norman_subset.yaml --protocol lodo --seeds 1 2 3 --out runs/benchmark

Protocols (split schemes of `perturbedvae.data.splits`) hold out combinations whose genes were all
measured alone: `lodo` each one once, `kfold` K seeded folds of them (large screens), `singles_only`
all of them at once from a model trained on control and singles. For every fold and seed, each model
(one experiment config each; `name=path` names it) trains on exactly the fold's training conditions,
selecting its epoch on held-out cells of those conditions (`train.selection: held_out_cells`, unless an
override says otherwise) and never on a held-out combination; every baseline is fitted on the same
conditions. Written to `--out`:

- `benchmark.csv`: tidy scores, columns model, combination, seed, metric, value (baselines repeat per seed);
- `verdicts.csv`: every model against every baseline, paired per (combination, seed): mean difference,
  wins/ties/losses and a bootstrap 95% interval over combinations (`perturbedvae.evaluate.verdicts`);
- `noise_floor.csv`: per combination, what a perfect predictor of the mean would still score;
- `benchmark.md` and `benchmark.png`: the tables and per-combination bars with the noise floor drawn;
- `timing.json`, and each training run under `runs/<model>/fold_<k>/seed_<s>/`.

Distribution metrics (nrmse, mmd, energy distance) need cells: a model that predicts means is scored on
pseudo-cells (observed controls + predicted shift), which a mean alone scores differently from cells a
model generates. With `singles_only` the model is also scored on cells sampled from it, under the name
`<model>[generated]`, and the report keeps the two kinds in separate tables.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from perturbedvae.comparison.metering import ResourceMeter
from perturbedvae.comparison.trained import train_and_predict
from perturbedvae.data.de import compute_de_genes
from perturbedvae.data.loading import PerturbationData
from perturbedvae.data.splits import BENCHMARK_PROTOCOLS, n_benchmark_folds
from perturbedvae.errors import ConfigError
from perturbedvae.evaluate import plots
from perturbedvae.evaluate.baselines import BASELINES
from perturbedvae.evaluate.beside_baselines import evaluate_beside_baselines
from perturbedvae.evaluate.metrics import LOWER_IS_BETTER
from perturbedvae.evaluate.noise_floor import noise_floor
from perturbedvae.evaluate.report import frame_markdown
from perturbedvae.evaluate.verdicts import paired_verdicts
from perturbedvae.train.config import ExperimentConfig, load_config
from perturbedvae.train.runs import MODEL_NAME, load_data

logger = logging.getLogger(__name__)

BENCHMARK_METRICS: tuple[str, ...] = ("pearson_delta_de", "mse_de", "pearson_delta", "mse", "rank", "frac_opposite_direction_de")
SINGLES_ONLY_METRICS: tuple[str, ...] = ("nrmse", "r2", "mmd")
"""discrepancy-VAE's metrics, reported beside the GEARS ones for the singles_only protocol."""
CELL_METRICS: tuple[str, ...] = ("nrmse", "mmd")
VERDICT_METRICS: tuple[str, ...] = ("mse_de", "pearson_delta_de", "mse", "pearson_delta")
GENERATED_SUFFIX = "[generated]"
TIDY_COLUMNS = ["model", "combination", "seed", "metric", "value"]
FIGURE_LEFT_OUT = ("no_change", "train_mean")
"""Weak baselines left out of the figure (they stay in the tables): their errors dwarf the differences that matter."""

DEFAULT_OVERRIDES = ("train.selection=held_out_cells", "train.checkpoint_every=0")
"""Applied before the user's overrides: epoch selection on held-out cells, no checkpoints."""


@dataclass
class BenchmarkResult:
    """What a benchmark measured (also written to its output folder)."""

    tidy: pd.DataFrame
    verdicts: pd.DataFrame
    noise: pd.DataFrame
    timing: dict[str, dict] = field(default_factory=dict)
    out: Path | None = None
    noise_repeats: int = 20
    selection: dict[str, str] = field(default_factory=dict)
    """`train.selection` of each model config, so the report says how its epochs were kept."""


def parse_model_configs(configs: Sequence[str]) -> dict[str, Path]:
    """`["configs/a.yaml", "new=configs/b.yaml"]` -> {name: path}; a bare path is named `perturbedvae` when alone."""
    named: dict[str, Path] = {}
    for item in configs:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = (MODEL_NAME if len(configs) == 1 else Path(item).stem), item
        if name in named or name in BASELINES:
            raise ConfigError(f"model name {name!r} is used twice or is a baseline's name; name each config with name=path")
        if not Path(path).is_file():
            raise ConfigError(f"benchmark config {path} does not exist")
        named[name] = Path(path)
    if not named:
        raise ConfigError("the benchmark needs at least one experiment config (--config)")
    return named


def run_benchmark(
    configs: Sequence[str],
    protocol: str = "lodo",
    seeds: Sequence[int] = (1, 2, 3),
    out: str | Path = "runs/benchmark",
    overrides: Sequence[str] = (),
    n_folds: int = 5,
    n_bootstrap: int = 2000,
    noise_repeats: int = 20,
) -> BenchmarkResult:
    """Train and score every model config on every fold and seed of `protocol`; write the report to `out`.

    Raises:
        ConfigError: an unknown protocol, bad seeds or configs, or configs that read different data.
    """
    if protocol not in BENCHMARK_PROTOCOLS:
        raise ConfigError(f"unknown benchmark protocol {protocol!r}; choose one of {', '.join(BENCHMARK_PROTOCOLS)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be distinct integers, e.g. 1 2 3; got {list(seeds)}")
    models = parse_model_configs(configs)
    out = Path(out)
    bases = {name: load_config(path, [*DEFAULT_OVERRIDES, *overrides]) for name, path in models.items()}
    data = _shared_data(bases)
    folds = n_benchmark_folds(data, protocol, n_folds)
    started = time.perf_counter()
    frames, timing = [], {}
    for fold in range(folds):
        for seed in seeds:
            named, split, base = {}, None, None
            for name, path in models.items():
                config = _fold_config(path, protocol, fold, n_folds, seed, out / "runs" / name, overrides)
                with ResourceMeter() as meter:
                    trained = train_and_predict(config)
                if trained is None:  # another process of `accelerate launch`: the main one scores
                    continue
                split, base = trained.model.split, config
                named[name] = trained.predictions
                if protocol == "singles_only":
                    named[name + GENERATED_SUFFIX] = trained.model.predict(trained.predictions.conditions, per_cell=True, sample_seed=seed)
                info = trained.run_info
                timing[f"{name}/fold_{fold}/seed_{seed}"] = {
                    "wall_seconds": round(meter.seconds, 2), "cpu_seconds": round(meter.cpu_seconds, 2),
                    "train_cells_per_second": info["train_cells_per_second"], "best_epoch": info["best_epoch"],
                    "epochs_done": info["epochs_done"], **info.get("latent", {}),
                }
                logger.info("%s fold %d/%d, seed %d, %s: best epoch %s of %s, %.0f s", protocol, fold + 1, folds, seed, name,
                            info["best_epoch"], info["epochs_done"], meter.seconds)
            if split is None:
                continue
            _, tidy = evaluate_beside_baselines(data, split, named, base.data.de_method, n_de_genes=base.data.n_de_genes)
            frames.append(tidy.rename(columns={"condition": "combination"}).assign(seed=seed)[TIDY_COLUMNS])
    if not frames:
        return BenchmarkResult(pd.DataFrame(columns=TIDY_COLUMNS), pd.DataFrame(), pd.DataFrame())
    tidy = pd.concat(frames, ignore_index=True)
    base = next(iter(bases.values()))
    de = compute_de_genes(data, method=base.data.de_method, n_top=base.data.n_de_genes)
    noise = noise_floor(data, sorted(set(tidy["combination"])), de, n_repeats=noise_repeats)
    learned = [name for name in dict.fromkeys(tidy["model"]) if name not in BASELINES]
    verdicts = paired_verdicts(tidy, learned, list(BASELINES), _metrics(protocol), n_bootstrap=n_bootstrap)
    selection = {name: config.train.selection for name, config in bases.items()}
    result = BenchmarkResult(tidy, verdicts, noise, timing, out, noise_repeats, selection)
    command = " ".join(["perturbedvae benchmark", *[f"--config {item}" for item in configs], f"--protocol {protocol}",
                        "--seeds", *map(str, seeds), f"--out {out}", *overrides])
    write_benchmark(result, protocol, command, time.perf_counter() - started)
    return result


def _shared_data(bases: dict[str, ExperimentConfig]) -> PerturbationData:
    """The data every model config reads (they must read the same, or the models would be scored apart)."""
    sections = {name: config.data for name, config in bases.items()}
    first = next(iter(sections.values()))
    differing = [name for name, section in sections.items() if section != first]
    if differing:
        raise ConfigError(f"model configs {', '.join(differing)} read other data than the first; a benchmark scores every model on the same data")
    return load_data(first)


def _fold_config(path: Path, protocol: str, fold: int, n_folds: int, seed: int, run_root: Path, overrides: Sequence[str]) -> ExperimentConfig:
    params = {"singles_only": {}, "lodo": {"fold": fold}, "kfold": {"fold": fold, "n_folds": n_folds}}[protocol]
    return load_config(path, [
        *DEFAULT_OVERRIDES, *overrides, f"split.scheme={protocol}", f"split.params={json.dumps(params)}", "split.path=null",
        f"train.seed={seed}", f"output.run_dir={run_root / f'fold_{fold}' / f'seed_{seed}'}", "output.overwrite=true",
    ])


def _metrics(protocol: str) -> tuple[str, ...]:
    """The reported metrics: rank orders a fold's held-out conditions, so with one per fold (lodo) it is always 0."""
    metrics = tuple(metric for metric in BENCHMARK_METRICS if protocol != "lodo" or metric != "rank")
    return metrics + (SINGLES_ONLY_METRICS if protocol == "singles_only" else ())


# --- report ------------------------------------------------------------------------------------------------


def score_statistics(tidy: pd.DataFrame, metrics: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(overall, per combination) mean and sd over seeds.

    Overall: per seed, the mean over combinations; then mean and sd of those over seeds. Per combination:
    mean and sd over seeds. Columns model, [combination,] metric, mean, sd.
    """
    rows = tidy[tidy["metric"].isin(metrics)]
    per_seed = rows.groupby(["model", "metric", "seed"], sort=False)["value"].mean()
    overall = per_seed.groupby(["model", "metric"], sort=False).agg(["mean", "std"]).rename(columns={"std": "sd"}).reset_index()
    per_combination = rows.groupby(["model", "combination", "metric"], sort=False)["value"].agg(["mean", "std"])
    return overall, per_combination.rename(columns={"std": "sd"}).reset_index()


def write_benchmark(result: BenchmarkResult, protocol: str, command: str, seconds: float) -> None:
    """Write the CSV tables, the figure and `benchmark.md` into `result.out`."""
    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    result.tidy.to_csv(out / "benchmark.csv", index=False)
    result.verdicts.to_csv(out / "verdicts.csv", index=False)
    result.noise.rename_axis("combination").to_csv(out / "noise_floor.csv")
    (out / "timing.json").write_text(json.dumps(result.timing, indent=2) + "\n")
    metrics = _metrics(protocol)
    overall, per_combination = score_statistics(result.tidy, metrics)
    models = list(dict.fromkeys(result.tidy["model"]))
    figure_metrics = ("mse_de", "pearson_delta_de")
    drawn = [model for model in models if model not in FIGURE_LEFT_OUT]
    plots.save_figure(plots.plot_benchmark(per_combination, result.noise, figure_metrics, drawn), out / "benchmark.png")
    (out / "benchmark.md").write_text(benchmark_markdown(result, protocol, command, seconds, overall, per_combination, models))


SELECTION_WORDS = {
    "held_out_cells": "epochs selected on held-out cells of the training conditions",
    "val_conditions": "epochs selected on the split's validation conditions",
    "last": "the last epoch kept",
}
"""How the report names each `train.selection`."""


def selection_sentence(selection: dict[str, str]) -> str:
    """How the models' epochs were kept: one phrase when they share it, else one per model."""
    kinds = set(selection.values())
    if len(kinds) == 1:
        return SELECTION_WORDS[kinds.pop()]
    return "; ".join(f"{name}: {SELECTION_WORDS[kind]}" for name, kind in selection.items())


def benchmark_markdown(result: BenchmarkResult, protocol: str, command: str, seconds: float,
                       overall: pd.DataFrame, per_combination: pd.DataFrame, models: list[str]) -> str:
    tidy, noise = result.tidy, result.noise
    combinations = sorted(set(tidy["combination"]))
    seeds = sorted(set(tidy["seed"]))
    profile_metrics = [metric for metric in _metrics(protocol) if metric not in CELL_METRICS]
    lines = [
        f"# Benchmark: protocol `{protocol}`", "",
        "```bash", command, "```", "",
        (f"{len(combinations)} held-out combinations × {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
         f"{seconds / 60:.1f} min wall. Every model and baseline trained on the same conditions in each fold; "
         f"{selection_sentence(result.selection)}. Arrows: ↓ lower is better, ↑ higher."), "",
        "## Mean over held-out combinations (mean ± sd over seeds)", "",
        frame_markdown(_wide(overall, profile_metrics, models, noise_means=noise.mean())), "",
    ]
    if protocol == "singles_only":
        pseudo = [model for model in models if not model.endswith(GENERATED_SUFFIX)]
        generated = [model for model in models if model.endswith(GENERATED_SUFFIX)]
        lines += [
            "## Distribution metrics, kept apart by where the cells come from", "",
            "Pseudo-cells: the observed control cells shifted by the predicted mean change (every model and baseline):", "",
            frame_markdown(_wide(overall, CELL_METRICS, pseudo)), "",
            "Generated cells: drawn from the model (latent and likelihood noise, seeded):", "",
            frame_markdown(_wide(overall, CELL_METRICS, generated)), "",
        ]
    lines += ["## Per held-out combination (mean ± sd over seeds)", ""]
    for metric in ("mse_de", "pearson_delta_de"):
        lines += [f"### {_arrow(metric)}", "", frame_markdown(_per_combination(per_combination, metric, models, noise)), ""]
    lines += [
        "## Paired verdicts (model − baseline per combination and seed)", "",
        ("Wins/ties/losses count (combination, seed) pairs in the metric's direction; the 95% interval of the mean "
         "difference is a bootstrap over combinations (seeds of a combination stay together)."), "",
        frame_markdown(_verdict_table(result.verdicts)), "",
        "## What the heads learned (mean over folds and seeds)", "",
        ("Mask density: fraction of (gene, latent dimension) mask entries kept. Probe: balanced accuracy of telling "
         "training conditions apart from z_inv (nearest class mean, 5-fold), beside chance. Alignment p: permutation "
         "p-value of the control-vs-perturbed MMD² of z_inv (small: the penalty sees a difference), at initialisation "
         "and after training."), "",
        frame_markdown(_learned_table(result.timing), digits=3), "",
        "## Noise floor", "",
        (f"What a perfect predictor of each combination's mean would still score, from {result.noise_repeats} random "
         "halvings of its cells (squared errors: a quarter of the half-vs-half error; correlations: the Spearman–Brown "
         "ceiling)."), "",
        frame_markdown(noise.rename_axis("combination").reset_index(), digits=4), "",
        "![per-combination scores beside the baselines and the noise floor](benchmark.png)", "",
    ]
    return "\n".join(lines)


_LEARNED_COLUMNS = {
    "train_cells_per_second": "training cells/s", "best_epoch": "best epoch", "mask_density": "mask density",
    "probe_balanced_accuracy": "probe accuracy", "probe_chance": "probe chance",
    "initial_alignment_p": "alignment p (init)", "alignment_p": "alignment p (trained)",
}


def _learned_table(timing: dict[str, dict]) -> pd.DataFrame:
    """Per model, the mean over its runs of throughput, selected epoch and the latent diagnostics."""
    frame = pd.DataFrame.from_dict(timing, orient="index")
    frame["model"] = [key.split("/")[0] for key in frame.index]
    columns = [column for column in _LEARNED_COLUMNS if column in frame.columns]
    table = frame.groupby("model", sort=False)[columns].mean().rename(columns=_LEARNED_COLUMNS)
    return table.reset_index()


def _arrow(metric: str) -> str:
    return f"{metric} {'↓' if metric in LOWER_IS_BETTER else '↑'}"


def _mean_sd_cell(mean: float, sd: float) -> str:
    return f"{mean:.4f}" if pd.isna(sd) or sd == 0 else f"{mean:.4f} ± {sd:.4f}"


def _wide(stats: pd.DataFrame, metrics: Sequence[str], models: Sequence[str], noise_means: pd.Series | None = None) -> pd.DataFrame:
    """Rows models (+ the noise floor), columns metrics, cells `mean ± sd`."""
    table = {model: {} for model in models}
    for row in stats.itertuples(index=False):
        if row.model in table and row.metric in metrics:
            table[row.model][_arrow(row.metric)] = _mean_sd_cell(row.mean, row.sd)
    frame = pd.DataFrame.from_dict(table, orient="index").reindex(columns=[_arrow(metric) for metric in metrics])
    if noise_means is not None:
        frame.loc["noise floor"] = [f"{noise_means[m]:.4f}" if m in noise_means else "" for m in metrics]
    return frame.fillna("").rename_axis("model").reset_index()


def _per_combination(per_combination: pd.DataFrame, metric: str, models: Sequence[str], noise: pd.DataFrame) -> pd.DataFrame:
    selected = per_combination[per_combination["metric"] == metric]
    cells = {(row.combination, row.model): _mean_sd_cell(row.mean, row.sd) for row in selected.itertuples(index=False)}
    combinations = list(dict.fromkeys(selected["combination"]))
    frame = pd.DataFrame([[cells.get((name, model), "") for model in models] for name in combinations], index=combinations, columns=list(models))
    if metric in noise.columns:
        frame["noise floor"] = [f"{noise.at[name, metric]:.4f}" for name in combinations]
    return frame.rename_axis("combination").reset_index()


def _verdict_table(verdicts: pd.DataFrame) -> pd.DataFrame:
    shown = verdicts[verdicts["metric"].isin(VERDICT_METRICS[:2])].copy()
    shown["mean difference [95% CI]"] = [
        f"{row.mean_difference:+.4f} [{row.ci_low:+.4f}, {row.ci_high:+.4f}]" for row in shown.itertuples(index=False)
    ]
    shown["wins / ties / losses"] = [f"{row.wins} / {row.ties} / {row.losses}" for row in shown.itertuples(index=False)]
    shown["metric"] = [_arrow(metric) for metric in shown["metric"]]
    return shown[["model", "baseline", "metric", "mean difference [95% CI]", "wins / ties / losses"]]
