"""Backed data: expression left in the .h5ad and read per batch must serve exactly what memory serves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from accelerate.state import AcceleratorState

from perturbedvae import datasets
from perturbedvae.api.fitting import train_from_config
from perturbedvae.cli import main
from perturbedvae.data.de import compute_de_genes
from perturbedvae.data.embedding_cache import embed_to_cache
from perturbedvae.data.loading import load_dataset
from perturbedvae.data.matrix import BackedRows, log_normalize
from perturbedvae.data.synthetic_h5ad import ScreenSpec, write_synthetic_screen
from perturbedvae.errors import ConfigError, DataError
from perturbedvae.train.config import RepresentationConfig, load_config
from perturbedvae.train.representation import build_representation
from perturbedvae.train.runs import load_run
from tests.conftest import NORMAN_PATH, REPO

SPEC = ScreenSpec(1500, n_genes=120, n_perturbed_genes=6, density=0.15, seed=3)


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    return write_synthetic_screen(tmp_path_factory.mktemp("screen") / "screen.h5ad", SPEC, chunk_cells=256, progress=False)


@pytest.fixture(scope="module")
def in_memory(screen):
    return load_dataset(screen)


@pytest.fixture(scope="module")
def backed(screen):
    return load_dataset(screen, backed=True)


def test_the_synthetic_screen_is_an_anndata_of_sparse_integer_counts(screen: Path) -> None:
    adata = ad.read_h5ad(screen)
    assert adata.shape == (SPEC.n_cells, SPEC.n_genes) and sp.issparse(adata.X)
    assert set(adata.obs["condition"].astype(str)) == set(SPEC.conditions)
    values = adata.X.data
    assert np.all(values >= 1) and np.all(np.mod(values, 1) == 0)
    assert 0.1 < adata.X.nnz / np.prod(adata.shape) < 0.3
    conditions = adata.obs["condition"].astype(str).to_numpy()
    own = adata.X[:, 0].toarray().ravel()  # G00000 is perturbed (switched on) in its own condition
    assert own[conditions == "G00000"].mean() > 3 * own[conditions == "control"].mean()


def test_backed_rows_match_memory_in_any_order(screen: Path) -> None:
    reference = log_normalize(ad.read_h5ad(screen).X)
    rows = BackedRows(screen, normalize=True)
    order = np.random.default_rng(0).permutation(SPEC.n_cells)[:1200]  # > one scattered read of 512 rows
    runs = np.concatenate([np.arange(start, start + 16) for start in (640, 100, 656, 0, 1484)])  # joined, touching, apart
    asked = np.concatenate([order, order[:5], [3, 2, 1], runs])
    assert abs(rows[asked] - reference[asked]).max() == 0
    assert rows[np.zeros(0, dtype=np.int64)].shape == (0, SPEC.n_genes)
    assert abs(rows.raw()[asked] - ad.read_h5ad(screen).X[asked]).max() == 0


def test_backed_data_equals_in_memory_data(in_memory, backed) -> None:
    assert backed.backed and not in_memory.backed and backed.adata.X is None
    assert backed.is_counts and in_memory.is_counts
    assert backed.fingerprint == in_memory.fingerprint
    pd.testing.assert_frame_equal(backed.mean_profiles, in_memory.mean_profiles)
    np.testing.assert_array_equal(backed.counts.row_sums(), in_memory.counts.row_sums())
    for name in ("control", "G00001+G00002"):
        np.testing.assert_array_equal(backed.cell_indices(name), in_memory.cell_indices(name))


def test_backed_de_genes_equal_scanpy_t_test_rankings(in_memory, backed) -> None:
    memory_de, backed_de = compute_de_genes(in_memory), compute_de_genes(backed)
    assert backed_de.conditions == memory_de.conditions
    for name in memory_de.conditions:
        assert set(backed_de.top(name)) == set(memory_de.top(name)), name
        np.testing.assert_array_equal(backed_de.non_dropout[name], memory_de.non_dropout[name])
    with pytest.raises(DataError, match="t-test for backed data"):
        compute_de_genes(backed, method="wilcoxon")


@pytest.mark.parametrize("n_top_genes", [20, 60])
def test_backed_highly_variable_genes_are_scanpys_seurat_v3_genes(screen: Path, n_top_genes: int) -> None:
    memory = load_dataset(screen, n_top_genes=n_top_genes)
    backed = load_dataset(screen, n_top_genes=n_top_genes, backed=True)
    assert backed.genes == memory.genes and len(memory.genes) >= n_top_genes
    assert set(memory.perturbed_genes) <= set(backed.genes)
    assert backed.fingerprint == memory.fingerprint  # normalized over all genes, then subset
    np.testing.assert_array_equal(backed.counts.row_sums(), memory.counts.row_sums())


def test_backed_highly_variable_genes_on_real_counts() -> None:
    """Papalexi 2021 (real UMI counts): the backed two-pass statistic selects scanpy's genes."""
    memory = datasets.load("papalexi2021_lowmoi", n_top_genes=100)
    backed = datasets.load("papalexi2021_lowmoi", n_top_genes=100, backed=True)
    assert backed.genes == memory.genes and 100 <= len(backed.genes) < 299


def test_an_obs_filter_selects_the_same_cells_backed(tmp_path: Path, screen: Path) -> None:
    adata = ad.read_h5ad(screen)
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 3 == 0, "a", "b")
    path = tmp_path / "batched.h5ad"
    adata.write_h5ad(path)
    memory = load_dataset(path, obs_filter={"batch": "a"})
    backed = load_dataset(path, obs_filter={"batch": "a"}, backed=True)
    assert backed.adata.n_obs == memory.adata.n_obs == (adata.n_obs + 2) // 3
    assert backed.fingerprint == memory.fingerprint
    pd.testing.assert_frame_equal(backed.mean_profiles, memory.mean_profiles)


def _unsorted_with_duplicates(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """The same values stored badly: each count >= 2 split into two entries, column order reversed per row."""
    coo = sp.csr_matrix((matrix.data, matrix.indices.astype(np.int64), matrix.indptr), shape=matrix.shape).tocoo()
    split = coo.data >= 2
    rows = np.concatenate([coo.row, coo.row[split]])
    columns = np.concatenate([coo.col, coo.col[split]])
    values = np.concatenate([np.where(split, coo.data - 1, coo.data), np.ones(split.sum(), dtype=coo.data.dtype)])
    order = np.lexsort((-columns, rows))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=matrix.shape[0]))])
    return sp.csr_matrix((values[order], columns[order].astype(np.int64), indptr.astype(np.int64)), shape=matrix.shape)


def test_unsorted_and_duplicated_entries_give_the_same_data_in_both_modes(tmp_path: Path, screen: Path, in_memory) -> None:
    adata = ad.read_h5ad(screen)
    messy = _unsorted_with_duplicates(adata.X)
    assert messy.nnz > adata.X.nnz and not messy.has_canonical_format
    adata.X = messy
    adata.write_h5ad(tmp_path / "messy.h5ad")
    with h5py.File(tmp_path / "messy.h5ad", "r+") as handle:  # int32 indices beside int64 indptr, as anndata reads many files
        indices = handle["X/indices"][:].astype(np.int32)
        del handle["X/indices"]
        handle["X"].create_dataset("indices", data=indices)
    assert ad.read_h5ad(tmp_path / "messy.h5ad").X.indices.dtype == np.int32
    memory, backed = load_dataset(tmp_path / "messy.h5ad"), load_dataset(tmp_path / "messy.h5ad", backed=True)
    assert memory.fingerprint == backed.fingerprint == in_memory.fingerprint
    pd.testing.assert_frame_equal(backed.mean_profiles, in_memory.mean_profiles)


def test_counts_are_recognised_alike_from_every_value(tmp_path: Path) -> None:
    """Integers for the first 100,000 values, then not: neither mode may call it counts."""
    rng = np.random.default_rng(0)
    matrix = rng.poisson(30.0, size=(2000, 100)).astype(np.float32)
    matrix[1000:] += 0.5
    conditions = np.where(np.arange(2000) % 2 == 0, "control", "G1")
    obs = pd.DataFrame({"condition": conditions}, index=[f"c{index}" for index in range(2000)])
    ad.AnnData(matrix, obs=obs, var=pd.DataFrame(index=[f"G{index}" for index in range(100)])).write_h5ad(tmp_path / "x.h5ad")
    memory, backed = load_dataset(tmp_path / "x.h5ad"), load_dataset(tmp_path / "x.h5ad", backed=True)
    assert not memory.is_counts and not backed.is_counts
    np.testing.assert_allclose(backed.mean_profiles.to_numpy(), memory.mean_profiles.to_numpy(), rtol=1e-6)


def test_backed_loading_reads_only_obs_var_and_obsm(tmp_path: Path, screen: Path, monkeypatch) -> None:
    adata = ad.read_h5ad(screen)
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["X_pca"] = np.ones((adata.n_obs, 3), dtype=np.float32)
    adata.write_h5ad(tmp_path / "layers.h5ad")
    read, read_elem = [], ad.io.read_elem

    def spy(element, *args, **kwargs):
        read.append(element.name)
        return read_elem(element, *args, **kwargs)

    monkeypatch.setattr(ad.io, "read_elem", spy)
    monkeypatch.setattr(ad, "read_h5ad", lambda *args, **kwargs: pytest.fail("anndata's reader loads layers"))
    data = load_dataset(tmp_path / "layers.h5ad", backed=True)
    assert sorted(read) == ["/obs", "/obsm", "/var"]
    assert not data.adata.layers and data.adata.obsm["X_pca"].shape == (adata.n_obs, 3)


def test_dense_files_read_backed(tmp_path: Path) -> None:
    adata = ad.read_h5ad(write_synthetic_screen(tmp_path / "sparse.h5ad", ScreenSpec(300, n_genes=40, n_perturbed_genes=3), progress=False))
    adata.X = adata.X.toarray()
    adata.write_h5ad(tmp_path / "dense.h5ad")
    memory, backed = load_dataset(tmp_path / "dense.h5ad"), load_dataset(tmp_path / "dense.h5ad", backed=True)
    assert not backed.expression.is_sparse
    np.testing.assert_allclose(backed.mean_profiles.to_numpy(), memory.mean_profiles.to_numpy(), rtol=1e-6)
    np.testing.assert_array_equal(backed.expression[np.array([7, 2, 2])], memory.expression[np.array([7, 2, 2])])


def test_what_backed_mode_cannot_do_is_refused_with_the_fix(tmp_path: Path, screen: Path, backed) -> None:
    adata = ad.read_h5ad(screen)
    adata.X = adata.X.tocsc()
    adata.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(DataError, match=r"column-major \(CSC\).*tocsr"):
        load_dataset(tmp_path / "csc.h5ad", backed=True)
    with pytest.raises(DataError, match="backed log-normalized data"):
        load_dataset(NORMAN_PATH, backed=True, n_top_genes=50)
    with pytest.raises(DataError, match="pass the .h5ad path"):
        load_dataset(adata, backed=True)
    with pytest.raises(ConfigError, match="data.backed=false"):
        build_representation(RepresentationConfig(kind="encoder", adapter="geneformer-v1"), backed, np.arange(10))
    with pytest.raises(DataError, match="without backed mode"):
        embed_to_cache(backed, encoder=None, cache_dir=tmp_path / "cache")


def test_a_backed_run_trains_exactly_like_an_in_memory_run(tmp_path: Path, screen: Path) -> None:
    def train(backed: bool) -> Path:
        config = load_config(REPO / "configs" / "scale_synthetic.yaml", [
            f"data.path={screen}", f"data.backed={str(backed).lower()}", f"output.run_dir={tmp_path / str(backed)}",
            "train.epochs=2", "train.batch_size=128", "model.n_hidden=32", "model.n_latent=8", "train.n_control_cells=100",
        ])
        run_dir = train_from_config(config)
        AcceleratorState._reset_state(reset_partial_state=True)
        return run_dir

    memory_run, backed_run = train(False), train(True)
    logs = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (memory_run, backed_run)]
    for memory_epoch, backed_epoch in zip(*logs):
        assert backed_epoch["loss"] == pytest.approx(memory_epoch["loss"], rel=1e-5)
        assert backed_epoch["val"]["pearson_delta_de"] == pytest.approx(memory_epoch["val"]["pearson_delta_de"], abs=1e-5)
    run = load_run(backed_run)
    assert run.datamodule.data.backed and run.config.data.backed
    predictions = run.predict(["G00001+G00002"])
    assert np.isfinite(predictions.means.to_numpy()).all()


def test_the_command_line_reads_backed_data_to_the_same_metrics(tmp_path: Path, screen: Path) -> None:
    assert main(["split", str(screen), "--backed", "--scheme", "doubles", "--seed", "1", "--out", str(tmp_path / "split.json")]) == 0
    for mode in ("memory", "backed"):
        flags = ["--backed"] if mode == "backed" else []
        assert main(["baselines", str(screen), *flags, "--split", str(tmp_path / "split.json"), "--out", str(tmp_path / mode)]) == 0
    assert (tmp_path / "backed" / "metrics.json").read_text() == (tmp_path / "memory" / "metrics.json").read_text()


@pytest.mark.slow
def test_the_scale_benchmark_runs_small(tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "scripts" / "bench_scale.py"), "--cells", "2000", "--genes", "150",
               "--perturbed-genes", "5", "--in-memory-up-to", "2000", "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    size = json.loads((tmp_path / "results.json").read_text())["sizes"][0]
    stages = size["stages"]
    assert list(stages) == ["load", "de", "train", "predict", "load_in_memory"]
    assert all(row["peak_rss_mib"] > 50 and row["wall_seconds"] >= row["seconds"] > 0 for row in stages.values())
    assert stages["train"]["n_train_cells"] > 1000 and stages["predict"]["n_conditions"] == 10
    assert 0.05 < size["nnz_fraction"] < 0.2
    assert (tmp_path / "results.md").read_text().count("\n") == 2 + len(stages)
    assert not list(tmp_path.glob("*.h5ad"))  # screens are deleted unless --keep-files


def _small_counts_file(path: Path, counts_layer: bool = False) -> Path:
    """Integer counts peaking at 19 in X, or (`counts_layer`) log-normalized X with the counts in layers['counts']."""
    adata = ad.read_h5ad(write_synthetic_screen(path.with_name("source.h5ad"), ScreenSpec(300, n_genes=40, n_perturbed_genes=3), progress=False))
    adata.X = adata.X.minimum(19)
    if counts_layer:
        adata.layers["counts"] = adata.X.copy()
        adata.X = log_normalize(adata.X)
    adata.write_h5ad(path)
    return path


def test_small_integer_counts_are_counts_in_both_modes(tmp_path: Path) -> None:
    path = _small_counts_file(tmp_path / "shallow.h5ad")
    with pytest.warns(UserWarning, match=r"max 19"):
        memory = load_dataset(path)
    with pytest.warns(UserWarning, match=r"max 19"):
        backed = load_dataset(path, backed=True)
    assert memory.is_counts and backed.is_counts and backed.fingerprint == memory.fingerprint
    np.testing.assert_array_equal(backed.counts.row_sums(), memory.counts.row_sums())
    as_log = load_dataset(path, backed=True, counts=False)
    assert not as_log.is_counts and as_log.fingerprint == load_dataset(path, counts=False).fingerprint


def test_a_counts_layer_is_used_in_memory_and_refused_backed(tmp_path: Path) -> None:
    path = _small_counts_file(tmp_path / "layered.h5ad", counts_layer=True)
    memory = load_dataset(path)
    assert memory.is_counts and memory.counts.row_sums().max() > 0
    with pytest.raises(DataError, match=r"layers\['counts'\], which backed loading does not read.*--log-normalized"):
        load_dataset(path, backed=True)
    backed = load_dataset(path, backed=True, counts=False)
    in_memory = load_dataset(path, counts=False)
    assert not backed.is_counts and not in_memory.is_counts and backed.fingerprint == in_memory.fingerprint == memory.fingerprint
