import hashlib
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from perturbedvae.data.conditions import CONTROL
from perturbedvae.data.loading import COUNTS_LAYER, load_dataset, looks_like_counts
from perturbedvae.errors import ConditionError, DataError
from tests.conftest import make_toy_adata


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_real_norman_subset_loads(norman_data):
    assert norman_data.adata.n_obs == 3375
    assert not norman_data.is_counts
    assert len(norman_data.condition_names) == 34
    assert sum("+" in name for name in norman_data.condition_names) == 15
    assert norman_data.mean_profiles.shape == (34, 500)
    np.testing.assert_allclose(
        norman_data.mean_profiles.loc["KLF1"].to_numpy(),
        np.asarray(norman_data.adata[norman_data.conditions == "KLF1"].X.mean(0)).ravel(),
        rtol=1e-5,
    )


def test_real_counts_are_detected_and_normalized(tmp_path):
    from tests.conftest import PAPALEXI_PATH

    before = _sha(PAPALEXI_PATH)
    data = load_dataset(PAPALEXI_PATH, condition_key="target")
    assert data.is_counts
    assert COUNTS_LAYER in data.adata.layers
    totals = np.expm1(data.adata.X[:50].toarray()).sum(1)
    np.testing.assert_allclose(totals, 1e4, rtol=1e-3)
    assert _sha(PAPALEXI_PATH) == before


def test_gears_and_perturbench_conventions_agree():
    gears = make_toy_adata(["ctrl", "G0+ctrl", "ctrl+G1", "G0+G1"])
    bench = make_toy_adata(["control", "G0", "G1", "G1+G0"])
    assert load_dataset(gears).condition_names == load_dataset(bench).condition_names == [CONTROL, "G0", "G0+G1", "G1"]


def test_input_anndata_is_not_modified(toy_adata):
    snapshot = toy_adata.copy()
    load_dataset(toy_adata, n_top_genes=5)
    assert list(toy_adata.obs.columns) == list(snapshot.obs.columns)
    np.testing.assert_array_equal(toy_adata.X, snapshot.X)


def test_missing_condition_column(toy_adata):
    with pytest.raises(DataError, match="condition_key"):
        load_dataset(toy_adata, condition_key="perturbation")


def test_no_control_cells():
    with pytest.raises(DataError, match="no control cells"):
        load_dataset(make_toy_adata(["G0", "G1"]))


def test_custom_control_label():
    data = load_dataset(make_toy_adata(["NT", "G0"]), control_labels=["NT"])
    assert data.condition_names == [CONTROL, "G0"]


def test_empty_condition(toy_adata):
    toy_adata.obs["condition"] = toy_adata.obs["condition"].astype(str)
    toy_adata.obs.iloc[3, 0] = " "
    with pytest.raises(ConditionError, match="empty condition"):
        load_dataset(toy_adata)


def test_missing_condition_value(toy_adata):
    toy_adata.obs["condition"] = toy_adata.obs["condition"].astype(object)
    toy_adata.obs.iloc[3, 0] = None
    with pytest.raises(DataError, match="no value"):
        load_dataset(toy_adata)


def test_malformed_condition_names_cells(toy_adata):
    toy_adata.obs["condition"] = toy_adata.obs["condition"].astype(str)
    toy_adata.obs.iloc[:2, 0] = "G0++G1"
    with pytest.raises(ConditionError, match=r"G0\+\+G1.*2 cells"):
        load_dataset(toy_adata)


def test_small_condition_warns_with_threshold():
    adata = make_toy_adata(cells_per_condition=5)
    with pytest.warns(UserWarning, match="fewer than 10 cells"):
        load_dataset(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(adata, min_cells=5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_rejected(toy_adata, bad):
    toy_adata.X[0, 0] = bad
    with pytest.raises(DataError, match="NaN or infinite"):
        load_dataset(toy_adata)


def test_negative_values_rejected(toy_adata):
    toy_adata.X = toy_adata.X - toy_adata.X.mean(0)
    with pytest.raises(DataError, match="scaled"):
        load_dataset(toy_adata)


def test_duplicated_gene_names(toy_adata):
    names = list(toy_adata.var_names)
    names[1] = names[0]
    toy_adata.var_names = names
    with pytest.raises(DataError, match="var_names_make_unique"):
        load_dataset(toy_adata)


@pytest.mark.parametrize("backed", [False, True])
def test_non_h5ad_and_corrupt_files(tmp_path, backed):
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="h5ad"):
        load_dataset(csv, backed=backed)
    corrupt = tmp_path / "broken.h5ad"
    corrupt.write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError, match="could not be read"):
        load_dataset(corrupt, backed=backed)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing.h5ad", backed=backed)
    assert corrupt.read_bytes() == b"not an hdf5 file"


@pytest.mark.parametrize("backed", [False, True])
def test_an_empty_file_or_a_renamed_csv_says_what_the_file_is(tmp_path, backed):
    empty = tmp_path / "x.h5ad"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"x.h5ad is empty \(0 bytes\)"):
        load_dataset(empty, backed=backed)
    renamed = tmp_path / "table.h5ad"
    renamed.write_text("cell,G0,G1\nc1,1,2\n")
    with pytest.raises(DataError, match=r"table.h5ad .*looks like a text/CSV file, not HDF5 \(first line: 'cell,G0,G1'\)") as error:
        load_dataset(renamed, backed=backed)
    assert "signature" not in str(error.value)


def test_file_on_disk_untouched(tmp_path, toy_adata):
    path = tmp_path / "toy.h5ad"
    toy_adata.write_h5ad(path)
    before = _sha(path)
    load_dataset(path, n_top_genes=5)
    assert _sha(path) == before


def test_counts_detection():
    assert looks_like_counts(sp.csr_matrix(np.array([[0, 3, 40], [1, 0, 2]], dtype=np.float32)))
    assert not looks_like_counts(np.log1p(np.array([[0, 3, 40], [1, 0, 2]], dtype=np.float32)))
    counts = load_dataset(make_toy_adata(counts=True))
    assert counts.is_counts and counts.adata.X.max() < 20


def _shallow_counts() -> ad.AnnData:
    """Integer counts peaking at 19, as a shallowly sequenced screen's do."""
    adata = make_toy_adata(counts=True)
    adata.X = np.minimum(adata.X, 19)
    return adata


def test_integers_with_a_small_maximum_are_counts_and_the_loader_says_so():
    adata = _shallow_counts()
    assert looks_like_counts(adata.X) and looks_like_counts(sp.csr_matrix(np.array([[0, 3, 1], [1, 0, 2]], dtype=np.float32)))
    assert not looks_like_counts(np.zeros((2, 3))) and not looks_like_counts(sp.csr_matrix((2, 3)))
    with pytest.warns(UserWarning, match=r"non-negative integers \(max 19\): read as raw counts; pass counts=False"):
        data = load_dataset(adata)
    assert data.is_counts
    np.testing.assert_array_equal(data.adata.layers[COUNTS_LAYER], adata.X)
    np.testing.assert_allclose(np.expm1(data.adata.X).sum(1), 1e4, rtol=1e-4)


def test_the_counts_override():
    adata = _shallow_counts()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stated choice is not second-guessed
        as_log = load_dataset(adata, counts=False)
        assert load_dataset(adata, counts=True).is_counts
    assert not as_log.is_counts and as_log.counts is None
    np.testing.assert_array_equal(as_log.adata.X, adata.X)
    with pytest.raises(DataError, match=r"counts=True \(CLI: --counts\), but X holds non-integer values \(e.g. [0-9.]+\)"):
        load_dataset(make_toy_adata(), counts=True)


def test_a_counts_layer_beside_log_normalized_x_gives_the_raw_counts():
    raw = make_toy_adata(counts=True)
    adata = make_toy_adata()
    adata.layers[COUNTS_LAYER] = sp.csr_matrix(raw.X.astype(np.int64))
    data = load_dataset(adata)
    assert data.is_counts
    np.testing.assert_array_equal(data.adata.X, adata.X)  # X as given
    np.testing.assert_array_equal(data.counts.row_sums(), raw.X.sum(1))
    assert {"G0", "G1", "G2"} <= set(load_dataset(adata, n_top_genes=5).genes)  # Seurat v3 on the layer
    ignored = load_dataset(adata, counts=False)
    assert not ignored.is_counts and COUNTS_LAYER not in ignored.adata.layers


@pytest.mark.parametrize(("change", "found"), [(0.5, r"non-integer values \(e.g. 0.5\)"), (-2.0, r"negative values \(min -2\)")])
def test_a_counts_layer_that_is_not_counts_is_refused(change, found):
    adata = make_toy_adata()
    layer = make_toy_adata(counts=True).X
    layer[3, 4] = change
    adata.layers[COUNTS_LAYER] = layer
    with pytest.raises(DataError, match=rf"layers\['counts'\] (holds|has) {found}, so it is not raw counts"):
        load_dataset(adata)


def test_hvg_selection_keeps_perturbed_genes():
    data = load_dataset(make_toy_adata(n_genes=60), n_top_genes=5)
    assert {"G0", "G1", "G2"} <= set(data.genes)
    assert data.adata.n_vars < 60


def test_obs_filter_errors(toy_adata):
    with pytest.raises(DataError, match="not in obs"):
        load_dataset(toy_adata, obs_filter={"dataset": "x"})
    toy_adata.obs["dataset"] = "a"
    with pytest.raises(DataError, match="no cell has"):
        load_dataset(toy_adata, obs_filter={"dataset": "b"})


def test_fingerprint_tracks_content(toy_adata):
    first = load_dataset(toy_adata).fingerprint
    assert load_dataset(toy_adata).fingerprint == first
    toy_adata.X[0, 0] += 1
    assert load_dataset(toy_adata).fingerprint != first
