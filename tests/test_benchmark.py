"""`perturbedvae benchmark` end to end on a tiny simulated screen: folds, same conditions, tables, verdicts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from accelerate.state import AcceleratorState

from perturbedvae.benchmark import run_benchmark, selection_sentence
from perturbedvae.cli import main
from perturbedvae.data.splits import Split
from perturbedvae.errors import ConfigError
from perturbedvae.evaluate.baselines import BASELINES
from tests.conftest import REPO

TINY_SCREEN = {"n_genes": 40, "n_latent": 4, "n_perturbations": 6, "n_combinations": 8, "cells_per_condition": 15,
               "n_control_cells": 90, "seed": 0}
OVERRIDES = [f"data.synthetic={json.dumps(TINY_SCREEN)}", "train.epochs=2", "train.n_control_cells=50", "data.n_de_genes=10"]
CONFIG = str(REPO / "configs" / "synthetic_tiny.yaml")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def kfold(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark") / "kfold"
    result = run_benchmark([CONFIG], "kfold", [1, 2], out, OVERRIDES, n_folds=2, n_bootstrap=200)
    AcceleratorState._reset_state(reset_partial_state=True)
    return result


def test_benchmark_writes_tidy_scores_of_every_model_and_baseline(kfold):
    out = kfold.out
    for name in ("benchmark.md", "benchmark.csv", "verdicts.csv", "noise_floor.csv", "benchmark.png", "timing.json"):
        assert (out / name).is_file(), name
    tidy = pd.read_csv(out / "benchmark.csv")
    assert list(tidy.columns) == ["model", "combination", "seed", "metric", "value"]
    assert set(tidy["model"]) == {"perturbedvae", *BASELINES}
    assert set(tidy["seed"]) == {1, 2}
    counts = tidy.groupby(["model", "seed"]).size()
    assert counts.nunique() == 1, "every model and baseline scored on the same combinations and metrics per seed"
    additive = tidy[tidy["model"] == "additive"].pivot_table(index=["combination", "metric"], columns="seed", values="value")
    np.testing.assert_allclose(additive[1], additive[2])  # deterministic baselines repeat per seed
    markdown = (out / "benchmark.md").read_text()
    assert "noise floor" in markdown and "| perturbedvae | saturating_additive | mse_de ↓ |" in markdown
    assert "epochs selected on held-out cells of the training conditions" in markdown  # the benchmark's default


def test_every_fold_trains_model_and_baselines_on_the_same_conditions_and_scores_like_the_run(kfold):
    tidy = kfold.tidy
    held_out = []
    for fold in range(2):
        for seed in (1, 2):
            run = kfold.out / "runs" / "perturbedvae" / f"fold_{fold}" / f"seed_{seed}"
            split = Split.load(run / "split.json")
            assert split.scheme == "kfold" and split.val == [] and not set(split.test) & set(split.train)
            info = json.loads((run / "run_info.json").read_text())
            assert info["selection_metric"] == "held_out_mse"  # never selected on a held-out combination
            own = pd.read_csv(run / "metrics.csv")
            own = own[own["model"] == "perturbedvae"].set_index(["condition", "metric"])["value"]
            scored = tidy[(tidy["model"] == "perturbedvae") & (tidy["seed"] == seed) & tidy["combination"].isin(split.test)]
            scored = scored.set_index(["combination", "metric"])["value"]
            np.testing.assert_allclose(scored.sort_index(), own.reindex(scored.sort_index().index), rtol=1e-9, atol=1e-12)
            held_out += split.test if seed == 1 else []
    assert len(held_out) == len(set(held_out)) == tidy["combination"].nunique()  # each combination held out once


def test_verdicts_pair_every_combination_and_seed(kfold):
    verdicts = kfold.verdicts
    assert set(verdicts["baseline"]) == set(BASELINES)
    n_pairs = 2 * kfold.tidy["combination"].nunique()
    assert (verdicts["n_pairs"] == n_pairs).all()
    assert ((verdicts["wins"] + verdicts["ties"] + verdicts["losses"]) == n_pairs).all()
    assert ((verdicts["ci_low"] <= verdicts["mean_difference"] + 1e-12) & (verdicts["mean_difference"] <= verdicts["ci_high"] + 1e-12)).all()


def test_singles_only_keeps_generated_cells_apart(tmp_path):
    result = run_benchmark([CONFIG], "singles_only", [1], tmp_path / "singles", [*OVERRIDES, "train.selection=last"], n_bootstrap=100)
    models = set(result.tidy["model"])
    assert {"perturbedvae", "perturbedvae[generated]"} <= models
    assert {"nrmse", "r2", "mmd"} <= set(result.tidy["metric"])
    split = Split.load(tmp_path / "singles" / "runs" / "perturbedvae" / "fold_0" / "seed_1" / "split.json")
    assert all("+" not in name for name in split.train)
    generated = result.tidy[(result.tidy["model"] == "perturbedvae[generated]") & (result.tidy["metric"] == "mmd")]["value"]
    means = result.tidy[(result.tidy["model"] == "perturbedvae") & (result.tidy["metric"] == "mmd")]["value"]
    assert not np.allclose(generated.to_numpy(), means.to_numpy())  # generated cells are scored as themselves
    markdown = (tmp_path / "singles" / "benchmark.md").read_text()
    assert "Pseudo-cells" in markdown and "Generated cells" in markdown
    assert "the last epoch kept" in markdown and "held-out cells" not in markdown  # the report says what the user asked


def test_selection_sentence_names_each_models_selection_when_they_differ():
    assert selection_sentence({"a": "last", "b": "last"}) == "the last epoch kept"
    assert selection_sentence({"a": "last", "b": "held_out_cells"}) == (
        "a: the last epoch kept; b: epochs selected on held-out cells of the training conditions"
    )


def test_benchmark_refuses_bad_requests(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown benchmark protocol"):
        run_benchmark([CONFIG], "gears", [1], tmp_path)
    with pytest.raises(ConfigError, match="baseline's name"):
        run_benchmark([f"additive={CONFIG}"], "lodo", [1], tmp_path)
    assert main(["benchmark", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
