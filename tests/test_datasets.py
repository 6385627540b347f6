import hashlib

import pytest

from perturbedvae import datasets
from perturbedvae.errors import DataError


def test_bundled_dataset_found_through_data_dir(monkeypatch, norman_path):
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(norman_path.parent))
    assert datasets.path("norman2019_subset") == norman_path
    data = datasets.load("norman2019_subset")
    assert data.adata.n_obs == 3375


def test_missing_data_dir_and_unknown_name(monkeypatch, tmp_path):
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError, match=datasets.DATA_DIR_ENV):
        datasets.path("norman2019_subset")
    with pytest.raises(DataError, match="known"):
        datasets.path("nope")


def _register_local(monkeypatch, tmp_path, checksum):
    source = tmp_path / "source.bin"
    source.write_bytes(b"perturbation data")
    entry = datasets.DatasetInfo("local", "local.h5ad", "test", url=source.as_uri(), checksum=checksum)
    monkeypatch.setitem(datasets.REGISTRY, "local", entry)
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return source


def test_download_verified_by_checksum(monkeypatch, tmp_path):
    digest = hashlib.md5(b"perturbation data").hexdigest()
    _register_local(monkeypatch, tmp_path, f"md5:{digest}")
    location = datasets.path("local")
    assert location.read_bytes() == b"perturbation data"
    location.write_bytes(b"tampered")
    with pytest.raises(DataError, match="corrupt or changed"):
        datasets.path("local")


def test_bad_download_is_not_kept(monkeypatch, tmp_path):
    _register_local(monkeypatch, tmp_path, "sha256:" + "0" * 64)
    with pytest.raises(DataError, match="corrupt or changed"):
        datasets.path("local")
    assert not (tmp_path / "cache" / "local.h5ad").exists()


def test_unpublished_checksum_is_pinned_on_first_download(monkeypatch, tmp_path):
    _register_local(monkeypatch, tmp_path, None)
    location = datasets.path("local")
    assert location.with_name("local.h5ad.sha256").exists()
    location.write_bytes(b"changed")
    with pytest.raises(DataError, match="corrupt or changed"):
        datasets.path("local")


def test_no_download_without_permission(monkeypatch, tmp_path):
    _register_local(monkeypatch, tmp_path, None)
    with pytest.raises(DataError, match="download=True"):
        datasets.path("local", download=False)


def test_a_mistyped_name_gets_the_known_names_and_the_closest(capsys, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"unknown dataset 'norman2019_subst' \(did you mean norman2019_subset\?\); "
                                        r"known: norman2019, norman2019_subset, papalexi2021_lowmoi"):
        datasets.info("norman2019_subst")
    from perturbedvae.cli import main

    monkeypatch.chdir(tmp_path)  # the bare word is no file here
    assert main(["split", "papalexi_lowmoi", "--scheme", "doubles", "--out", "s.json"]) == 2
    assert "did you mean papalexi2021_lowmoi?" in capsys.readouterr().err
    assert main(["split", "missing.h5ad", "--scheme", "doubles", "--out", "s.json"]) == 2
    assert "missing.h5ad: no such file" in capsys.readouterr().err
