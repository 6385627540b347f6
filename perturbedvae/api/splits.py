"""Splits of conditions into train / val / test, by name, with defaults that work on the Norman subset.

    split = pv.splits.doubles(data, seed=1)   # 2 of the Norman subset's 5 measurable doubles held out
    split = pv.splits.gears(data, seed=1)     # GEARS' simulation split, identical to GEARS' own
    split = pv.splits.custom(data, "split")   # an obs column of train/val/test labels
    split.save("split.json"); split = pv.splits.load("split.json")

Each is `perturbedvae.data.splits.make_split` with the scheme's parameters spelled out.
"""

from __future__ import annotations

from pathlib import Path

from perturbedvae.data.loading import PerturbationData
from perturbedvae.data.splits import Split, make_split


def doubles(data: PerturbationData, seed: int = 1, test_fraction: float = 0.4, val_fraction: float = 0.34,
            unseen_combos: str = "train") -> Split:
    """Hold out combinations whose every gene was also perturbed alone (`combo_seen2`).

    The defaults are those of `configs/norman_subset.yaml`: on the Norman subset 2 of the 5 doubles with
    both singles measured are tested and 1 validates; doubles with an unmeasured single train the model
    (`unseen_combos="test"` tests them instead, as `combo_seen1`/`combo_seen0`, which only the baselines
    and heads with gene features can predict).
    """
    return make_split(data, "doubles", seed=seed, test_fraction=test_fraction, val_fraction=val_fraction,
                      unseen_combos=unseen_combos)


def gears(data: PerturbationData, seed: int = 1, train_gene_set_size: float = 0.75,
          combo_seen2_train_frac: float = 0.75) -> Split:
    """GEARS' simulation split (`unseen_single`, `combo_seen0/1/2` test subgroups), as GEARS makes it."""
    return make_split(data, "gears", seed=seed, train_gene_set_size=train_gene_set_size,
                      combo_seen2_train_frac=combo_seen2_train_frac)


def custom(data: PerturbationData, column: str) -> Split:
    """The user's own split from an obs column of `train`/`val`/`test` labels (control always trains)."""
    return make_split(data, "custom", column=column)


def lodo(data: PerturbationData, fold: int) -> Split:
    """Leave one double out: fold i tests the i-th double whose singles are all measured."""
    return make_split(data, "lodo", fold=fold)


def singles_only(data: PerturbationData) -> Split:
    """Control and singles train; the doubles whose singles are all measured are tested."""
    return make_split(data, "singles_only")


def load(path: str | Path) -> Split:
    """A split saved with `split.save(path)` (or `perturbedvae split ... --out`)."""
    return Split.load(path)
