"""Named public datasets: found in a local data directory or cache, downloaded only with a checksum.

Nothing here is fetched at import or test time. Bundled files (the real Norman 2019 subset and the
Papalexi 2021 counts) are looked up in the data directory (`$PERTURBEDVAE_DATA_DIR`, default
`../shared/data`). Full public datasets live in the cache (`$PERTURBEDVAE_CACHE_DIR`, default
`~/.cache/perturbedvae`); where a network exists they are downloaded once, written atomically and
checked against a published checksum (`md5:...` or `sha256:...`) before use. For a file with no published
checksum the SHA-256 is pinned on first download (a `.sha256` file beside it) and a later file that
differs is refused.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from perturbedvae.data.loading import PerturbationData, load_dataset
from perturbedvae.errors import DataError, did_you_mean
from perturbedvae.files import file_digest

DATA_DIR_ENV = "PERTURBEDVAE_DATA_DIR"
CACHE_DIR_ENV = "PERTURBEDVAE_CACHE_DIR"


@dataclass(frozen=True)
class DatasetInfo:
    """Where a named dataset comes from and how to read it."""

    name: str
    filename: str
    description: str
    load_kwargs: Mapping[str, Any] = field(default_factory=dict)
    url: str | None = None
    checksum: str | None = None
    """`algorithm:hexdigest` as published (md5 or sha256)."""

    @property
    def bundled(self) -> bool:
        return self.url is None


REGISTRY: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "norman2019_subset",
            "norman2019_subset.h5ad",
            "Norman et al. 2019 K562 CRISPRa, PerturBench devel subset: control, 18 singles, 15 doubles, 500 genes",
            {"obs_filter": {"dataset": "norman19"}},
        ),
        DatasetInfo(
            "papalexi2021_lowmoi",
            "papalexi2021_lowmoi.h5ad",
            "Papalexi et al. 2021 THP-1 CRISPR knockout, raw UMI counts, 25 targets",
            {"condition_key": "target", "control_labels": ["non-targeting"]},
        ),
        DatasetInfo(
            "norman2019",
            "NormanWeissman2019_filtered.h5ad",
            "Norman et al. 2019 full screen (~111k cells) as curated by scPerturb (Zenodo record 7041849)",
            # scPerturb joins the genes of a combination with "_".
            {"condition_key": "perturbation", "control_labels": ["control"], "delimiter": "_"},
            url="https://zenodo.org/records/10044268/files/NormanWeissman2019_filtered.h5ad",
            checksum="md5:c870e6967d91c017d9da827bab183cd6",
        ),
    )
}


def data_dir() -> Path:
    """Directory of bundled data files: `$PERTURBEDVAE_DATA_DIR`, else `../shared/data`."""
    return Path(os.environ.get(DATA_DIR_ENV, "../shared/data")).expanduser()


def cache_dir() -> Path:
    """Directory of downloaded datasets: `$PERTURBEDVAE_CACHE_DIR`, else `~/.cache/perturbedvae`."""
    return Path(os.environ.get(CACHE_DIR_ENV, "~/.cache/perturbedvae")).expanduser()


def info(name: str) -> DatasetInfo:
    if name not in REGISTRY:
        raise DataError(f"unknown dataset {name!r}{did_you_mean(name, REGISTRY, listing=None)}; known: {', '.join(sorted(REGISTRY))}, or give an .h5ad path")
    return REGISTRY[name]


def path(name: str, download: bool = True) -> Path:
    """Local path of a named dataset, downloading it into the cache if allowed and needed."""
    entry = info(name)
    if entry.bundled:
        location = data_dir() / entry.filename
        if not location.exists():
            raise DataError(
                f"{entry.filename} not found in the data directory {data_dir()}; set {DATA_DIR_ENV} to the folder holding it"
            )
        return location
    location = cache_dir() / entry.filename
    if not location.exists():
        if not download:
            raise DataError(f"{name} is not in the cache ({location}); call with download=True where a network exists")
        _download(entry.url, location, entry.checksum)
    else:
        verify_checksum(location, entry.checksum)
    return location


def names_a_dataset(text: str) -> bool:
    """Whether `text` is read as a dataset name: a registered one, or a bare word (no folder, no extension)
    that is no file, so that a mistyped name is answered with the known names rather than "no such file"."""
    path = Path(text)
    return not path.exists() and (text in REGISTRY or (not path.suffix and path.name == text))


def load(name: str, download: bool = True, **overrides: Any) -> PerturbationData:
    """Load a named dataset with its registered reading options (overridable)."""
    kwargs = {**info(name).load_kwargs, **overrides}
    return load_dataset(path(name, download=download), **kwargs)


def verify_checksum(file: Path, expected: str | None) -> None:
    """Check `file` against `expected` (`algorithm:hex`), or the SHA-256 pinned beside it on first download."""
    pinned = file.with_name(file.name + ".sha256")
    if expected is None and pinned.exists():
        expected = "sha256:" + pinned.read_text().split()[0]
    if expected is None:
        pinned.write_text(f"{file_digest(file)}  {file.name}\n")
        return
    algorithm, _, hexdigest = expected.partition(":")
    if algorithm not in {"md5", "sha256"} or not hexdigest:
        raise DataError(f"checksum {expected!r} must be 'md5:<hex>' or 'sha256:<hex>'")
    actual = file_digest(file, algorithm)
    if actual != hexdigest.lower():
        raise DataError(
            f"{file} has {algorithm} {actual}, expected {hexdigest}: the file is corrupt or changed. Delete it to download again"
        )


def _download(url: str | None, destination: Path, checksum: str | None) -> None:
    """Download to a `.part` file, verify it, and only then move it into place."""
    if url is None:
        raise DataError(f"no download address for {destination.name}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {destination.name}") as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"could not download {url} ({error}); without a network, download it elsewhere and place it at {destination}"
        ) from error
    if checksum is not None:
        try:
            verify_checksum(partial, checksum)
        except DataError:
            partial.unlink(missing_ok=True)
            raise
    partial.replace(destination)
    if checksum is None:
        verify_checksum(destination, None)
