"""Covariates and the transfer task: levels, the split, its baseline, leakage, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState

from perturbedvae.cli import main
from perturbedvae.data.covariates import TransferSplit, covariate_levels, level_data, other_level_shift, transfer_split
from perturbedvae.data.loading import load_dataset
from perturbedvae.data.splits import make_split
from perturbedvae.errors import ConfigError, DataError, SplitError
from perturbedvae.train.cell_holdout import datamodule_without_cells
from perturbedvae.train.config import load_config
from perturbedvae.transfer import BASELINE_NAME, check_transfer_config
from tests.conftest import NORMAN_PATH, make_toy_adata

CONDITIONS = ["control", "G0", "G1", "G2", "G3", "G4", "G5"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def two_lines(n_cells: int = 30) -> ad.AnnData:
    """Two cell lines of the toy screen; line B is simulated from another seed (other base rates)."""
    parts = []
    for seed, line in enumerate(["A", "B"]):
        part = make_toy_adata(CONDITIONS, cells_per_condition=n_cells, n_genes=12, seed=seed)
        part.obs["cell_line"] = line
        part.obs_names = [f"{line}{name}" for name in part.obs_names]
        parts.append(part)
    return ad.concat(parts)


@pytest.fixture
def data():
    return load_dataset(two_lines())


def test_levels_need_an_existing_column(data) -> None:
    assert sorted(set(covariate_levels(data, ["cell_line"]))) == ["A", "B"]
    with pytest.raises(DataError, match="no column 'cell_lines' \\(did you mean 'cell_line'\\?\\)"):
        covariate_levels(data, ["cell_lines"])
    with pytest.raises(DataError, match="needs data.covariate_keys"):
        covariate_levels(data, [])


def test_transfer_split_holds_out_target_cells_of_conditions_measured_elsewhere(data) -> None:
    split = transfer_split(data, ["cell_line"], "B", test_fraction=0.5, seed=2)
    assert len(split.test) == 3 and "control" not in split.test
    assert sorted(split.test + split.target_train) == CONDITIONS[1:]
    levels = covariate_levels(data, ["cell_line"])
    held = split.held_out_cells(data, levels)
    assert set(levels[held]) == {"B"} and set(data.conditions[held]) == set(split.test) and len(held) == 3 * 30
    assert transfer_split(data, ["cell_line"], "B", test_fraction=0.5, seed=2) == split
    with pytest.raises(SplitError, match="target 'b' is no level of cell_line"):
        transfer_split(data, ["cell_line"], "b")


def test_a_transfer_split_file_round_trips(data, tmp_path: Path) -> None:
    split = transfer_split(data, ["cell_line"], "A", seed=1)
    split.save(tmp_path / "s.json")
    assert TransferSplit.load(tmp_path / "s.json") == split
    (tmp_path / "other.json").write_text(json.dumps({"format": "perturbedvae-split"}))
    with pytest.raises(SplitError, match="not a transfer split file"):
        TransferSplit.load(tmp_path / "other.json")


def test_the_other_level_shift_adds_the_effect_elsewhere_to_the_targets_controls(data) -> None:
    levels = covariate_levels(data, ["cell_line"])
    a, b = level_data(data, levels, "A"), level_data(data, levels, "B")
    expected = b.control_mean + a.mean_profiles.loc["G2"].to_numpy() - a.control_mean
    np.testing.assert_allclose(other_level_shift(data, levels, "B", ["G2"])[0], expected, atol=1e-10)
    assert not np.allclose(b.mean_profiles.loc["G2"].to_numpy(), expected, atol=1e-3)  # the lines differ: a real test


def test_held_out_target_cells_neither_train_nor_fit_the_pca(data, tmp_path: Path) -> None:
    config = transfer_config(tmp_path, "representation.n_components=4")
    levels = covariate_levels(data, ["cell_line"])
    held = transfer_split(data, ["cell_line"], "B", 0.5, 1).held_out_cells(data, levels)
    datamodule = datamodule_without_cells(config, data, held, "transfer")
    assert not set(held) & set(datamodule.train_cells) and not set(held) & set(datamodule.held_out_cells)
    changed = data.adata.copy()
    changed.X = np.asarray(changed.X).copy()
    changed.X[held] = 9.0
    other = datamodule_without_cells(config, load_dataset(changed), held, "transfer")
    np.testing.assert_allclose(other.representation.fitted["components"], datamodule.representation.fitted["components"], atol=1e-6)


def transfer_config(tmp_path: Path, *overrides: str):
    path = tmp_path / "toy.h5ad"
    if not path.exists():
        two_lines().write_h5ad(path)
    values = {
        "data": {"path": str(path), "covariate_keys": ["cell_line"], "n_de_genes": 5},
        "split": {"scheme": "transfer", "seed": 1, "params": {"target": "B", "test_fraction": 0.5}},
        "model": {"likelihood": "gaussian", "n_latent": 4, "n_hidden": 16, "n_layers": 1},
        "train": {"epochs": 2, "batch_size": 64, "selection": "held_out_cells", "checkpoint_every": 0},
        "output": {"run_dir": str(tmp_path / "run")},
    }
    config_path = tmp_path / "transfer.yaml"
    config_path.write_text(yaml.safe_dump(values))
    return load_config(config_path, list(overrides))


def test_the_transfer_command_scores_the_model_beside_its_baselines(tmp_path: Path, capsys) -> None:
    transfer_config(tmp_path)
    assert main(["transfer", "--config", str(tmp_path / "transfer.yaml")]) == 0
    run = tmp_path / "run"
    split = json.loads((run / "transfer_split.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"perturbedvae", BASELINE_NAME, "no_change", "train_mean"} <= set(metrics)
    for name in ("perturbedvae", BASELINE_NAME):
        assert set(metrics[name]["per_condition"]) == set(split["test"]) and set(metrics[name]["per_subgroup"]) == {"transfer"}
    assert "| transfer | other_level_shift |" in capsys.readouterr().out
    assert (run / "model" / "config.json").is_file() and (run / "log.jsonl").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["split.scheme=doubles", "data.covariate_keys=null"], "needs split.scheme transfer"),
        (["data.covariate_keys=null"], "needs data.covariate_keys"),
        (["model.composition=mechanism"], "needs model.composition latent_sum"),
        (["train.selection=val_conditions"], "no validation conditions"),
        (["split.params={test_fraction: 0.5}"], "target \\(the covariate level"),
    ],
)
def test_transfer_settings_are_checked(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_transfer_config(transfer_config(tmp_path, *overrides))


def test_covariate_keys_outside_the_transfer_task_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.covariate_keys is read by the transfer task only"):
        transfer_config(tmp_path, "split.scheme=doubles", "split.params={}")


def test_make_split_points_the_transfer_scheme_to_its_command(data) -> None:
    with pytest.raises(SplitError, match="perturbedvae transfer --config"):
        make_split(data, "transfer", target="B")


def test_mcfaline_lines_each_hold_out_three_of_nine_knockdowns() -> None:
    mcfaline = load_dataset(NORMAN_PATH, obs_filter={"dataset": "mcfaline23"})
    for line in ("A172", "T98G", "U87MG"):
        split = transfer_split(mcfaline, ["cell_type"], line, test_fraction=0.34, seed=1)
        assert len(split.test) == 3 and len(split.target_train) == 6


def covariate_head(n_levels: int = 2):
    from perturbedvae.model import PerturbedVAEConfig, PerturbedVAEModule

    torch.manual_seed(0)
    config = PerturbedVAEConfig(n_input=6, n_genes=5, n_perturbations=3, n_latent=4, n_hidden=16, n_layers=1,
                                covariate_inputs=True, n_covariate_levels=n_levels)
    return PerturbedVAEModule(config)


def test_covariate_inputs_reach_the_encoder_and_the_decoder() -> None:
    module = covariate_head().eval()
    assert module.encoder[0].in_features == 6 + 2 and module.decoder[0].in_features == 4 + 2
    h, z = torch.randn(3, 6), torch.randn(3, 4)
    line_a, line_b = torch.tensor([[1.0, 0.0]]).expand(3, -1), torch.tensor([[0.0, 1.0]]).expand(3, -1)
    assert not torch.allclose(module.inference(h, line_a).qz_mean, module.inference(h, line_b).qz_mean)
    assert not torch.allclose(module.generative(z, covariates=line_a).mean, module.generative(z, covariates=line_b).mean)
    with pytest.raises(DataError, match="conditions on covariates .* pass 'covariates'"):
        module.inference(h)
    with pytest.raises(DataError, match="covariates has shape \\(3, 3\\), expected \\[cells, 2\\]"):
        module.generative(z, covariates=torch.zeros(3, 3))


def test_a_head_with_covariate_inputs_saves_and_loads(tmp_path: Path) -> None:
    from perturbedvae.model import PerturbedVAEHead

    module = covariate_head(3)
    PerturbedVAEHead(module.config, module, ["A", "B", "C"], [f"g{index}" for index in range(5)]).save_pretrained(tmp_path / "head")
    loaded = PerturbedVAEHead.from_pretrained(tmp_path / "head").module
    assert loaded.config == module.config and loaded.config.n_covariate_levels == 3
    h, levels = torch.randn(4, 6), torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()
    perturbations = torch.tensor([[1.0, 0.0, 1.0]])
    torch.testing.assert_close(loaded.predict(h, perturbations, covariates=levels), module.predict(h, perturbations, covariates=levels),
                               rtol=0, atol=0)


def test_batches_carry_each_cells_level_one_hot(data, tmp_path: Path) -> None:
    levels = covariate_levels(data, ["cell_line"])
    config = transfer_config(tmp_path, "model.covariate_inputs=true")
    datamodule = datamodule_without_cells(config, data, np.zeros(0, dtype=np.int64), "transfer").with_covariate_levels(levels)
    rows = np.array([0, 1, len(levels) - 1])
    expected = [[1.0, 0.0] if levels[row] == "A" else [0.0, 1.0] for row in rows]
    assert levels[0] == "A" and levels[-1] == "B"
    np.testing.assert_array_equal(datamodule.collate(rows)["covariates"].numpy(), expected)
    np.testing.assert_array_equal(datamodule.control_inputs(rows)["covariates"].numpy(), expected)
    with pytest.raises(DataError, match="one level per cell"):
        datamodule.with_covariate_levels(levels[:-1])


def test_covariate_inputs_outside_the_transfer_task_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.covariate_inputs conditions the head on data.covariate_keys"):
        transfer_config(tmp_path, "split.scheme=doubles", "split.params={}", "data.covariate_keys=null", "model.covariate_inputs=true")
    with pytest.raises(ConfigError, match="covariate_inputs needs composition latent_sum"):
        transfer_config(tmp_path, "model.covariate_inputs=true", "model.composition=mechanism")
