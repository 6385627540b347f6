"""Write a large synthetic CRISPR screen of sparse raw counts to `.h5ad`, one chunk of cells at a time.

The scale benchmark (`scripts/bench_scale.py`) needs files of up to a million cells x 5,000 genes that
could not be built in memory on the machines it measures; this writer never holds more than one chunk.
The data are plain and documented rather than realistic biology: each gene has a detection rate and a
mean count; each perturbed gene (measured, CRISPRa-like) multiplies its own expression and that of 20
random target genes; a double applies both singles' folds. Cells are in random order, as in real files.
The file follows anndata's on-disk format (CSR `X` with data/indices/indptr, obs/var dataframes), so
`anndata.read_h5ad` and our backed loader read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from tqdm.auto import tqdm


@dataclass(frozen=True)
class ScreenSpec:
    """What to simulate.

    Attributes:
        n_cells: Cells in the file.
        n_genes: Measured genes.
        n_perturbed_genes: Genes perturbed alone; as many doubles pair neighbours (gene i + gene i+1).
        density: Mean fraction of non-zero entries before perturbation effects.
        control_fraction: Fraction of control cells; the rest are spread evenly over perturbed conditions.
        n_targets: Genes each perturbation changes besides itself.
        seed: Seeds everything.
    """

    n_cells: int
    n_genes: int = 5000
    n_perturbed_genes: int = 50
    density: float = 0.1
    control_fraction: float = 0.1
    n_targets: int = 20
    seed: int = 0

    @property
    def gene_names(self) -> list[str]:
        return [f"G{index:05d}" for index in range(self.n_genes)]

    @property
    def conditions(self) -> list[str]:
        genes = self.gene_names[: self.n_perturbed_genes]
        doubles = [f"{genes[index]}+{genes[(index + 1) % len(genes)]}" for index in range(len(genes))]
        return ["control", *genes, *doubles]


def write_synthetic_screen(path: str | Path, spec: ScreenSpec, chunk_cells: int = 4096, progress: bool = True) -> Path:
    """Write `spec` to `path` (overwritten) and return it."""
    rng = np.random.default_rng(spec.seed)
    detection, mean_count = _gene_parameters(spec, rng)
    folds = _condition_folds(spec, rng)
    names = spec.conditions
    weights = np.full(len(names), (1 - spec.control_fraction) / (len(names) - 1))
    weights[0] = spec.control_fraction
    codes = rng.choice(len(names), size=spec.n_cells, p=weights)
    path = Path(path)
    with h5py.File(path, "w") as handle:
        handle.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        matrix = handle.create_group("X")
        matrix.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (spec.n_cells, spec.n_genes)})
        data = matrix.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
        indices = matrix.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indptr = np.zeros(spec.n_cells + 1, dtype=np.int64)
        for start in tqdm(range(0, spec.n_cells, chunk_cells), desc="writing cells", unit="chunk", disable=not progress):
            chunk_codes = codes[start : start + chunk_cells]
            fold = folds[chunk_codes]
            rate = 1.0 - (1.0 - detection) ** fold  # a stronger gene is detected more often
            rows, columns = np.nonzero(rng.random(rate.shape, dtype=np.float32) < rate)
            values = 1.0 + rng.poisson(mean_count[columns] * fold[rows, columns]).astype(np.float32)
            offset = data.shape[0]
            data.resize((offset + len(values),))
            indices.resize((offset + len(values),))
            data[offset:] = values
            indices[offset:] = columns.astype(np.int32)
            indptr[start + 1 : start + len(chunk_codes) + 1] = offset + np.cumsum(np.bincount(rows, minlength=len(chunk_codes)))
        matrix.create_dataset("indptr", data=indptr)
        obs = pd.DataFrame(
            {"condition": pd.Categorical.from_codes(codes, names)},
            index=pd.Index([f"cell{index}" for index in range(spec.n_cells)]),
        )
        ad.io.write_elem(handle, "obs", obs)
        ad.io.write_elem(handle, "var", pd.DataFrame(index=pd.Index(spec.gene_names)))
    return path


def _gene_parameters(spec: ScreenSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per gene: detection rate (mean `density`) and mean count above 1 of a detected gene."""
    raw = rng.lognormal(0.0, 1.0, spec.n_genes)
    detection = np.clip(raw / raw.mean() * spec.density, 1e-3, 0.9).astype(np.float32)
    mean_count = rng.lognormal(0.0, 1.0, spec.n_genes).astype(np.float32)
    return detection, mean_count


def _condition_folds(spec: ScreenSpec, rng: np.random.Generator) -> np.ndarray:
    """[n_conditions, n_genes] multiplicative effect of each condition (1 for control)."""
    single = np.ones((spec.n_perturbed_genes, spec.n_genes), dtype=np.float32)
    for gene in range(spec.n_perturbed_genes):
        targets = rng.choice(spec.n_genes, spec.n_targets, replace=False)
        single[gene, targets] = np.exp(rng.normal(0.0, 1.0, spec.n_targets))
        single[gene, gene] = 8.0  # CRISPRa switches its own gene on
    doubles = single * np.roll(single, -1, axis=0)
    return np.concatenate([np.ones((1, spec.n_genes), dtype=np.float32), single, doubles])
