"""The experiment config: YAML sections, dotted overrides, path rules and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from perturbedvae.errors import ConfigError
from perturbedvae.train.config import ExperimentConfig, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    folder = tmp_path / "configs"
    folder.mkdir()
    return write_yaml(folder / "exp.yaml", {"data": {"path": "../data/x.h5ad"}, "model": {"n_latent": 4}, "output": {"run_dir": "runs/a"}})


def test_paths_in_yaml_are_relative_to_the_file_and_run_dir_to_cwd(config_file: Path, tmp_path: Path, monkeypatch) -> None:
    elsewhere = tmp_path / "launch"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(config_file)
    assert config.data.path == str((tmp_path / "data" / "x.h5ad").resolve())
    assert config.output.run_dir == str((elsewhere / "runs" / "a").resolve())


def test_overrides_are_typed_and_their_paths_relative_to_cwd(config_file: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(config_file, ["model.n_latent=16", "train.lr=0.01", "train.early_stopping_patience=null",
                                       "data.control_labels=[ctrl, NT]", "data.path=other.h5ad", "data.synthetic.seed=3",
                                       "data.path=null"])
    assert config.model["n_latent"] == 16 and config.train.lr == 0.01
    assert config.data.control_labels == ["ctrl", "NT"]
    assert config.data.path is None and config.data.synthetic == {"seed": 3}
    config = load_config(config_file, ["data.path=other.h5ad"])
    assert config.data.path == str(tmp_path / "other.h5ad")


def test_model_section_is_completed_with_the_head_defaults(config_file: Path) -> None:
    config = load_config(config_file)
    assert config.model["n_latent"] == 4
    assert config.model["likelihood"] == "gaussian"
    head = config.model_config(n_input=7, n_genes=5, n_perturbations=3)
    assert (head.n_input, head.n_genes, head.n_perturbations, head.n_latent) == (7, 5, 3, 4)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.epochs=three", "train.epochs"),
        ("train.epoch=3", "train.epoch"),
        ("trian.epochs=3", "trian"),
        ("model.n_latnt=3", "model.n_latnt"),
        ("model.n_genes=3", "model.n_genes"),
        ("model.dropout=2", "model.dropout"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("train.lr=0", "train.lr"),
        ("data.control_labels=[ctrl, 3]", "data.control_labels[1]"),
        ("representation.kind=obsm", "representation.obsm_key"),
        ("train.max_grad_norm=true", "train.max_grad_norm"),
    ],
)
def test_bad_values_name_the_key(config_file: Path, override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_config(config_file, [override])


def test_data_needs_exactly_one_source(config_file: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one of data.path"):
        load_config(config_file, ["data.synthetic={seed: 1}"])


def test_malformed_overrides_and_files_are_config_errors(tmp_path: Path, config_file: Path) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["epochs=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips(config_file: Path, tmp_path: Path) -> None:
    config = load_config(config_file, ["train.epochs=2"])
    config.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config
    assert ExperimentConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", ["synthetic_tiny.yaml", "norman_subset.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(REPO / "configs" / name)
    if config.data.path is not None:
        assert Path(config.data.path).is_file()


def test_exponent_notation_is_a_number_in_files_and_overrides(config_file: Path, tmp_path: Path) -> None:
    """PyYAML alone reads `1e-3` as a string; learning rates are written that way."""
    assert load_config(config_file, ["train.lr=1e-3"]).train.lr == pytest.approx(0.001)
    raw = yaml.safe_load(config_file.read_text())
    raw.setdefault("train", {})["lr"] = "LR"
    edited = tmp_path / "exponent.yaml"
    edited.write_text(yaml.safe_dump(raw).replace("LR", "2e-4"))
    assert load_config(edited).train.lr == pytest.approx(2e-4)
