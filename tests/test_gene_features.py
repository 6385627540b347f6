"""Gene features for genes never perturbed in training: sources, assembly, and runs that use or refuse them."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from accelerate.state import AcceleratorState

from perturbedvae.api.fitting import train_from_config
from perturbedvae.data.gene_features import (
    assemble,
    coexpression_block,
    embedding_block,
    read_feature_table,
    table_block,
)
from perturbedvae.data.loading import load_dataset
from perturbedvae.data.matrix import InMemoryRows
from perturbedvae.data.splits import make_split
from perturbedvae.errors import ConfigError, SplitError
from perturbedvae.train.config import load_config
from perturbedvae.train.runs import load_run
from tests.conftest import PAPALEXI_PATH, make_toy_adata

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic_tiny.yaml"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def expression(seed: int = 0, n_cells: int = 200, n_genes: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n_cells, 3))
    return (latent @ rng.normal(size=(3, n_genes)) + 0.3 * rng.normal(size=(n_cells, n_genes))).astype(np.float32)


def test_full_rank_coexpression_rows_reproduce_the_training_correlation() -> None:
    matrix = expression()
    genes = [f"g{index}" for index in range(matrix.shape[1])]
    train = np.arange(0, 200, 2)
    block = coexpression_block(InMemoryRows(matrix), genes, train, genes, n_components=len(genes))
    assert block.covered.all()
    np.testing.assert_allclose(block.values @ block.values.T, np.corrcoef(matrix[train].T), atol=1e-4)


def test_held_out_cells_do_not_change_coexpression_features() -> None:
    matrix = expression()
    genes = [f"g{index}" for index in range(matrix.shape[1])]
    train = np.arange(100)
    before = coexpression_block(InMemoryRows(matrix), genes, train, genes[:4], n_components=3)
    changed = matrix.copy()
    changed[100:] = np.random.default_rng(1).normal(size=changed[100:].shape) * 10
    after = coexpression_block(InMemoryRows(changed), genes, train, genes[:4], n_components=3)
    np.testing.assert_array_equal(before.values, after.values)
    moved = coexpression_block(InMemoryRows(changed), genes, np.arange(200), genes[:4], n_components=3)
    assert not np.allclose(moved.values, before.values, atol=1e-3)


def test_unmeasured_and_constant_genes_have_no_coexpression_features() -> None:
    matrix = expression()
    matrix[:, 5] = 2.0
    genes = [f"g{index}" for index in range(matrix.shape[1])]
    block = coexpression_block(InMemoryRows(matrix), genes, np.arange(200), ["g1", "g5", "NOT_MEASURED"], n_components=4)
    assert block.covered.tolist() == [True, False, False]
    assert not block.values[1:].any() and block.values[0].any()


def test_assembly_gives_uncovered_training_genes_identity_columns_and_drops_uncovered_held_out_genes() -> None:
    genes = ["A", "B", "C", "D"]
    block = embedding_block(np.array([[1.0, 2.0], [0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]))
    features = assemble([block], genes, train_genes=["A", "B"])
    assert features.genes == ["A", "B", "C"]  # D: held out, no source covers it
    assert features.columns == [("encoder", 2), ("identity", 1)]
    np.testing.assert_array_equal(features.values, [[1, 2, 0], [0, 0, 1], [3, 4, 0]])
    assert features.sources_of == {"A": ["encoder"], "B": [], "C": ["encoder"]}


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".h5ad", ".parquet"])
def test_a_feature_table_is_read_from_each_format(tmp_path: Path, suffix: str) -> None:
    table = pd.DataFrame({"f1": [1.0, 2.0], "f2": [3.0, 4.0]}, index=pd.Index(["KLF1", "MAPK1"], name="gene"))
    path = tmp_path / f"features{suffix}"
    if suffix == ".csv":
        table.to_csv(path)
    elif suffix == ".tsv":
        table.to_csv(path, sep="\t")
    elif suffix == ".parquet":
        pytest.importorskip("pyarrow")
        table.reset_index().to_parquet(path)
    else:
        ad.AnnData(table.to_numpy(), obs=pd.DataFrame(index=table.index), var=pd.DataFrame(index=table.columns)).write_h5ad(path)
    block = table_block(path, ["MAPK1", "SGK1", "KLF1"])
    assert block.covered.tolist() == [True, False, True]
    np.testing.assert_allclose(block.values, [[2, 4], [0, 0], [1, 3]])


def test_bad_feature_tables_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        read_feature_table(tmp_path / "absent.csv")
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(ConfigError, match="unknown extension '.json'"):
        read_feature_table(tmp_path / "f.json")
    (tmp_path / "text.csv").write_text("gene,f1,f2\nKLF1,1,high\n")
    with pytest.raises(ConfigError, match="f2 are not numeric"):
        read_feature_table(tmp_path / "text.csv")
    (tmp_path / "twice.csv").write_text("gene,f1\nKLF1,1\nKLF1,2\n")
    with pytest.raises(ConfigError, match="KLF1 appear more than once"):
        read_feature_table(tmp_path / "twice.csv")
    (tmp_path / "gap.csv").write_text("gene,f1\nKLF1,1\nMAPK1,\n")
    with pytest.raises(ConfigError, match="no missing or infinite"):
        read_feature_table(tmp_path / "gap.csv")


def test_unseen_singles_split_holds_out_genes_trained_nowhere() -> None:
    data = load_dataset(make_toy_adata(["control", "G0", "G1", "G2", "G3", "G4", "G5", "G0+G1", "G2+G3"], n_genes=6))
    split = make_split(data, "unseen_singles", seed=3, test_fraction=0.5, val_fraction=0.5)
    trained = {gene for name in split.train for gene in name.split("+")}
    assert len([name for name in split.test if "+" not in name]) == 3 and len([name for name in split.val if "+" not in name]) == 2
    singles_held = {name for name in split.test + split.val if "+" not in name}
    assert not trained & singles_held  # a held-out gene is in no training condition, combinations included
    assert set(split.test_subgroups["unseen_single"]) == {name for name in split.test if "+" not in name}
    combos = [name for name in split.test if "+" in name]
    assert all(name in split.test_subgroups[f"combo_seen{sum(g in trained for g in name.split('+'))}"] for name in combos)
    assert make_split(data, "unseen_singles", seed=3, test_fraction=0.5, val_fraction=0.5) == split
    with_unmeasured = load_dataset(make_toy_adata(["control", "G0", "G1", "X9"], n_genes=6))
    assert "X9" not in make_split(with_unmeasured, "unseen_singles", measured_only=True, test_fraction=1.0).test
    with pytest.raises(SplitError, match="at least two measured genes with a single-gene condition"):
        make_split(load_dataset(make_toy_adata(["control", "G0", "X8", "X9"], n_genes=6)), "unseen_singles", measured_only=True)


def test_papalexi_unseen_singles_hold_out_only_measured_targets() -> None:
    data = load_dataset(PAPALEXI_PATH, condition_key="target", control_labels=["non-targeting"])
    split = make_split(data, "unseen_singles", seed=1, test_fraction=0.45, measured_only=True)
    assert len(split.test) == 4 and set(split.test) <= set(data.genes)


def unseen_config(run_dir: Path, *overrides: str):
    return load_config(TINY, [f"output.run_dir={run_dir}", "train.epochs=2", "train.checkpoint_every=0", "split.scheme=unseen_singles",
                              "split.params={test_fraction: 0.3, val_fraction: 0.2}", *overrides])


def test_a_run_predicts_unseen_single_genes_from_coexpression_features(tmp_path: Path) -> None:
    run_dir = train_from_config(unseen_config(tmp_path / "run", "gene_features.sources=[coexpression]", "gene_features.n_components=6"))
    split = json.loads((run_dir / "split.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    groups = {name for name, members in split["test_subgroups"].items() if members}
    assert "unseen_single" in groups and set(metrics["perturbedvae"]["per_subgroup"]) == groups
    assert set(metrics["perturbedvae"]["per_condition"]) == set(split["test"])
    run = load_run(run_dir)
    held_out_genes = {gene for name in split["test"] + split["val"] for gene in name.split("+")}
    assert held_out_genes <= set(run.model.perturbation_genes)
    features = run.model.module.effects.gene_features
    assert features.shape == (len(run.model.perturbation_genes), 6)  # every perturbed gene is measured: no identity columns
    predicted = run.predict(split["test"]).means
    assert np.isfinite(predicted.to_numpy()).all() and predicted.index.tolist() == split["test"]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["unpredictable_test_conditions"] == []
    assert info["gene_features"]["columns"] == {"coexpression": 6}
    assert all(info["gene_features"]["sources_of"][gene] == ["coexpression"] for gene in held_out_genes)


def test_a_run_whose_test_genes_have_no_features_stops_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"test condition\(s\) cannot be predicted \([A-Z\d+, ]+\): [A-Z\d, ]+ are perturbed in no "
                                          r"training condition; set gene_features.sources"):
        train_from_config(unseen_config(tmp_path / "none"))
    assert not (tmp_path / "none" / "log.jsonl").exists()
    table = tmp_path / "features.csv"
    pd.DataFrame({"f": [1.0]}, index=pd.Index(["GENE000"], name="gene")).to_csv(table)
    with pytest.raises(ConfigError, match=r"no gene_features source \(table\) describes GENE\d+"):
        train_from_config(unseen_config(tmp_path / "table", "gene_features.sources=[table]", f"gene_features.table={table}"))
    assert not (tmp_path / "table" / "log.jsonl").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["gene_features.sources=[coexpresion]"], "unknown source 'coexpresion' \\(did you mean coexpression\\?\\)"),
        (["gene_features.sources=[coexpression]", "model.gene_feature_dim=8"], "gene_feature_dim is derived"),
        (["model.gene_feature_dim=8"], "set gene_features.sources"),
        (["gene_features.sources=[table]"], "gene_features.table .* go together"),
        (["gene_features.sources=[encoder]"], "needs representation.kind encoder"),
        (["gene_features.sources=[coexpression]", "model.composition=mechanism"], "need model.composition latent_sum"),
        (["gene_features.sources=[coexpression, coexpression]"], "more than once"),
    ],
)
def test_gene_feature_settings_are_checked_on_load(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        unseen_config(tmp_path / "x", *overrides)
