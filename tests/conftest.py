"""Shared fixtures: the real data in ../shared and small synthetic AnnData built in memory."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from accelerate.state import AcceleratorState

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PERTURBEDVAE_SHARED", REPO.parent / "shared"))
NORMAN_PATH = SHARED / "data" / "norman2019_subset.h5ad"
PAPALEXI_PATH = SHARED / "data" / "papalexi2021_lowmoi.h5ad"
VOCAB_DIR = SHARED / "vocab"
# Named datasets resolve through the data directory; make that independent of the working directory.
os.environ.setdefault("PERTURBEDVAE_DATA_DIR", str(SHARED / "data"))


@pytest.fixture
def fresh_accelerate_state():
    """Forget Accelerate's process-wide state after a test that built an Accelerator (used via `pytestmark`)."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def norman_path() -> Path:
    return NORMAN_PATH


@pytest.fixture(scope="session")
def norman_data():
    """The Norman 2019 part of the real subset, loaded once per test session (treat as read-only)."""
    from perturbedvae.data.loading import load_dataset

    return load_dataset(NORMAN_PATH, obs_filter={"dataset": "norman19"})


def make_toy_adata(
    conditions: list[str] | None = None,
    cells_per_condition: int = 20,
    n_genes: int = 30,
    counts: bool = False,
    seed: int = 0,
) -> ad.AnnData:
    """Small AnnData with a `condition` column; perturbing gene Gk shifts genes k and k+1."""
    rng = np.random.default_rng(seed)
    conditions = conditions or ["control", "G0", "G1", "G2", "G0+G1", "G1+G2"]
    genes = [f"G{i}" for i in range(n_genes)]
    labels = np.repeat(conditions, cells_per_condition)
    base = rng.gamma(2.0, 1.0, size=n_genes)
    rates = np.tile(base, (len(labels), 1))
    for row, label in enumerate(labels):
        for gene in label.split("+"):
            if gene in genes:
                index = genes.index(gene)
                rates[row, index : index + 2] *= 3.0
    matrix = rng.poisson(rates * 5).astype(np.float32)
    if not counts:
        matrix = np.log1p(matrix / matrix.sum(1, keepdims=True).clip(1) * 1e4).astype(np.float32)
    obs = pd.DataFrame({"condition": labels}, index=[f"cell{i}" for i in range(len(labels))])
    return ad.AnnData(matrix, obs=obs, var=pd.DataFrame(index=genes))


@pytest.fixture
def toy_adata() -> ad.AnnData:
    return make_toy_adata()
