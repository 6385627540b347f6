"""Report figures: each plotting function renders a readable, non-trivial PNG from plain arrays."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from perturbedvae.evaluate import plots

RNG = np.random.default_rng(0)
GENES = [f"GENE{i}" for i in range(20)]


def assert_readable_png(path, min_kb: float = 8.0) -> np.ndarray:
    """The file decodes as PNG, is larger than `min_kb` and is not a single colour."""
    assert path.is_file() and path.stat().st_size > min_kb * 1024, f"{path} is missing or tiny"
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels[..., :3].var() > 1e-3, f"{path} is (almost) a single colour"
    return pixels


def test_de_responses_grid(tmp_path):
    observed = {name: pd.Series(RNG.normal(size=20), index=GENES) for name in ("A+B", "A+C", "B+C", "C+D")}
    predicted = {model: {name: values + RNG.normal(scale=0.3, size=20) for name, values in observed.items()} for model in ("perturbedvae", "additive")}
    spread = {"perturbedvae": {name: values.abs() * 0.1 for name, values in observed.items()}}
    figure = plots.plot_de_responses(observed, predicted, spread)
    assert [axis.get_title() for axis in figure.axes[:4]] == list(observed)
    assert figure.axes[0].get_xticklabels()[0].get_text() in GENES  # genes are named on the axis
    assert_readable_png(plots.save_figure(figure, tmp_path / "sub" / "de.png"))


def test_metric_bars_with_and_without_spread(tmp_path):
    rows = [{"subgroup": group, "model": model, "metric": metric, "mean": RNG.uniform(), "sd": np.nan if model == "additive" else 0.05}
            for group in ("combo_seen2", "combo_seen1") for model in ("perturbedvae", "additive", "no_change") for metric in ("pearson_delta_de", "mse_de")]
    figure = plots.plot_metric_bars(pd.DataFrame(rows), ["pearson_delta_de", "mse_de"])
    titles = [axis.get_title() for axis in figure.axes]
    assert "pearson_delta_de\n(higher is better)" in titles and "mse_de\n(lower is better)" in titles
    assert len(figure.axes) == 4
    assert_readable_png(plots.save_figure(figure, tmp_path / "bars.png"))


def test_mask_heatmaps_and_programs(tmp_path):
    masks = {name: pd.DataFrame(RNG.uniform(size=(6, 8)), index=[f"P{i}" for i in range(6)]) for name in ("a", "b")}
    heatmap = plots.plot_mask_heatmaps(masks)
    assert heatmap.axes[0].get_ylabel() == "perturbed gene"
    assert_readable_png(plots.save_figure(heatmap, tmp_path / "masks.png"))
    loadings = pd.DataFrame(RNG.normal(size=(3, 20)), index=[4, 0, 7], columns=GENES)
    programs = plots.plot_programs(loadings, {4: "moved by P1 (+1.20), P3 (-0.40)"}, n_genes=6)
    assert len(programs.axes[0].get_yticklabels()) == 6
    assert "moved by P1" in programs.axes[0].get_title()
    assert_readable_png(plots.save_figure(programs, tmp_path / "programs.png"))


def test_latent_embeddings_curves_and_interactions(tmp_path):
    conditions = np.repeat(["control", "A", "B", "A+B"], 50)
    invariant = RNG.normal(size=(200, 2))
    shifted = invariant + np.repeat(np.eye(4, 2) * 4, 50, axis=0)
    latents = plots.plot_latent_embeddings(invariant, shifted, conditions, "UMAP")
    assert latents.axes[0].get_xlabel() == "UMAP 1"
    assert_readable_png(plots.save_figure(latents, tmp_path / "latents.png"))

    log = pd.DataFrame([{"model": "m", "seed": seed, "epoch": epoch, "loss": 10 / epoch + seed, "val_pearson_delta_de": 1 - 1 / epoch}
                        for seed in (1, 2) for epoch in range(1, 6)])
    curves = plots.plot_training_curves(log)
    assert len(curves.axes[0].lines) == 2 and len(curves.axes[1].lines) == 2
    assert_readable_png(plots.save_figure(curves, tmp_path / "curves.png"))

    table = pd.DataFrame({"model": ["m"] * 3 + ["additive"] * 3, "condition": ["A+B", "A+C", "B+C"] * 2,
                          "observed": [0.5, 1.0, 2.0] * 2, "predicted": [0.4, 1.2, 1.5, 0.0, 0.0, 0.0]})
    interactions = plots.plot_interactions(table, "residual norm")
    assert interactions.axes[0].get_xlabel() == "observed residual norm"
    assert_readable_png(plots.save_figure(interactions, tmp_path / "gi.png"))


def test_png_base64_round_trips(tmp_path):
    path = plots.save_figure(plots.plot_interactions(pd.DataFrame({"model": ["m"] * 2, "condition": ["A+B", "C+D"], "observed": [0.0, 1.0], "predicted": [0.5, 1.0]}), "s"), tmp_path / "x.png")
    assert base64.b64decode(plots.png_base64(path)) == path.read_bytes()


@pytest.mark.parametrize("models", [["perturbedvae", "additive", "linear"], ["a", "b", "no_change"]])
def test_model_colors_are_distinct(models):
    colors = plots.model_colors(models)
    assert set(colors) == set(models) and len(set(colors.values())) == len(models)
