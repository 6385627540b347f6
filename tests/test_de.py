"""DE genes: ranking, the non-dropout rule, the cache and its failure modes."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbedvae.data import de as de_module
from perturbedvae.data.de import DEGenes, compute_de_genes
from perturbedvae.data.loading import load_dataset
from perturbedvae.errors import CheckpointError, DataError
from tests.conftest import make_toy_adata


@pytest.fixture(scope="module")
def toy_data():
    return load_dataset(make_toy_adata(cells_per_condition=15))


@pytest.fixture(scope="module")
def toy_de(toy_data):
    return compute_de_genes(toy_data)


def test_every_perturbed_condition_ranks_all_genes(toy_data, toy_de):
    assert sorted(toy_de.conditions) == sorted(name for name in toy_data.condition_names if name != "control")
    for order in toy_de.ranked.values():
        assert sorted(order) == list(range(toy_data.adata.n_vars))


@pytest.mark.parametrize("method", ["t-test", "wilcoxon"])
def test_shifted_genes_rank_first(toy_data, method):
    """In the toy data perturbing Gk triples genes k and k+1, so those lead the ranking (in doubles a
    highly expressed gene diluted by library-size normalization competes with them)."""
    de = compute_de_genes(toy_data, method=method)
    assert de.method == method
    assert set(de.top("G0", 2)) == {0, 1}
    assert set(de.top("G2", 2)) == {2, 3}
    assert {0, 1} <= set(de.top("G0+G1", 3))


def test_top_defaults_to_n_top(toy_data):
    de = compute_de_genes(toy_data, n_top=5)
    assert len(de.top("G1")) == 5
    assert len(de.non_dropout["G1"]) == 5
    np.testing.assert_array_equal(de.top("G1", 7)[:5], de.top("G1"))
    with pytest.raises(DataError, match="no DE genes"):
        de.top("control")


def test_non_dropout_skips_genes_switched_off_by_the_perturbation():
    """Gene 0 is silenced by A (zero in A, expressed in control): a dropout, so it leaves the list even
    though it is the most changed; gene 1 is silent everywhere and may stay."""
    rng = np.random.default_rng(0)
    n_cells, n_genes = 12, 6
    control = rng.uniform(1.0, 2.0, size=(n_cells, n_genes))
    perturbed = rng.uniform(1.0, 2.0, size=(n_cells, n_genes))
    control[:, 1] = perturbed[:, 1] = 0.0
    perturbed[:, 0] = 0.0
    perturbed[:, 2] += 3.0
    adata = ad.AnnData(
        np.vstack([control, perturbed]).astype(np.float32),
        obs=pd.DataFrame({"condition": ["control"] * n_cells + ["A"] * n_cells}, index=[f"c{i}" for i in range(2 * n_cells)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
    )
    de = compute_de_genes(load_dataset(adata), n_top=n_genes)
    assert de.ranked["A"][0] == 0
    assert 0 not in de.non_dropout["A"]
    assert 2 in de.non_dropout["A"]
    assert 1 in de.non_dropout["A"]
    np.testing.assert_array_equal(de.non_dropout["A"], [gene for gene in de.ranked["A"] if gene != 0])


def test_data_is_not_modified(toy_data):
    uns_before, obs_before = set(toy_data.adata.uns), list(toy_data.adata.obs.columns)
    compute_de_genes(toy_data)
    assert set(toy_data.adata.uns) == uns_before
    assert list(toy_data.adata.obs.columns) == obs_before


def test_bad_arguments(toy_data):
    with pytest.raises(DataError, match="unknown DE method"):
        compute_de_genes(toy_data, method="logreg")
    with pytest.raises(DataError, match="n_top"):
        compute_de_genes(toy_data, n_top=0)


def test_condition_with_one_cell_is_a_clear_error():
    adata = make_toy_adata(conditions=["control", "G0"], cells_per_condition=5)
    adata = adata[:6].copy()  # 5 control cells, 1 G0 cell
    data = load_dataset(adata, min_cells=1)
    with pytest.raises(DataError, match="at least 2 cells.*G0 \\(1\\)"):
        compute_de_genes(data)


def test_save_load_round_trip(toy_de, tmp_path):
    path = tmp_path / "de.npz"
    toy_de.save(path)
    loaded = DEGenes.load(path)
    assert (loaded.method, loaded.n_top, loaded.fingerprint) == (toy_de.method, toy_de.n_top, toy_de.fingerprint)
    assert loaded.conditions == toy_de.conditions
    for name in toy_de.conditions:
        np.testing.assert_array_equal(loaded.ranked[name], toy_de.ranked[name])
        np.testing.assert_array_equal(loaded.non_dropout[name], toy_de.non_dropout[name])


def test_cache_is_written_then_reused(toy_data, tmp_path, monkeypatch):
    first = compute_de_genes(toy_data, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert [file.name for file in files] == [f"de_{toy_data.fingerprint}_t-test_top20.npz"]

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although a cache exists")

    monkeypatch.setattr(de_module, "_rank_genes", fail)
    second = compute_de_genes(toy_data, cache_dir=tmp_path)
    for name in first.conditions:
        np.testing.assert_array_equal(second.ranked[name], first.ranked[name])


def test_corrupt_cache_raises_instead_of_being_reused(toy_data, tmp_path):
    path = tmp_path / f"de_{toy_data.fingerprint}_t-test_top20.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(CheckpointError, match="not a valid DE gene file.*delete it"):
        compute_de_genes(toy_data, cache_dir=tmp_path)


def test_cache_of_other_data_raises(toy_data, tmp_path):
    other = load_dataset(make_toy_adata(cells_per_condition=15, seed=1))
    compute_de_genes(other, cache_dir=tmp_path)
    (tmp_path / f"de_{other.fingerprint}_t-test_top20.npz").rename(tmp_path / f"de_{toy_data.fingerprint}_t-test_top20.npz")
    with pytest.raises(CheckpointError, match="does not match"):
        compute_de_genes(toy_data, cache_dir=tmp_path)


def test_load_missing_file_raises(tmp_path):
    with pytest.raises(CheckpointError, match="no such DE gene file"):
        DEGenes.load(tmp_path / "absent.npz")


def test_ranking_leaves_torch_threads_as_they_were(norman_data):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compute_de_genes(norman_data)  # scanpy's ranking reset torch to 2 threads on this data (issue 13)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
