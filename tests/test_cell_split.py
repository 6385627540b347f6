"""The per-cell split: test cells drawn per condition, kept out of training, scored beside two baselines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from perturbedvae.cell_split import held_out_test_cells, run_cell_split, score_cells
from perturbedvae.cli import main
from perturbedvae.data.loading import load_dataset
from perturbedvae.data.splits import make_split
from perturbedvae.errors import ConfigError, SplitError
from tests.conftest import make_toy_adata

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def data():
    return load_dataset(make_toy_adata(cells_per_condition=20, n_genes=12))


def test_test_cells_are_a_seeded_fraction_of_every_perturbed_condition(data) -> None:
    cells = held_out_test_cells(data, 0.25, seed=3)
    for name in data.condition_names:
        assert np.isin(data.cell_indices(name), cells).sum() == (0 if name == "control" else 5)
    np.testing.assert_array_equal(cells, held_out_test_cells(data, 0.25, seed=3))
    assert not np.array_equal(cells, held_out_test_cells(data, 0.25, seed=4))
    for bad, problem in ((0, "must lie in \\(0, 1\\)"), (1, "must lie in \\(0, 1\\)"), (True, "must be a finite number")):
        with pytest.raises(ConfigError, match=f"test_fraction of the cells scheme {problem}"):
            held_out_test_cells(data, bad, seed=3)
    with pytest.raises(SplitError, match="perturbedvae cells --config"):
        make_split(data, "cells", test_fraction=0.2)


def test_the_memorised_baseline_reads_training_cells_only(data) -> None:
    cells = held_out_test_cells(data, 0.25, seed=1)
    summary, _ = score_cells(data, cells, None, n_de_genes=5)
    assert set(summary) == {"training_cells_mean", "no_change"}
    changed = data.adata.copy()
    changed.X = np.asarray(changed.X).copy()
    train = np.setdiff1d(np.arange(changed.n_obs), cells)
    changed.X[train[data.conditions[train] == "G1"]] += 1.0
    after, _ = score_cells(load_dataset(changed), cells, None, n_de_genes=5)
    before_mse = summary["training_cells_mean"]["per_condition"]["G1"]["mse"]
    assert after["training_cells_mean"]["per_condition"]["G1"]["mse"] == pytest.approx(before_mse + 1.0, abs=0.2)
    assert after["no_change"]["per_condition"]["G1"] == summary["no_change"]["per_condition"]["G1"]


def test_the_cells_command_trains_and_scores_every_condition_on_its_test_cells(tmp_path: Path, capsys) -> None:
    path = tmp_path / "toy.h5ad"
    make_toy_adata(cells_per_condition=20, n_genes=12).write_h5ad(path)
    config = {
        "data": {"path": str(path), "n_de_genes": 5},
        "split": {"scheme": "cells", "seed": 1, "params": {"test_fraction": 0.25}},
        "model": {"likelihood": "gaussian", "n_latent": 4, "n_hidden": 16, "n_layers": 1},
        "train": {"epochs": 2, "batch_size": 32, "selection": "last", "checkpoint_every": 0},
        "output": {"run_dir": str(tmp_path / "run")},
    }
    (tmp_path / "cells.yaml").write_text(yaml.safe_dump(config))
    assert main(["cells", "--config", str(tmp_path / "cells.yaml")]) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    perturbed = ["G0", "G0+G1", "G1", "G1+G2", "G2"]
    assert set(metrics) == {"perturbedvae", "training_cells_mean", "no_change"}
    assert sorted(metrics["perturbedvae"]["per_condition"]) == perturbed and set(metrics["perturbedvae"]["per_subgroup"]) == {"held_out_cells"}
    test_cells = json.loads((run / "cell_split.json").read_text())["test_cells"]
    assert len(test_cells) == 5 * 5
    assert metrics["no_change"]["overall"]["pearson_delta"] == 0.0  # predictions start from the reference controls
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    assert "| held_out_cells | training_cells_mean |" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="needs split.scheme cells"):
        run_cell_split(tmp_path / "cells.yaml", ["split.scheme=doubles"])
