"""The PCA of an expression representation is fitted on training cells only, whichever way it is asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from perturbedvae.data.loading import load_dataset
from perturbedvae.data.splits import make_split
from perturbedvae.train.config import RepresentationConfig
from perturbedvae.train.datamodule import hold_out_cells
from perturbedvae.train.representation import build_representation

REPO = Path(__file__).resolve().parents[1]


def _with_held_out_cells_changed(data, held_out: list[str]):
    """The same cells, with every cell of the held-out conditions tripled in expression."""
    adata = data.adata.copy()
    rows = np.flatnonzero(np.isin(data.conditions, held_out))
    scale = np.ones(adata.n_obs, dtype=np.float32)
    scale[rows] = 3.0
    adata.X = sp.csr_matrix(sp.diags(scale) @ adata.X, dtype=np.float32)  # sparse, as the file is
    adata.obs["condition"] = adata.obs["perturbedvae_condition"].astype(str)
    return load_dataset(adata)


@pytest.mark.parametrize(
    "config",
    [
        RepresentationConfig(kind="expression", n_components=10),
        RepresentationConfig(kind="encoder", adapter=str(REPO / "adapters" / "expression.yaml")),
    ],
    ids=["n_components", "expression_card"],
)
def test_held_out_cells_do_not_change_the_pca(norman_data, config: RepresentationConfig, tmp_path: Path) -> None:
    split = make_split(norman_data, "doubles", seed=1)
    held_out = [*split.val, *split.test]
    changed = _with_held_out_cells_changed(norman_data, held_out)
    assert not np.allclose(changed.mean_profiles.loc[held_out[0]], norman_data.mean_profiles.loc[held_out[0]])
    config.cache_dir = str(tmp_path / "cache")
    train_cells, _ = hold_out_cells(norman_data, split.train, 0.0, 0)
    before = build_representation(config, norman_data, train_cells)
    after = build_representation(config, changed, train_cells)
    np.testing.assert_allclose(before.fitted["components"], after.fitted["components"], atol=1e-6)
    np.testing.assert_allclose(before.matrix[train_cells], after.matrix[train_cells], atol=1e-5)
