"""Our `gears` split equals GEARS' own `DataSplitter(split_type='simulation').split_data`, condition for condition.

GEARS is only a test dependency: it runs here as the reference on the same condition strings.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbedvae.data.conditions import ConditionSyntax
from perturbedvae.data.splits import Split, gears_simulation_split, make_split

gears_data_utils = pytest.importorskip("gears.data_utils")

SEEDS = [1, 2, 3, 4, 5]
ROLES = ("train", "val", "test")


def gears_reference(gears_conditions: list[str], seed: int) -> tuple[dict[str, set[str]], dict, dict]:
    """Run GEARS on one cell per condition; returns its roles, test subgroups and val subgroups (GEARS spellings)."""
    obs = pd.DataFrame({"condition": ["ctrl", *gears_conditions]})
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(np.zeros((len(obs), 1), dtype=np.float32), obs=obs)
    splitter = gears_data_utils.DataSplitter(adata, split_type="simulation")
    adata, subgroups = splitter.split_data(seed=seed, train_gene_set_size=0.75, combo_seen2_train_frac=0.75)
    roles = {role: set(adata.obs["condition"][adata.obs["split"] == role]) for role in ROLES}
    return roles, subgroups["test_subgroup"], subgroups["val_subgroup"]


def assert_same_split(ours: Split, gears_conditions: list[str], seed: int) -> None:
    canonical = ConditionSyntax().canonical
    roles, test_subgroups, val_subgroups = gears_reference(gears_conditions, seed)
    for role in ROLES:
        assert set(getattr(ours, role)) == {canonical(name) for name in roles[role]}, role
    for ours_groups, reference in ((ours.test_subgroups, test_subgroups), (ours.val_subgroups, val_subgroups)):
        assert set(ours_groups) == set(reference)
        for label, names in reference.items():
            assert set(ours_groups[label]) == {canonical(name) for name in names}, label


def gears_spelling_of_perturbench(raw: str) -> str:
    """GEARS' spelling of a PerturBench-style condition: singles get `+ctrl`, combinations stay as written."""
    return raw if "+" in raw else f"{raw}+ctrl"


@pytest.mark.parametrize("seed", SEEDS)
def test_norman_subset_matches_gears(norman_data, seed):
    ours = make_split(norman_data, "gears", seed=seed)
    perturbed = [name for name in norman_data.condition_names if name != "control"]
    gears_conditions = [gears_spelling_of_perturbench(norman_data.raw_spelling[name]) for name in perturbed]
    assert any(norman_data.raw_spelling[name] != name for name in perturbed), "the subset should hold B+A spellings"
    assert_same_split(ours, gears_conditions, seed)
    assert ours.data_fingerprint == norman_data.fingerprint


def synthetic_gears_conditions(seed: int, n_genes: int = 40, n_singles: int = 30, n_doubles: int = 60) -> list[str]:
    """Singles spelled `A+ctrl` or `ctrl+A`, doubles in random gene order; ten genes appear only in doubles."""
    rng = np.random.default_rng(seed)
    genes = [f"G{index:02d}" for index in range(n_genes)]
    singles = [f"{gene}+ctrl" if rng.random() < 0.5 else f"ctrl+{gene}" for gene in rng.choice(genes, n_singles, replace=False)]
    pairs: set[frozenset[str]] = set()
    while len(pairs) < n_doubles:
        pairs.add(frozenset(rng.choice(genes, 2, replace=False).tolist()))
    doubles = ["+".join(rng.permutation(sorted(pair)).tolist()) for pair in pairs]
    conditions = singles + doubles
    return [conditions[index] for index in rng.permutation(len(conditions))]


@pytest.mark.parametrize("seed", SEEDS)
def test_synthetic_gears_spellings_match_gears(seed):
    conditions = synthetic_gears_conditions(seed=100 + seed)
    ours = gears_simulation_split(["ctrl", *conditions], seed=seed)
    assert sum(len(names) for names in ours.test_subgroups.values()) == len(ours.test)
    assert_same_split(ours, conditions, seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_synthetic_perturbench_spellings_are_converted_like_gears(seed):
    gears_conditions = synthetic_gears_conditions(seed=200 + seed)
    perturbench = ["control"] + [name.replace("+ctrl", "").replace("ctrl+", "") for name in gears_conditions]
    ours = gears_simulation_split(perturbench, seed=seed)
    assert_same_split(ours, [gears_spelling_of_perturbench(name) for name in perturbench[1:]], seed)


def test_combination_spelling_changes_the_draw_as_in_gears():
    """GEARS sorts combination strings before drawing, so `B+A` and `A+B` can give different splits."""
    conditions = synthetic_gears_conditions(seed=7)
    reversed_combos = [name if "ctrl" in name else "+".join(reversed(name.split("+"))) for name in conditions]
    differs = False
    for seed in SEEDS:
        original = gears_simulation_split(conditions, seed=seed)
        flipped = gears_simulation_split(reversed_combos, seed=seed)
        assert_same_split(flipped, reversed_combos, seed)
        differs |= original.test_subgroups["combo_seen2"] != flipped.test_subgroups["combo_seen2"]
    assert differs


def test_papalexi_measured_targets_match_gears_on_the_restricted_list():
    """`drop_unmeasured` splits like GEARS given only the targets the data measures (16 of 25 are dropped)."""
    from perturbedvae.data.loading import load_dataset
    from tests.conftest import PAPALEXI_PATH

    data = load_dataset(PAPALEXI_PATH, condition_key="target", control_labels=["non-targeting"])
    with pytest.warns(UserWarning, match=r"16 condition\(s\) perturb a gene the data does not measure.*CUL3.*IRF1.*MARCH8"):
        ours = make_split(data, "gears", seed=1, drop_unmeasured=True)
    measured = [name for name in data.condition_names if name != "control" and name in set(data.genes)]
    assert len(measured) == 9 and sorted(ours.params["dropped_conditions"]) == sorted(set(data.condition_names) - {"control", *measured})
    assert_same_split(ours, [f"{name}+ctrl" for name in measured], seed=1)
    assert ours.test_subgroups["unseen_single"] == ours.test and set(ours.test) <= set(data.genes)


@pytest.mark.parametrize("seed", SEEDS)
def test_dropping_unmeasured_genes_matches_gears_on_the_remaining_conditions(seed):
    """Singles and combinations with an unmeasured gene take no part; GEARS' draws run on the rest."""
    from perturbedvae.data.loading import load_dataset
    from tests.conftest import make_toy_adata

    conditions = [name.replace("+ctrl", "").replace("ctrl+", "") for name in synthetic_gears_conditions(seed=300 + seed)]
    measured_genes = [f"G{index:02d}" for index in range(30)]  # G30..G39 are perturbed but not measured
    adata = make_toy_adata(["control", *conditions], cells_per_condition=1, n_genes=30)
    adata.var_names = measured_genes
    data = load_dataset(adata, min_cells=1)
    kept = [name for name in conditions if set(name.split("+")) <= set(measured_genes)]
    assert 0 < len(kept) < len(conditions)
    with pytest.warns(UserWarning, match="take part in no role"):
        ours = make_split(data, "gears", seed=seed, drop_unmeasured=True)
    assert set(ours.params["dropped_conditions"]) == {ConditionSyntax().canonical(name) for name in set(conditions) - set(kept)}
    assert_same_split(ours, [gears_spelling_of_perturbench(name) for name in kept], seed)
