"""Compare model variants beside the baselines over seeds, and write one readable report.

    perturbedvae compare --config configs/compare_norman.yaml [compare.seeds=[1] train.epochs=5 ...]

A compare config names a base experiment config, the variants (each a set of overrides of it, e.g. an
encoder for `representation.*`), the seeds and the baselines:

    experiment: norman_subset.yaml             # relative to this file
    overrides: {train.checkpoint_every: 0}     # applied to every variant
    variants:
      standalone: {}
      geneformer_frozen: {representation.kind: encoder, representation.adapter: ../adapters/geneformer-v1.yaml}
    compare: {seeds: [1, 2, 3], out_dir: runs/compare_norman}

Every variant trains once per seed (`train.seed`) on the *same split* (the base config's), so the spread
over seeds is the training randomness and every model is scored on the same held-out conditions. Command-
line overrides `compare.KEY=VALUE` change the compare settings, any other `section.key=value` every
variant's experiment. The report directory holds `report.md`, `report.html` (figures embedded),
`metrics.csv` (variant, seed, subgroup, condition, metric, value), `interactions.csv`, `figures/` and
the run directories under `runs/<variant>/seed_<seed>/`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import resource
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from perturbedvae.api.fitting import train_from_config
from perturbedvae.data.conditions import genes_of
from perturbedvae.data.de import DEGenes, compute_de_genes
from perturbedvae.data.loading import PerturbationData
from perturbedvae.errors import ConfigError, did_you_mean
from perturbedvae.evaluate import plots
from perturbedvae.evaluate.baselines import BASELINES, predict_baselines
from perturbedvae.evaluate.benchmark import evaluate_beside_baselines
from perturbedvae.evaluate.gi import interaction_summary, interaction_table
from perturbedvae.evaluate.report import (
    SEED_TABLE_METRICS,
    ReportDocument,
    seed_statistics,
    seed_summary_frame,
)
from perturbedvae.predictions import Predictions
from perturbedvae.processes import is_main_process
from perturbedvae.train.config import (
    INPUT_PATH_KEYS,
    ExperimentConfig,
    load_config,
    parse_overrides,
)
from perturbedvae.train.datamodule import is_predictable, multi_hot
from perturbedvae.train.representation import ENCODER_INPUTS_KEY
from perturbedvae.train.runs import LoadedRun, load_run
from perturbedvae.yaml_files import read_yaml_mapping

COMPARE_PREFIX = "compare."
EMBEDDING_METHODS = ("umap", "pca")
ACTIVE_MASK_PROBABILITY = 0.5
"""A latent dimension is active when some perturbation's mask keeps it with at least this probability."""
VERSION_PACKAGES = ("perturbedvae", "torch", "numpy", "pandas", "scipy", "anndata", "scanpy", "accelerate",
                    "transformers", "peft", "matplotlib", "umap-learn")


@dataclass
class CompareSettings:
    """The `compare:` section.

    Attributes:
        seeds: Training seeds (`train.seed`); the split stays the base config's.
        baselines: Baselines shown beside the variants (names of `perturbedvae.evaluate.baselines.BASELINES`).
        out_dir: Report directory, relative to where the command runs.
        overwrite: Replace an existing report directory.
        embedding: "umap" (scanpy; needs umap-learn) or "pca" for the latent-space figure.
        embedding_cells: Cells (a seeded random subset) drawn in the latent-space figure.
        program_genes: Genes per latent program in the program figure and table.
        max_programs: Active latent dimensions shown at most, strongest first.
    """

    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    out_dir: str = "runs/compare"
    overwrite: bool = False
    embedding: str = "umap"
    embedding_cells: int = 2000
    program_genes: int = 10
    max_programs: int = 12

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(not isinstance(seed, int) or seed < 0 for seed in self.seeds):
            raise ConfigError(f"compare.seeds must be distinct non-negative integers, e.g. [1, 2, 3]; got {self.seeds!r}")
        unknown = [name for name in self.baselines if name not in BASELINES]
        if unknown:
            raise ConfigError(f"compare.baselines: unknown {', '.join(map(str, unknown))}; choose from {', '.join(BASELINES)}")
        if self.embedding not in EMBEDDING_METHODS:
            raise ConfigError(f"compare.embedding must be one of {', '.join(EMBEDDING_METHODS)}, got {self.embedding!r}")
        for name in ("embedding_cells", "program_genes", "max_programs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"compare.{name} must be a positive integer, got {value!r}")


@dataclass
class ComparePlan:
    """A loaded compare config: what to train and where to write."""

    path: Path
    experiment: Path
    overrides: list[str]
    variants: dict[str, list[str]]
    settings: CompareSettings
    text: str = ""
    configs: dict[tuple[str, int], ExperimentConfig] = field(default_factory=dict)

    def experiment_config(self, variant: str, seed: int) -> ExperimentConfig:
        """The experiment of one variant and seed, writing its run under the report directory.

        Read once, when the plan is loaded: a long comparison keeps its settings even if a config file
        is edited while it runs.
        """
        if (variant, seed) not in self.configs:
            run_dir = Path(self.settings.out_dir) / "runs" / variant / f"seed_{seed}"
            self.configs[(variant, seed)] = load_config(self.experiment, [
                *self.overrides, *self.variants[variant], f"train.seed={seed}", f"output.run_dir={run_dir}", "output.overwrite=true"])
        return self.configs[(variant, seed)]


def load_compare_config(path: str | Path, overrides: Sequence[str] = ()) -> ComparePlan:
    """Read a compare YAML; `compare.KEY=VALUE` overrides settings, other `section.key=value` every variant.

    Raises:
        ConfigError: a missing file or key, an unknown key, a bad setting, or a variant that does not
            make a valid experiment config (checked now, before anything trains).
    """
    path = Path(path)
    raw = read_yaml_mapping(path, "compare config", "pass e.g. configs/compare_norman.yaml")
    _check_keys(raw, ("experiment", "overrides", "variants", "compare"), "the compare config")
    if not raw.get("experiment"):
        raise ConfigError(f"{path}: set `experiment:` to the base experiment config, e.g. norman_subset.yaml")
    base = path.resolve().parent
    experiment = (base / str(raw["experiment"])).resolve()
    variants_raw = raw.get("variants") or {"standalone": {}}
    if not isinstance(variants_raw, Mapping):
        raise ConfigError(f"{path}: variants must map a name to overrides, e.g. {{standalone: {{}}}}")
    variants = {str(name): _override_strings(values or {}, base, f"variants.{name}") for name, values in variants_raw.items()}
    settings_raw = dict(raw.get("compare") or {})
    command_line = parse_overrides(overrides)
    settings_raw.update({key[len(COMPARE_PREFIX):]: value for key, value in command_line.items() if key.startswith(COMPARE_PREFIX)})
    _check_keys(settings_raw, [item.name for item in dataclasses.fields(CompareSettings)], "compare")
    settings = CompareSettings(**settings_raw)
    common = _override_strings(raw.get("overrides") or {}, base, "overrides")
    common += [item for item in overrides if not item.partition("=")[0].strip().startswith(COMPARE_PREFIX)]
    plan = ComparePlan(path.resolve(), experiment, common, variants, settings, path.read_text())
    for variant in variants:
        try:
            for seed in settings.seeds:
                plan.experiment_config(variant, seed)
        except ConfigError as error:
            raise ConfigError(f"variant {variant!r}: {error}") from None
    return plan


def _check_keys(values: object, allowed: Sequence[str], where: str) -> None:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    for key in values:
        if key not in allowed:
            raise ConfigError(f"unknown key {key!r} in {where}{did_you_mean(key, allowed)}")


def _override_strings(values: object, base: Path, where: str) -> list[str]:
    """`{representation.adapter: x.yaml}` -> `["representation.adapter=/abs/x.yaml"]` (paths relative to `base`)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must map dotted keys to values, e.g. {{representation.kind: encoder}}")
    strings = []
    for key, value in values.items():
        if key in INPUT_PATH_KEYS and isinstance(value, str):
            value = str((base / Path(value).expanduser()).resolve())
        strings.append(f"{key}={json.dumps(value)}")
    return strings


@dataclass
class TestPredictions:
    """A trained run's predictions of its predictable test conditions, grouped by test subgroup."""

    run: LoadedRun
    predictions: Predictions
    groups: dict[str, list[str]]
    run_info: dict[str, Any]


def train_and_predict(config: ExperimentConfig) -> TestPredictions | None:
    """Train one experiment and predict its test conditions (None on non-main processes).

    Test conditions with a gene outside the head's perturbation vocabulary are left out of the groups.
    """
    run_dir = train_from_config(config)
    if not is_main_process():
        return None
    run = load_run(run_dir)
    info = json.loads((run_dir / "run_info.json").read_text())
    skipped = set(info["unpredictable_test_conditions"])
    groups = {name: [c for c in members if c not in skipped] for name, members in run.split.test_subgroups.items()}
    conditions = sorted({c for members in groups.values() for c in members})
    return TestPredictions(run, run.predict(conditions), groups, info)


class ResourceMeter:
    """Wall time, CPU time and peak resident memory (RSS) of a block of work in this process.

    The peak is the kernel's high-water mark (`VmHWM`), reset at the start of the block on Linux
    (`/proc/self/clear_refs`), so it is the block's own peak, torch tensors included; where that reset is
    impossible it is `getrusage`'s process-lifetime maximum (`block_peak` False). tracemalloc is not used:
    it misses torch's allocations and slowed training by about 20% on 2 CPU cores.
    """

    def __enter__(self) -> ResourceMeter:
        self.block_peak = _reset_rss_peak()
        self.started, self.cpu_started = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self.cpu_seconds = _cpu_seconds() - self.cpu_started
        self.peak_rss_mb = _rss_peak_mb()


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: unlike wall time, not inflated by other load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


@dataclass
class LatentViews:
    """What a trained head learned, in arrays the figures take."""

    masks: pd.DataFrame
    effects: pd.DataFrame
    programs: pd.DataFrame
    program_notes: dict[int, str]
    invariant: np.ndarray
    shifted: np.ndarray
    conditions: np.ndarray


@torch.no_grad()
def latent_views(run: LoadedRun, n_cells: int, max_programs: int, seed: int) -> LatentViews:
    """Masks, effects, gene programs of active latent dimensions and per-cell latents of a trained run.

    A dimension's program is the mean change of decoded expression when the control cells' posterior
    means move by one unit (one prior standard deviation) along it (mechanism design: the decoded change
    of a unit response of that latent node, a row of its gene programs through the saturation); the perturbations whose masks keep
    the dimension move cells along that program, scaled by their effect.
    """
    module = run.model.module.eval()
    genes = run.model.perturbation_genes
    masks = pd.DataFrame(module.mask_probabilities().cpu().numpy(), index=genes)
    effects = pd.DataFrame(module.effect_vectors().cpu().numpy(), index=genes)
    active = [k for k in masks.columns if masks[k].max() >= ACTIVE_MASK_PROBABILITY]
    active = sorted(active, key=lambda k: -effects[k].abs().sum())[:max_programs]
    controls = run.datamodule.control_cells(run.config.train.n_control_cells, run.config.train.seed)
    z, library = _posterior_means(run, controls)
    base = module.generative(z, library).log_normalized().double().mean(dim=0)
    rows = []
    for k in active:
        if module.uses_mechanisms:  # the program of node k: the decoded change of a unit response of that node
            unit = torch.zeros(1, module.config.n_latent, device=z.device)
            unit[0, k] = 1.0
            rows.append(module.effects.decode(unit)[0].double().cpu().numpy())
            continue
        shift = torch.zeros_like(z)
        shift[:, k] = 1.0
        rows.append((module.generative(z + shift, library).log_normalized().double().mean(dim=0) - base).cpu().numpy())
    programs = pd.DataFrame(np.vstack(rows) if rows else np.zeros((0, len(run.model.gene_names))), index=active, columns=run.model.gene_names)
    notes = {k: _movers(masks[k], effects[k]) for k in active}

    data = run.datamodule.data
    predictable = np.array([is_predictable(name, genes) for name in data.conditions])
    candidates = np.flatnonzero(predictable)
    cells = np.sort(np.random.default_rng(seed).choice(candidates, min(n_cells, len(candidates)), replace=False))
    invariant, _ = _posterior_means(run, cells)
    perturbations = torch.from_numpy(multi_hot(list(data.conditions[cells]), genes))
    shifted = invariant + module.perturbation_effect(perturbations, deterministic=True).z_p
    return LatentViews(masks, effects, programs, notes, invariant.cpu().numpy(), shifted.cpu().numpy(), data.conditions[cells])


def _posterior_means(run: LoadedRun, cells: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
    inputs = run.datamodule.control_inputs(cells)
    h = run.predictor.embed_cells(inputs[ENCODER_INPUTS_KEY]) if ENCODER_INPUTS_KEY in inputs else inputs["h"]
    return run.model.module.inference(h.float()).qz_mean, inputs.get("library_size")


def _movers(probabilities: pd.Series, effects: pd.Series, shown: int = 3) -> str:
    on = probabilities[probabilities >= ACTIVE_MASK_PROBABILITY].index
    ordered = effects[on].abs().sort_values(ascending=False).index
    names = [f"{gene} ({effects[gene]:+.2f})" for gene in ordered[:shown]]
    more = f" +{len(ordered) - shown} more" if len(ordered) > shown else ""
    return "moved by " + ", ".join(names) + more if names else ""


def embed_2d(matrix: np.ndarray, method: str, seed: int) -> np.ndarray:
    """[cells, 2] UMAP (scanpy, 15 neighbours) or PCA coordinates of `matrix`."""
    matrix = np.asarray(matrix, dtype=np.float32)
    if method == "umap":
        import anndata as ad
        import scanpy as sc

        adata = ad.AnnData(matrix)
        sc.pp.neighbors(adata, use_rep="X", n_neighbors=15, random_state=seed)
        sc.tl.umap(adata, random_state=seed)
        return np.asarray(adata.obsm["X_umap"])
    centred = matrix - matrix.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return centred @ components[:2].T


@dataclass
class VariantResult:
    """One variant's runs: predictions per seed, resources, logs and the first seed's latent views."""

    predictions: dict[int, Predictions] = field(default_factory=dict)
    groups: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    run_infos: dict[int, dict[str, Any]] = field(default_factory=dict)
    logs: list[pd.DataFrame] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_is_lifetime: bool = False
    views: LatentViews | None = None


def run_compare(config_path: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Train every variant × seed of a compare config, score them beside the baselines, write the report.

    Works in one process or under `accelerate launch` (training uses every process; the main one
    predicts and writes). Returns the report directory.

    Raises:
        ConfigError: a bad compare config, an existing report directory without compare.overwrite=true,
            or variants that change the data or the split (they must be scored on the same conditions).
    """
    started = time.perf_counter()
    plan = load_compare_config(config_path, overrides)
    out = Path(plan.settings.out_dir)
    _prepare_out_dir(out, plan.settings.overwrite)
    results: dict[str, VariantResult] = {}
    first: TestPredictions | None = None
    for variant in plan.variants:
        result = results[variant] = VariantResult()
        for seed in plan.settings.seeds:
            with ResourceMeter() as meter:
                trained = train_and_predict(plan.experiment_config(variant, seed))
            if trained is None:
                continue
            first = first or trained
            _check_same_scoring(first, trained, variant)
            result.predictions[seed] = trained.predictions
            result.groups[seed] = trained.groups
            result.run_infos[seed] = trained.run_info
            result.logs.append(_read_log(trained.run.run_dir).assign(model=variant, seed=seed))
            result.seconds += meter.seconds
            result.cpu_seconds += meter.cpu_seconds
            result.peak_rss_mb = max(result.peak_rss_mb, meter.peak_rss_mb)
            result.peak_is_lifetime |= not meter.block_peak
            if result.views is None:
                result.views = latent_views(trained.run, plan.settings.embedding_cells, plan.settings.max_programs, seed)
    if first is not None:
        _write_report(plan, first, results, out, time.perf_counter() - started, list(overrides))
    return out


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix two comparisons in one directory; the main process clears it when asked to.

    No Accelerator exists yet, so `is_main_process` reads the launcher's RANK.
    """
    existing = [out / name for name in ("report.md", "report.html", "metrics.csv", "figures", "runs") if (out / name).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{out} already holds a comparison; choose another compare.out_dir or pass compare.overwrite=true")
    if is_main_process():
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _check_same_scoring(first: TestPredictions, other: TestPredictions, variant: str) -> None:
    if other.run.datamodule.data.fingerprint != first.run.datamodule.data.fingerprint or other.run.split.to_dict() != first.run.split.to_dict():
        raise ConfigError(f"variant {variant!r} changes the data or the split; variants may only change the representation, "
                          "model and training, so that all are scored on the same held-out conditions")


def _read_log(run_dir: Path) -> pd.DataFrame:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    rows = [{"epoch": r["epoch"], "loss": r["loss"], **{f"val_{k}": v for k, v in (r.get("val") or {}).items()}} for r in records]
    return pd.DataFrame(rows)


def _shared_groups(results: Mapping[str, VariantResult], seed: int) -> dict[str, list[str]]:
    """Test conditions every variant could predict for `seed`, by subgroup (one set scored for all)."""
    groups = [result.groups[seed] for result in results.values()]
    names = groups[0].keys()
    return {name: [c for c in groups[0][name] if all(c in g.get(name, []) for g in groups[1:])] for name in names}


def _score(plan: ComparePlan, data: PerturbationData, first: TestPredictions, results: Mapping[str, VariantResult], de: DEGenes) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tidy metrics and GI table over seeds (variant, seed, ...), baselines included once per seed."""
    frames, interactions = [], []
    keep = set(plan.variants) | set(plan.settings.baselines)
    for seed in plan.settings.seeds:
        groups = _shared_groups(results, seed)
        named = {variant: result.predictions[seed] for variant, result in results.items()}
        _, tidy = evaluate_beside_baselines(
            data, first.run.split, named, first.run.config.data.de_method, groups=groups, n_de_genes=first.run.config.data.n_de_genes
        )
        frames.append(tidy[tidy["model"].isin(keep)].assign(seed=seed))
        doubles = sorted({c for members in groups.values() for c in members if len(genes_of(c)) == 2})
        baselines = {name: p for name, p in predict_baselines(data, first.run.split.train, doubles).items() if name in keep}
        table = interaction_table(data, {**named, **baselines}, doubles, de)
        interactions.append(table.assign(seed=seed))
    tidy = pd.concat(frames, ignore_index=True).rename(columns={"model": "variant"})
    tidy = tidy[["variant", "seed", "subgroup", "condition", "metric", "value"]]
    return tidy, pd.concat(interactions, ignore_index=True)


def _write_report(plan: ComparePlan, first: TestPredictions, results: Mapping[str, VariantResult], out: Path, seconds: float, overrides: list[str]) -> None:
    data, split = first.run.datamodule.data, first.run.split
    de = compute_de_genes(data, method=first.run.config.data.de_method, n_top=first.run.config.data.n_de_genes)
    tidy, interactions = _score(plan, data, first, results, de)
    out.mkdir(parents=True, exist_ok=True)
    tidy.to_csv(out / "metrics.csv", index=False)
    interactions.to_csv(out / "interactions.csv", index=False)
    models = [*plan.variants, *[name for name in BASELINES if name in plan.settings.baselines]]
    figures = out / "figures"
    report = ReportDocument(f"PerturbedVAE comparison: {', '.join(plan.variants)} beside {', '.join(plan.settings.baselines)}")
    _overview(report, plan, data, split, tidy, seconds)
    _metric_section(report, tidy, models, figures)
    _response_section(report, data, split, results, de, figures)
    _interaction_section(report, interactions, models, figures)
    _interpretation_section(report, plan, results, figures)
    _curves_section(report, results, figures)
    _resource_section(report, results)
    _reproducibility_section(report, plan, first, overrides)
    (out / "report.md").write_text(report.to_markdown(out))
    (out / "report.html").write_text(report.to_html())


def _overview(report: ReportDocument, plan: ComparePlan, data: PerturbationData, split, tidy: pd.DataFrame, seconds: float) -> None:
    sizes = ", ".join(f"{name}: {len(members)}" for name, members in split.test_subgroups.items())
    report.text(
        f"Data `{data.source or 'simulated'}` (fingerprint `{data.fingerprint}`): {data.adata.n_obs:,} cells, "
        f"{len(data.genes)} genes, {len(data.condition_names) - 1} perturbed conditions. Split `{split.scheme}` "
        f"(seed {split.seed}): {len(split.train)} training, {len(split.val)} validation and {len(split.test)} test "
        f"conditions ({sizes}). Variants: {', '.join(f'`{v}`' for v in plan.variants)}; seeds "
        f"{', '.join(map(str, plan.settings.seeds))} (training seed; the split is the same for every run). "
        f"Total wall time {seconds / 60:.1f} min."
    )


def _metric_section(report: ReportDocument, tidy: pd.DataFrame, models: list[str], figures: Path) -> None:
    report.heading("Held-out conditions: metrics per test subgroup")
    report.text(
        "Mean ± sd over seeds of each seed's mean over the subgroup's conditions. ↑ higher is better, ↓ lower is "
        "better. pearson_delta_de: correlation of predicted and observed change from control on each condition's "
        "top-20 DE genes; mse_de: squared error on those genes; frac_opposite_direction_de: fraction of them "
        "predicted to move the wrong way; nrmse: normalized RMSE of predicted vs observed cells (discrepancy-VAE); "
        "rank: how many other conditions' predictions lie closer to the observed profile (0 best, 0.5 random). "
        "Baselines see the same training conditions; they are deterministic, so their sd is 0."
    )
    table = seed_summary_frame(tidy, SEED_TABLE_METRICS, model_column="variant")
    arrows = {m: f"{m} {'↓' if m in plots.LOWER_IS_BETTER else '↑'}" for m in SEED_TABLE_METRICS}
    order = {name: index for index, name in enumerate(models)}
    for subgroup, rows in table.groupby("subgroup", sort=False):
        n_conditions = tidy.loc[tidy["subgroup"] == subgroup, "condition"].nunique()
        report.heading(f"{subgroup} ({n_conditions} conditions)", level=3)
        rows = rows.drop(columns="subgroup").sort_values("model", key=lambda s: s.map(order)).rename(columns=arrows)
        report.table(rows)
    stats = seed_statistics(tidy, SEED_TABLE_METRICS, model_column="variant")
    path = plots.save_figure(plots.plot_metric_bars(stats, SEED_TABLE_METRICS, models), figures / "metric_bars.png")
    report.figure(path, "Metrics per test subgroup, variants beside the baselines (mean ± sd over seeds)")


def _response_section(report: ReportDocument, data: PerturbationData, split, results: Mapping[str, VariantResult], de: DEGenes, figures: Path) -> None:
    combos = sorted(name for name in split.test if len(genes_of(name)) > 1 and all(
        name in p.means.index for r in results.values() for p in r.predictions.values()))
    if not combos:
        return
    report.heading("Predicted vs observed change of each held-out combination")
    control = pd.Series(data.control_mean, index=data.genes)
    observed, predicted, spread = {}, {}, {}
    additive = predict_baselines(data, split.train, combos)["additive"].means
    for name in combos:
        top = [data.genes[i] for i in de.top(name)]
        observed[name] = data.mean_profiles.loc[name, top] - control[top]
    for variant, result in results.items():
        stacked = np.stack([p.means.loc[combos, data.genes].to_numpy() for p in result.predictions.values()])
        mean, sd = pd.DataFrame(stacked.mean(axis=0), index=combos, columns=data.genes), pd.DataFrame(stacked.std(axis=0), index=combos, columns=data.genes)
        predicted[variant] = {name: mean.loc[name, observed[name].index] - control[observed[name].index] for name in combos}
        spread[variant] = {name: sd.loc[name, observed[name].index] for name in combos}
    predicted["additive"] = {name: additive.loc[name, observed[name].index] - control[observed[name].index] for name in combos}
    path = plots.save_figure(plots.plot_de_responses(observed, predicted, spread), figures / "de_responses.png")
    report.figure(path, "Top-20 DE genes of each held-out combination, sorted by observed change: observed (bars), "
                        "variants (mean over seeds, error bar = sd) and the additive baseline (sum of the single-gene changes)")


def _interaction_section(report: ReportDocument, interactions: pd.DataFrame, models: list[str], figures: Path) -> None:
    if interactions.empty:
        return
    report.heading("Genetic interactions of held-out doubles")
    report.text(
        "Departure from additivity on each double's top-20 DE genes, with δ = mean − control mean and the observed "
        "single-gene changes δ_A, δ_B: residual norm ‖δ_AB − (δ_A + δ_B)‖₂ (0 = additive), and Norman et al. (2019)'s "
        "GI magnitude √(c_A² + c_B²) of the fit δ_AB ≈ c_A δ_A + c_B δ_B (√2 ≈ 1.41 = additive). Columns: Pearson r over "
        "the held-out doubles of predicted vs observed score, and the mean per-double correlation of predicted and observed "
        "residual vectors (does the model predict *which* genes interact?). Mean ± sd over seeds; – where a model "
        "predicts the same score for every double (the additive baseline's residual is always 0)."
    )
    per_seed = pd.concat([interaction_summary(group).assign(seed=seed) for seed, group in interactions.groupby("seed")])
    columns = ["residual_norm_pearson", "norman_magnitude_pearson", "mean_residual_pearson"]
    rows = []
    for model in [m for m in models if m in set(per_seed["model"])]:
        chosen = per_seed[per_seed["model"] == model]
        rows.append({"model": model, "doubles": int(chosen["n_doubles"].iloc[0]),
                     **{c: _mean_sd_text(chosen[c]) for c in columns}})
    report.table(pd.DataFrame(rows))
    residuals = interactions[interactions["score"] == "residual_norm"]
    averaged = residuals.groupby(["model", "condition"], sort=False)[["observed", "predicted"]].mean().reset_index()
    averaged = averaged[averaged["model"].isin(models)]
    path = plots.save_figure(plots.plot_interactions(averaged, "residual norm ‖ε‖₂\n(Δ log-norm. expr., top-20 DE genes)"), figures / "interactions.png")
    report.figure(path, "Predicted vs observed residual norm of each held-out double (mean over seeds); the dashed line is a perfect prediction")


def _mean_sd_text(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    return f"{values.mean():.3f}" if len(values) == 1 else f"{values.mean():.3f} ± {values.std():.3f}"


def _interpretation_section(report: ReportDocument, plan: ComparePlan, results: Mapping[str, VariantResult], figures: Path) -> None:
    views = {variant: result.views for variant, result in results.items() if result.views is not None}
    if not views:
        return
    seed = plan.settings.seeds[0]
    report.heading(f"What the heads learned (seed {seed})")
    masks = {variant: view.masks for variant, view in views.items()}
    path = plots.save_figure(plots.plot_mask_heatmaps(masks), figures / "mask_heatmap.png")
    report.figure(path, "Learned masks: probability that a perturbation moves a latent dimension (before causal mixing)")
    kept = ", ".join(f"`{variant}` {(view.masks >= ACTIVE_MASK_PROBABILITY).sum(axis=1).mean():.1f} of {view.masks.shape[1]}"
                     for variant, view in views.items())
    report.text(f"Latent dimensions a perturbation moves (mask probability ≥ {ACTIVE_MASK_PROBABILITY}), mean over perturbations: "
                f"{kept}. Sparse mechanisms, the premise of the model, show as few dimensions per perturbation.")
    method = "UMAP" if plan.settings.embedding == "umap" else "PCA"
    for variant, view in views.items():
        if len(view.programs):
            path = plots.save_figure(plots.plot_programs(view.programs, view.program_notes, plan.settings.program_genes,
                                                         f"{variant}: gene programs of active latent dimensions (red: up, blue: down)"),
                                     figures / f"programs_{variant}.png")
            report.figure(path, f"{variant}: each active dimension's program, the change in decoded expression of control cells "
                                "moved one unit along it; the perturbations moving it and their effect are in the panel titles")
            report.table(_program_table(view, plan.settings.program_genes))
        else:
            report.text(f"`{variant}`: no latent dimension is kept by any mask with probability ≥ {ACTIVE_MASK_PROBABILITY}.")
        invariant = embed_2d(view.invariant, plan.settings.embedding, seed)
        shifted = embed_2d(view.shifted, plan.settings.embedding, seed)
        path = plots.save_figure(plots.plot_latent_embeddings(invariant, shifted, view.conditions, method, f"{variant}: cells in latent space ({method})"),
                                 figures / f"latents_{variant}.png")
        report.figure(path, f"{variant}: {len(view.conditions)} cells; left the invariant latent (the encoder's cell state, which should "
                            "not depend on the perturbation), right the latent after adding the perturbation's shift")


def _program_table(view: LatentViews, n_genes: int) -> pd.DataFrame:
    rows = []
    for k, row in view.programs.iterrows():
        up = row.sort_values(ascending=False).index[: n_genes // 2]
        down = row.sort_values().index[: n_genes // 2]
        rows.append({"latent dim": k, "perturbations (effect)": view.program_notes[k].removeprefix("moved by ") or "–",
                     "top up genes": ", ".join(g for g in up if row[g] > 0) or "–",
                     "top down genes": ", ".join(g for g in down if row[g] < 0) or "–"})
    return pd.DataFrame(rows)


def _curves_section(report: ReportDocument, results: Mapping[str, VariantResult], figures: Path) -> None:
    logs = pd.concat([log for result in results.values() for log in result.logs], ignore_index=True)
    report.heading("Training curves")
    path = plots.save_figure(plots.plot_training_curves(logs), figures / "training_curves.png")
    report.figure(path, "Training loss and validation pearson_delta_de per epoch (the weights of the best validation epoch are kept)")


def _resource_section(report: ReportDocument, results: Mapping[str, VariantResult]) -> None:
    report.heading("Time and memory per variant")
    report.text("Wall time of training + predicting all seeds in this process, and its CPU time (user + system, all "
                "threads; unlike wall time it does not grow when other programs share the cores). Peak RSS: the process's resident-memory "
                "high-water mark during the variant's runs (Linux VmHWM, reset before each run; marked * where it could not "
                "be reset and is the process maximum so far, getrusage). It includes the loaded data and libraries.")
    rows = []
    for variant, result in results.items():
        infos = list(result.run_infos.values())
        rows.append({"variant": variant, "seeds": len(infos), "wall s (all seeds)": result.seconds, "CPU s (all seeds)": result.cpu_seconds,
                     "train s per seed": float(np.mean([i["train_seconds"] for i in infos])),
                     "training cells/s": float(np.mean([i["train_cells_per_second"] for i in infos])),
                     "epochs (best)": ", ".join(f"{i['epochs_done']} ({i['best_epoch']})" for i in infos),
                     "peak RSS MiB": f"{result.peak_rss_mb:.0f}" + ("*" if result.peak_is_lifetime else "")})
    report.table(pd.DataFrame(rows), digits=1)


def _reproducibility_section(report: ReportDocument, plan: ComparePlan, first: TestPredictions, overrides: list[str]) -> None:
    report.heading("Reproduce")
    report.text("The command that wrote this report, its equivalent, and the configs it read.")
    equivalent = shlex.join(["perturbedvae", "compare", "--config", str(plan.path), *overrides])
    report.code(f"{shlex.join(sys.argv)}\n# equivalent:\n{equivalent}", "bash")
    report.text(f"Compare config `{plan.path}`:")
    report.code(plan.text, "yaml")
    report.text(f"Base experiment config `{plan.experiment}` as run for the first variant and seed (each run's own "
                "config.yaml is in its run directory):")
    report.code(yaml.safe_dump(first.run.config.to_dict(), sort_keys=False), "yaml")
    versions = {"python": platform.python_version(), **{name: _version(name) for name in VERSION_PACKAGES}}
    report.text("Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items())
                + f". Data fingerprint `{first.run.datamodule.data.fingerprint}`; platform {platform.platform()}; "
                f"torch threads {torch.get_num_threads()}.")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


__all__ = ["CompareSettings", "ComparePlan", "LatentViews", "ResourceMeter", "TestPredictions", "embed_2d",
           "latent_views", "load_compare_config", "run_compare", "train_and_predict"]
