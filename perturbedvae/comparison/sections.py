"""The comparison report: its files, and each section's prose, tables and figures.

`write_report` writes `metrics.csv`, `interactions.csv`, `figures/`, `report.md` and `report.html` (the
figures embedded); each `_..._section` adds one heading of the report.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from perturbedvae.api.latents import ACTIVE_MASK_PROBABILITY
from perturbedvae.comparison.plan import ComparePlan
from perturbedvae.comparison.scoring import score_over_seeds
from perturbedvae.comparison.trained import TestPredictions, VariantResult
from perturbedvae.data.conditions import genes_of
from perturbedvae.data.de import DEGenes, compute_de_genes
from perturbedvae.data.loading import PerturbationData
from perturbedvae.evaluate import plots
from perturbedvae.evaluate.baselines import BASELINES, predict_baselines
from perturbedvae.evaluate.gi import interaction_summary
from perturbedvae.evaluate.report import SEED_TABLE_METRICS, ReportDocument, seed_statistics, seed_summary_frame

VERSION_PACKAGES = ("perturbedvae", "torch", "numpy", "pandas", "scipy", "anndata", "scanpy", "accelerate",
                    "transformers", "peft", "matplotlib", "umap-learn")


def write_report(plan: ComparePlan, first: TestPredictions, results: Mapping[str, VariantResult], out: Path, seconds: float,
                 overrides: list[str]) -> None:
    """Score every variant and write the report directory `out` (the data and split are the first run's)."""
    data, split, settings = first.model.data, first.model.split, first.model.state.config.data
    de = compute_de_genes(data, method=settings.de_method, n_top=settings.n_de_genes)
    tidy, interactions = score_over_seeds(plan, data, first, results, de)
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
            report.table(view.program_table(plan.settings.program_genes))
        else:
            report.text(f"`{variant}`: no latent dimension is kept by any mask with probability ≥ {ACTIVE_MASK_PROBABILITY}.")
        invariant = embed_2d(view.invariant, plan.settings.embedding, seed)
        shifted = embed_2d(view.shifted, plan.settings.embedding, seed)
        path = plots.save_figure(plots.plot_latent_embeddings(invariant, shifted, view.conditions, method, f"{variant}: cells in latent space ({method})"),
                                 figures / f"latents_{variant}.png")
        report.figure(path, f"{variant}: {len(view.conditions)} cells; left the invariant latent (the encoder's cell state, which should "
                            "not depend on the perturbation), right the latent after adding the perturbation's shift")


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
    report.code(yaml.safe_dump(first.model.state.config.to_dict(), sort_keys=False), "yaml")
    versions = {"python": platform.python_version(), **{name: _version(name) for name in VERSION_PACKAGES}}
    report.text("Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items())
                + f". Data fingerprint `{first.model.data.fingerprint}`; platform {platform.platform()}; "
                f"torch threads {torch.get_num_threads()}.")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"




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



__all__ = ["embed_2d", "write_report"]
