"""The head trained through `train_from_config` recovers simulated sparse mechanism shifts above chance.

Easy setting: 50 perturbations, each moving exactly one of 3 true latent dimensions by a large shift,
and a head with 3 latent dimensions. With 50 perturbations the MCC of unrelated estimates is low (the
report's `mcc_chance`), so a clear margin over it means the dimensions were recovered, not matched by luck.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from perturbedvae.data.synthetic import simulated_truth
from perturbedvae.errors import ConfigError
from perturbedvae.train.config import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("identifiability_script", REPO / "scripts" / "identifiability.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _easy_config(run_dir: Path) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "data": {
            "synthetic": {
                "n_genes": 60, "n_latent": 3, "n_perturbations": 50, "n_combinations": 4,
                "cells_per_condition": 16, "n_control_cells": 200, "mask_prob": 0.0,
                "effect_scale": 3.0, "decoder_hidden": 32, "seed": 0,
            },
            "n_de_genes": 10,
        },
        "split": {"scheme": "doubles", "seed": 1, "params": {"test_fraction": 0.25, "val_fraction": 0.0}},
        "representation": {"kind": "expression", "n_components": 10},
        "model": {
            "likelihood": "nb", "n_latent": 3, "n_hidden": 32, "n_layers": 1, "causal_layer": False,
            "pairwise_interaction": False, "mask_prior_prob": 0.34, "dropout": 0.0,
        },
        "train": {"epochs": 12, "batch_size": 64, "lr": 0.01, "kl_warmup_epochs": 2, "sparsity_warmup_epochs": 2,
                  "seed": 0, "n_control_cells": 100},
        "output": {"run_dir": str(run_dir)},
    })


@pytest.mark.slow
def test_head_recovers_simulated_shifts_clearly_above_chance(tmp_path):
    torch.set_num_threads(1)
    report = _script().recovery_report(_easy_config(tmp_path / "run"))
    assert report["n_perturbations"] == 50
    assert report["mcc"] > report["mcc_chance"] + 0.3, report
    assert report["mcc"] > 0.6, report


def test_recovery_needs_simulated_data(tmp_path):
    config = _easy_config(tmp_path / "run")
    config.data.synthetic, config.data.path = None, str(tmp_path / "real.h5ad")
    with pytest.raises(ConfigError, match="data.synthetic"):
        _script().recovery_report(config)


def _ceiling_script():
    spec = importlib.util.spec_from_file_location("identifiability_ceiling", REPO / "scripts" / "identifiability_ceiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ceiling_oracle_recovers_masks_with_the_true_decoder_and_scores_a_harsh_penalty_lower():
    torch.set_num_threads(1)
    ceiling = _ceiling_script()
    config = ceiling.simulation_config(REPO / "configs" / "synthetic_identifiability.yaml", [
        "n_latent=3", "n_perturbations=10", "n_genes=60", "n_combinations=2", "mask_prob=0.5", "seed=1",
    ])
    assert ceiling.supports(3).sum(dim=1).tolist() == [1, 1, 1, 2, 2, 2, 3]
    report = ceiling.ceiling_report(config, penalties=(5.0, 1e6))
    known = report["known_state"]
    assert known["5.0"]["mask_f1"] > 0.9, known
    # A penalty no fit can pay keeps one dimension per single: 10 entries open, hits + false alarms.
    n_true = int((ceiling.simulated_truth(config).masks > 0).sum())
    harsh = known["1000000.0"]
    assert n_true > 10 and (n_true - harsh["missed"]) + harsh["false"] == 10, (n_true, harsh)
    assert set(report) == {"known_state", "mean_profile"}


@pytest.mark.parametrize(("override", "message"), [
    ("n_cells=3", "SimulationConfig field"), ("n_latent=two", "not a value of n_latent"), ("n_latent=0", "n_latent"),
])
def test_the_ceiling_refuses_a_bad_simulation_field(override, message):
    with pytest.raises(SystemExit, match=message):
        _ceiling_script().simulation_config(REPO / "configs" / "synthetic_identifiability.yaml", [override])


def test_the_ceiling_refuses_a_missing_config_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        _ceiling_script().simulation_config(tmp_path / "absent.yaml", [])


def _departures_script(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # it imports the ceiling script's config reader, as run from scripts/
    spec = importlib.util.spec_from_file_location("graph_departures", REPO / "scripts" / "graph_departures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_graph_departures_split_non_additivity_into_the_graph_and_the_decoder(monkeypatch):
    """Decoding u_A + u_B through the true decoder is exact where the graph is silent; additive is not (curvature)."""
    script = _departures_script(monkeypatch)
    config = script.simulation_config(REPO / "configs" / "synthetic_graph.yaml", ["n_perturbations=12", "n_combinations=20", "edge_prob=0.6"])
    rows = script.departures(simulated_truth(config), n_draws=500)
    result = script.summary(rows)
    assert 0 < result["graph_acts_share"] < 1
    assert result["latent_additive_mse_graph_silent"] < 1e-12 < result["latent_additive_mse_graph_acts"]
    assert result["additive_mse_graph_silent"] > 1e-3
    no_graph = script.simulation_config(REPO / "configs" / "synthetic_graph.yaml", ["n_perturbations=12", "n_combinations=20", "edge_prob=0.0"])
    assert script.summary(script.departures(simulated_truth(no_graph), n_draws=500))["graph_acts_share"] == 0
