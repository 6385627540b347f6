"""`run_compare` end to end on a tiny simulated screen, its config checks, and the GI scores by hand."""

from __future__ import annotations

import math
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from perturbedvae.comparison import load_compare_config, run_compare
from perturbedvae.data.de import DEGenes
from perturbedvae.data.loading import load_dataset
from perturbedvae.errors import ConfigError
from perturbedvae.evaluate.gi import (
    additivity_residual,
    interaction_summary,
    interaction_table,
    norman_magnitude,
    residual_norm,
)
from perturbedvae.predictions import Predictions
from tests.conftest import REPO
from tests.test_plots import assert_readable_png

FIGURES = ("metric_bars.png", "de_responses.png", "interactions.png", "mask_heatmap.png", "programs_standalone.png",
           "latents_standalone.png", "training_curves.png")
TINY_SCREEN = {"n_genes": 40, "n_latent": 4, "n_perturbations": 6, "n_combinations": 8, "cells_per_condition": 15,
               "n_control_cells": 90, "seed": 0}


def write_compare_config(directory, **compare) -> str:
    settings = {"seeds": [1, 2], "out_dir": str(directory / "report"), "embedding": "pca", "embedding_cells": 200, **compare}
    config = {
        "experiment": str(REPO / "configs" / "synthetic_tiny.yaml"),
        "overrides": {"data.synthetic": TINY_SCREEN, "data.n_de_genes": 10, "train.epochs": 1, "train.checkpoint_every": 0, "train.n_control_cells": 50},
        "variants": {"standalone": {}},
        "compare": settings,
    }
    path = directory / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("compare")
    return run_compare(write_compare_config(directory))


def test_report_files_and_tables(report_dir):
    markdown = (report_dir / "report.md").read_text()
    for section in ("metrics per test subgroup", "Genetic interactions", "What the heads learned", "Training curves",
                    "Time and memory per variant", "Reproduce"):
        assert section in markdown
    assert re.search(r"\| standalone \| -?\d\.\d{3} ± \d\.\d{3} \|", markdown), "mean ± sd over the two seeds"
    for baseline in ("no_change", "train_mean", "additive", "linear"):
        assert f"| {baseline} |" in markdown
    assert "Data fingerprint `" in markdown and "torch " in markdown and "perturbedvae compare --config" in markdown
    linked = re.findall(r"\]\((figures/[^)]+\.png)\)", markdown)
    assert sorted(linked) == sorted(f"figures/{name}" for name in FIGURES)
    html = (report_dir / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(FIGURES) and "figures/" not in html.split("<body>")[1].split("<pre>")[0]


def test_compare_scores_equal_each_runs_own_metrics(report_dir):
    """The report scores a run's predictions exactly as the run scored itself (same DE genes: n_de_genes 10)."""
    metrics = pd.read_csv(report_dir / "metrics.csv")
    for seed in (1, 2):
        own = pd.read_csv(report_dir / "runs" / "standalone" / f"seed_{seed}" / "metrics.csv")
        own = own[own["model"] == "perturbedvae"].set_index(["subgroup", "condition", "metric"])["value"]
        reported = metrics[(metrics["variant"] == "standalone") & (metrics["seed"] == seed)]
        reported = reported.set_index(["subgroup", "condition", "metric"])["value"]
        for metric in ("mse_de", "pearson_delta_de", "mse", "pearson_delta"):
            np.testing.assert_allclose(reported.xs(metric, level="metric").sort_index(), own.xs(metric, level="metric").sort_index(), rtol=1e-9, atol=1e-12)


def test_metrics_csv_is_tidy_over_variants_baselines_and_seeds(report_dir):
    metrics = pd.read_csv(report_dir / "metrics.csv")
    assert list(metrics.columns) == ["variant", "seed", "subgroup", "condition", "metric", "value"]
    assert set(metrics["variant"]) == {"standalone", "no_change", "train_mean", "additive", "linear", "dominance", "saturating_additive"}
    assert set(metrics["seed"]) == {1, 2}
    assert {"pearson_delta_de", "mse_de", "frac_opposite_direction_de", "nrmse", "rank"} <= set(metrics["metric"])
    per_run = metrics.groupby(["variant", "seed", "metric"]).size()
    assert per_run.nunique() == 1, "every variant and seed scores the same conditions"
    baseline = metrics[metrics["variant"] == "additive"].pivot_table(index=["condition", "metric"], columns="seed", values="value")
    np.testing.assert_allclose(baseline[1], baseline[2])  # same split for every seed: baselines repeat exactly
    interactions = pd.read_csv(report_dir / "interactions.csv")
    additive_residuals = interactions.loc[(interactions["model"] == "additive") & (interactions["score"] == "residual_norm"), "predicted"]
    np.testing.assert_allclose(additive_residuals, 0.0, atol=1e-9)  # additive has no interaction, up to rounding


@pytest.mark.parametrize("name", FIGURES)
def test_figures_are_non_trivial(report_dir, name):
    assert_readable_png(report_dir / "figures" / name)


def test_existing_report_needs_overwrite(report_dir, tmp_path):
    config = write_compare_config(tmp_path, out_dir=str(report_dir))
    with pytest.raises(ConfigError, match="compare.overwrite=true"):
        run_compare(config)


def test_config_errors_name_the_fix(tmp_path):
    config = write_compare_config(tmp_path)
    with pytest.raises(ConfigError, match="did you mean seeds"):
        load_compare_config(config, ["compare.sedes=[1]"])
    with pytest.raises(ConfigError, match="compare.baselines: unknown gears"):
        load_compare_config(config, ["compare.baselines=[gears]"])
    with pytest.raises(ConfigError, match="distinct"):
        load_compare_config(config, ["compare.seeds=[1, 1]"])
    raw = yaml.safe_load(open(config))
    raw["variants"]["wide"] = {"model.n_latnt": 4}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="variant 'wide'.*n_latent"):
        load_compare_config(tmp_path / "bad.yaml")


def test_overrides_split_between_compare_and_experiment(tmp_path):
    plan = load_compare_config(write_compare_config(tmp_path), ["compare.seeds=[4]", "train.lr=0.01"])
    assert plan.settings.seeds == [4]
    config = plan.experiment_config("standalone", 4)
    assert config.train.lr == 0.01 and config.train.seed == 4 and config.train.epochs == 1
    assert config.output.run_dir.endswith("runs/standalone/seed_4")


# Genetic interactions, by hand. Control 1 everywhere; A raises gene 0, B gene 1; the double A+B also
# raises gene 2 by 0.5, which the sum of its singles cannot explain.
CONTROL = np.array([1.0, 1.0, 1.0, 1.0])
MEANS = {"control": CONTROL, "A": CONTROL + [1, 0, 0, 0], "B": CONTROL + [0, 1, 0, 0], "A+B": CONTROL + [1, 1, 0.5, 0]}


@pytest.fixture
def toy_gi_data():
    spread = np.tile([[0.1], [-0.1]], (6, 4))  # 12 cells per condition whose mean is exactly the profile
    blocks = [profile + spread for profile in MEANS.values()]
    obs = pd.DataFrame({"condition": np.repeat(list(MEANS), 12)})
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(np.vstack(blocks).astype(np.float32), obs=obs, var=pd.DataFrame(index=["g0", "g1", "g2", "g3"]))
    return load_dataset(adata)


def all_genes_de(names) -> DEGenes:
    ranked = {name: np.arange(4) for name in names}
    return DEGenes("t-test", 4, ranked, ranked)


def test_gi_scores_by_hand():
    np.testing.assert_allclose(additivity_residual([1, 1, 0.5], [1, 0, 0], [0, 1, 0]), [0, 0, 0.5])
    np.testing.assert_allclose(residual_norm([[3.0, 4.0], [0.0, 0.0]]), [5.0, 0.0])
    assert norman_magnitude([1, 1, 0.5, 0], [1, 0, 0, 0], [0, 1, 0, 0]) == pytest.approx(math.sqrt(2))
    assert norman_magnitude([2, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]) == pytest.approx(math.sqrt(5))  # synergy on A


def test_interaction_table_on_toy_data(toy_gi_data):
    predicted = pd.DataFrame([CONTROL + [1, 1, 0, 0.2]], index=["A+B"], columns=toy_gi_data.genes)
    truth = pd.DataFrame([MEANS["A+B"]], index=["A+B"], columns=toy_gi_data.genes)
    table = interaction_table(toy_gi_data, {"model": Predictions(predicted), "oracle": Predictions(truth)}, ["A+B", "A"], all_genes_de(["A+B"]))
    scores = table.set_index(["model", "score"])
    assert scores.loc[("model", "residual_norm"), "observed"] == pytest.approx(0.5)
    assert scores.loc[("model", "residual_norm"), "predicted"] == pytest.approx(0.2)
    expected_r = np.corrcoef([0, 0, 0, 0.2], [0, 0, 0.5, 0])[0, 1]
    assert scores.loc[("model", "residual_pearson"), "predicted"] == pytest.approx(expected_r)
    assert scores.loc[("oracle", "residual_pearson"), "predicted"] == pytest.approx(1.0)
    assert scores.loc[("oracle", "norman_magnitude"), "predicted"] == pytest.approx(math.sqrt(2))
    assert set(table["condition"]) == {"A+B"}  # the single is not a double


def test_interaction_summary_correlates_over_doubles():
    rows = []
    for index, observed in enumerate([0.1, 0.5, 0.9, 1.4]):
        for model, predicted in (("tracks", 2 * observed + 1), ("flat", 0.0)):
            rows += [{"model": model, "condition": f"D{index}", "score": "residual_norm", "observed": observed, "predicted": predicted},
                     {"model": model, "condition": f"D{index}", "score": "norman_magnitude", "observed": observed, "predicted": -observed},
                     {"model": model, "condition": f"D{index}", "score": "residual_pearson", "observed": 1.0, "predicted": 0.5}]
    summary = interaction_summary(pd.DataFrame(rows)).set_index("model")
    assert summary.loc["tracks", "residual_norm_pearson"] == pytest.approx(1.0)
    assert summary.loc["tracks", "norman_magnitude_pearson"] == pytest.approx(-1.0)
    assert math.isnan(summary.loc["flat", "residual_norm_pearson"])
    assert summary.loc["flat", "mean_residual_pearson"] == pytest.approx(0.5) and summary.loc["flat", "n_doubles"] == 4


def test_cli_compare_reports_bad_config_in_one_line(tmp_path, capsys):
    from perturbedvae.cli import main

    assert main(["compare", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "compare config" in capsys.readouterr().err


def test_plan_reads_every_experiment_once(tmp_path):
    """A comparison keeps its settings when the base config is edited while it runs."""
    experiment = tmp_path / "base.yaml"
    experiment.write_text((REPO / "configs" / "synthetic_tiny.yaml").read_text())
    config = yaml.safe_load(open(write_compare_config(tmp_path)))
    config["experiment"] = str(experiment)
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(config))
    plan = load_compare_config(tmp_path / "compare.yaml")
    experiment.write_text(experiment.read_text().replace("lr: 0.003", "lr: 0.5"))
    assert plan.experiment_config("standalone", 2).train.lr == 0.003
