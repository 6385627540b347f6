"""Figures of a comparison report, as pure functions of arrays and tables.

Every function takes already computed numbers (no model, no training) and returns a matplotlib `Figure`
built with the object-oriented API, so nothing here touches pyplot's global state or needs a display:
the Agg canvas renders them, in a test, a server or under `accelerate launch`. Figures are meant for a
reader who did not write the code: each has a title, labelled axes with units and a legend.
"""

from __future__ import annotations

import base64
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from perturbedvae.evaluate.metrics import LOWER_IS_BETTER

DELTA_LABEL = "change vs control\n(Δ mean log-normalized expr.)"
"""Unit of every expression change in the figures: difference of mean log1p(CP10k) expression."""


_OBSERVED_COLOR = "#4d4d4d"
_BASELINE_COLORS = {"additive": "#e08214", "linear": "#8c510a", "no_change": "#bababa", "train_mean": "#878787",
                    "dominance": "#dfc27d", "saturating_additive": "#fdb863"}
_MODEL_PALETTE = ("#1b7837", "#2166ac", "#762a83", "#b2182b", "#01665e", "#c51b7d")
_MARKERS = ("o", "s", "D", "^", "v", "P")
_DPI = 110


def model_colors(models: Sequence[str]) -> dict[str, str]:
    """One stable colour per model: baselines in browns/greys, learned variants in saturated colours."""
    learned = [name for name in models if name not in _BASELINE_COLORS]
    colors = {name: _MODEL_PALETTE[index % len(_MODEL_PALETTE)] for index, name in enumerate(learned)}
    return {name: _BASELINE_COLORS.get(name, colors.get(name)) for name in models}


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write `figure` as PNG (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def png_base64(path: str | Path) -> str:
    """A PNG file as base64 text, for `<img src="data:image/png;base64,...">` in a self-contained HTML."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _grid(n_panels: int, n_columns: int, panel_size: tuple[float, float], layout: str | None = None) -> tuple[Figure, list]:
    columns = max(1, min(n_columns, n_panels))
    rows = max(1, math.ceil(n_panels / columns))
    figure = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), layout=layout)
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for axis in axes[n_panels:]:
        axis.set_visible(False)
    return figure, axes[:n_panels]


def plot_de_responses(
    observed: Mapping[str, pd.Series],
    predicted: Mapping[str, Mapping[str, pd.Series]],
    predicted_sd: Mapping[str, Mapping[str, pd.Series]] | None = None,
    n_columns: int = 3,
) -> Figure:
    """Observed vs predicted change on each condition's top DE genes, one panel per condition.

    Args:
        observed: Condition -> observed change from control, indexed by its DE genes (gene names).
        predicted: Model -> condition -> predicted change on the same genes.
        predicted_sd: Optional model -> condition -> standard deviation over seeds (error bars).
    """
    conditions = list(observed)
    figure, axes = _grid(len(conditions), n_columns, (5.2, 3.4))
    colors = model_colors(list(predicted))
    for axis, condition in zip(axes, conditions):
        truth = observed[condition].sort_values()
        positions = np.arange(len(truth))
        axis.bar(positions, truth.to_numpy(), color=_OBSERVED_COLOR, alpha=0.35, width=0.8, label="observed")
        for index, (model, by_condition) in enumerate(predicted.items()):
            values = by_condition[condition].reindex(truth.index).to_numpy()
            spread = None
            if predicted_sd is not None and model in predicted_sd:
                spread = predicted_sd[model][condition].reindex(truth.index).to_numpy()
            offset = (index - (len(predicted) - 1) / 2) * 0.18
            axis.errorbar(positions + offset, values, yerr=spread, fmt=_MARKERS[index % len(_MARKERS)], color=colors[model],
                          markersize=4, elinewidth=0.8, capsize=0, label=model)
        axis.axhline(0.0, color="black", linewidth=0.6)
        axis.set_xticks(positions)
        axis.set_xticklabels(truth.index, rotation=90, fontsize=7)
        axis.set_title(condition, fontsize=10)
        axis.set_ylabel(DELTA_LABEL, fontsize=8)
    if axes:
        handles, labels = axes[0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, 1.0))
    figure.suptitle("Held-out combinations: predicted vs observed change on each one's top DE genes", y=1.04)
    figure.tight_layout()
    return figure


def plot_metric_bars(stats: pd.DataFrame, metrics: Sequence[str], models: Sequence[str] | None = None) -> Figure:
    """Mean ± sd over seeds of each metric, one row of panels per test subgroup, one bar per model.

    Args:
        stats: Columns subgroup, model, metric, mean, sd (sd may be NaN with one seed).
        metrics: Metrics to show, one panel column each, in this order.
        models: Bar order (default: order of first appearance).
    """
    subgroups = list(dict.fromkeys(stats["subgroup"]))
    models = list(models) if models is not None else list(dict.fromkeys(stats["model"]))
    colors = model_colors(models)
    figure = Figure(figsize=(3.3 * len(metrics), 3.0 * len(subgroups) + 0.6))
    axes = figure.subplots(len(subgroups), len(metrics), squeeze=False)
    for row, subgroup in enumerate(subgroups):
        for column, metric in enumerate(metrics):
            axis = axes[row, column]
            selected = stats[(stats["subgroup"] == subgroup) & (stats["metric"] == metric)].set_index("model")
            shown = [model for model in models if model in selected.index]
            means = selected.loc[shown, "mean"].to_numpy(dtype=float)
            errors = np.nan_to_num(selected.loc[shown, "sd"].to_numpy(dtype=float))
            axis.bar(np.arange(len(shown)), means, yerr=errors, color=[colors[model] for model in shown], capsize=3)
            axis.set_xticks(np.arange(len(shown)))
            axis.set_xticklabels(shown, rotation=40, ha="right", fontsize=8)
            axis.axhline(0.0, color="black", linewidth=0.6)
            direction = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
            axis.set_title(f"{metric}\n({direction})", fontsize=9)
            if column == 0:
                axis.set_ylabel(f"{subgroup}\nmean over conditions", fontsize=9)
    figure.suptitle("Test metrics per subgroup (bars: mean over seeds; error bars: sd over seeds)")
    figure.tight_layout()
    return figure


def plot_mask_heatmaps(probabilities: Mapping[str, pd.DataFrame]) -> Figure:
    """Learned perturbation → latent mask probabilities, one heatmap per model.

    Args:
        probabilities: Model -> frame [perturbed genes x latent dimensions] of keep probabilities in [0, 1].
    """
    figure, axes = _grid(len(probabilities), 3, (0.35 * max(frame.shape[1] for frame in probabilities.values()) + 2.5,
                                                  0.22 * max(frame.shape[0] for frame in probabilities.values()) + 1.5), layout="constrained")
    image = None
    for axis, (model, frame) in zip(axes, probabilities.items()):
        image = axis.imshow(frame.to_numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        axis.set_xticks(np.arange(frame.shape[1]))
        axis.set_xticklabels([str(column) for column in frame.columns], fontsize=7)
        axis.set_yticks(np.arange(frame.shape[0]))
        axis.set_yticklabels(frame.index, fontsize=7)
        axis.set_xlabel("latent dimension")
        axis.set_ylabel("perturbed gene")
        axis.set_title(model, fontsize=10)
    if image is not None:
        figure.colorbar(image, ax=axes, label="P(mask on)\n(perturbation moves the dimension)", shrink=0.8)
    figure.suptitle("Which latent dimensions each perturbation moves (learned sparse masks)")
    return figure


def plot_programs(loadings: pd.DataFrame, descriptions: Mapping[object, str], n_genes: int = 10, title: str = "") -> Figure:
    """Top genes of each latent dimension's expression program, one panel per dimension.

    Args:
        loadings: Frame [latent dimensions x genes]: change in predicted expression per unit shift.
        descriptions: Dimension -> short text shown under the panel title (e.g. the perturbations moving it).
        n_genes: Genes per panel, chosen by absolute change.
    """
    dimensions = list(loadings.index)
    figure, axes = _grid(len(dimensions), 4, (3.6, 0.28 * n_genes + 1.9))
    for axis, dimension in zip(axes, dimensions):
        row = loadings.loc[dimension]
        top = row.reindex(row.abs().sort_values(ascending=False).index[:n_genes])[::-1]
        colors = ["#b2182b" if value > 0 else "#2166ac" for value in top.to_numpy()]
        axis.barh(np.arange(len(top)), top.to_numpy(), color=colors)
        axis.set_yticks(np.arange(len(top)))
        axis.set_yticklabels(top.index, fontsize=7)
        axis.axvline(0.0, color="black", linewidth=0.6)
        axis.set_xlabel("Δ log-normalized expr.\nper unit latent shift", fontsize=8)
        note = descriptions.get(dimension, "")
        axis.set_title(f"latent dim {dimension}" + (f"\n{textwrap.fill(note, 42)}" if note else ""), fontsize=8)
    figure.suptitle(title or "Gene programs of the active latent dimensions (red: up, blue: down)")
    figure.tight_layout()
    return figure


def plot_latent_embeddings(
    invariant: np.ndarray,
    shifted: np.ndarray,
    conditions: Sequence[str],
    method: str,
    title: str = "",
    max_legend: int = 40,
) -> Figure:
    """2-D embeddings of the invariant latent (should mix conditions) beside the shifted latent (should separate).

    Args:
        invariant: [cells, 2] embedding of z_inv.
        shifted: [cells, 2] embedding of z_inv + z_p.
        conditions: Condition of each cell (colour).
        method: "UMAP" or "PCA", written on the axes.
    """
    labels = np.asarray(conditions, dtype=object)
    names = sorted(set(labels), key=lambda name: (name != "control", name))
    palette = _categorical_colors(len(names))
    figure = Figure(figsize=(12.5, 5.4))
    axes = figure.subplots(1, 2)
    panels = ((invariant, "invariant latent z_inv\n(conditions should mix)"), (shifted, "shifted latent z_inv + z_p\n(conditions should separate)"))
    for axis, (coordinates, subtitle) in zip(axes, panels):
        for color, name in zip(palette, names):
            chosen = labels == name
            axis.scatter(coordinates[chosen, 0], coordinates[chosen, 1], s=4, color=color, label=name, alpha=0.7, linewidths=0)
        axis.set_xlabel(f"{method} 1")
        axis.set_ylabel(f"{method} 2")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_title(subtitle, fontsize=10)
    for name in names:  # name each condition's group where it sits in the shifted latent
        centre = np.median(shifted[labels == name], axis=0)
        axes[1].annotate(name, centre, fontsize=6, ha="center", va="bottom", xytext=(0, 4), textcoords="offset points")
    if len(names) <= max_legend:
        figure.legend(*axes[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
                      markerscale=3, ncol=1 + len(names) // 25, frameon=False, title="condition")
    figure.suptitle(title or f"Cells in latent space ({method}), coloured by condition")
    figure.tight_layout()
    return figure


def _categorical_colors(n_colors: int) -> list:
    """Near-black for the first (control), then the tab20 families: up to 60 distinguishable conditions."""
    maps = [colormaps["tab20"], colormaps["tab20b"], colormaps["tab20c"]]
    colors = [cmap(index) for cmap in maps for index in range(cmap.N)]
    return [(0.1, 0.1, 0.1, 1.0)] + [colors[index % len(colors)] for index in range(max(n_colors - 1, 0))]


def plot_training_curves(log: pd.DataFrame, metric: str = "val_pearson_delta_de") -> Figure:
    """Training loss and a validation metric per epoch, one line per (model, seed).

    Args:
        log: Columns model, seed, epoch, loss and optionally `metric`.
    """
    models = list(dict.fromkeys(log["model"]))
    colors = model_colors(models)
    figure = Figure(figsize=(11.0, 3.8))
    loss_axis, metric_axis = figure.subplots(1, 2)
    for (model, seed), run in log.groupby(["model", "seed"], sort=False):
        run = run.sort_values("epoch")
        label = f"{model} (seed {seed})"
        loss_axis.plot(run["epoch"], run["loss"], color=colors[model], alpha=0.8, label=label)
        if metric in run and run[metric].notna().any():
            metric_axis.plot(run["epoch"], run[metric], color=colors[model], alpha=0.8, marker=".", label=label)
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss per cell\n(neg. ELBO + penalties)")
    loss_axis.set_title("training loss")
    metric_axis.set_xlabel("epoch")
    metric_axis.set_ylabel(metric.replace("val_", "validation "))
    metric_axis.set_title("validation score on held-out combinations")
    loss_axis.legend(fontsize=7, frameon=False)
    figure.tight_layout()
    return figure


def plot_interactions(table: pd.DataFrame, score_label: str) -> Figure:
    """Predicted vs observed genetic-interaction score of each held-out double, one panel per model.

    Args:
        table: Columns model, condition, observed, predicted (one score, e.g. mean over seeds).
        score_label: Name and unit of the score, written on both axes.
    """
    models = list(dict.fromkeys(table["model"]))
    colors = model_colors(models)
    figure, axes = _grid(len(models), 4, (3.6, 3.5))
    finite = table[["observed", "predicted"]].to_numpy(dtype=float)
    low, high = float(np.nanmin(finite)), float(np.nanmax(finite))
    pad = 0.05 * (high - low or 1.0)
    for axis, model in zip(axes, models):
        rows = table[table["model"] == model]
        axis.plot([low - pad, high + pad], [low - pad, high + pad], color="black", linewidth=0.6, linestyle="--", label="y = x")
        axis.scatter(rows["observed"], rows["predicted"], color=colors[model], s=22)
        for _, row in rows.iterrows():
            axis.annotate(row["condition"], (row["observed"], row["predicted"]), fontsize=6, xytext=(2, 2), textcoords="offset points")
        axis.set_xlim(low - pad, high + pad)
        axis.set_ylim(low - pad, high + pad)
        axis.set_xlabel(f"observed {score_label}", fontsize=8)
        axis.set_ylabel(f"predicted {score_label}", fontsize=8)
        axis.set_title(model, fontsize=10)
    figure.suptitle("Genetic interactions of held-out doubles: departure from additivity")
    figure.tight_layout()
    return figure


def plot_benchmark(scores: pd.DataFrame, noise: pd.DataFrame, metrics: Sequence[str], models: Sequence[str]) -> Figure:
    """Per held-out combination, grouped bars of every model and baseline, with the noise floor drawn.

    Args:
        scores: Columns model, combination, metric, mean, sd (over seeds; sd 0 or NaN for baselines).
        noise: Noise floor per combination (index) and metric (columns), or empty.
        metrics: One panel per metric, stacked.
        models: Bar order within each group.
    """
    combinations = list(dict.fromkeys(scores["combination"]))
    colors = model_colors(models)
    figure = Figure(figsize=(max(6.0, 1.1 * len(combinations) * (1 + len(models) / 6)), 3.2 * len(metrics)))
    axes = figure.subplots(len(metrics), 1, squeeze=False)[:, 0]
    width = 0.8 / len(models)
    for axis, metric in zip(axes, metrics):
        selected = scores[scores["metric"] == metric].set_index(["model", "combination"])
        for index, model in enumerate(models):
            keys = [(model, name) for name in combinations if (model, name) in selected.index]
            if not keys:
                continue
            positions = np.array([combinations.index(name) for _, name in keys]) + (index - (len(models) - 1) / 2) * width
            means = selected.loc[keys, "mean"].to_numpy(dtype=float)
            errors = np.nan_to_num(selected.loc[keys, "sd"].to_numpy(dtype=float))
            axis.bar(positions, means, width=width, yerr=errors, color=colors[model], capsize=2, label=model)
        if metric in noise.columns:
            floor = noise[metric].reindex(combinations).to_numpy(dtype=float)
            for position, value in enumerate(floor):
                label = "noise floor (split halves)" if position == 0 else None
                axis.hlines(value, position - 0.45, position + 0.45, colors="black", linestyles="--", linewidth=1.2, label=label)
        axis.set_xticks(np.arange(len(combinations)))
        axis.set_xticklabels(combinations, rotation=20, ha="right", fontsize=8)
        if metric in LOWER_IS_BETTER:
            axis.set_yscale("log")  # errors span orders of magnitude between the noise floor and weak baselines
        else:
            axis.axhline(0.0, color="black", linewidth=0.6)
        direction = "lower is better, log scale" if metric in LOWER_IS_BETTER else "higher is better"
        axis.set_ylabel(f"{metric}\n({direction})", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=min(len(labels), 5), frameon=False, fontsize=8, bbox_to_anchor=(0.5, 1.0))
    figure.suptitle("Held-out combinations: every model beside every baseline (bars: mean over seeds; error bars: sd)", y=1.05)
    figure.tight_layout()
    return figure
