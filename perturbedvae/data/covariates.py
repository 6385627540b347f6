"""Covariates (cell line, stimulation, batch) and the transfer task across their levels.

A perturbation's effect can differ between cell lines, so the question "what does knocking down MAPK1
do in U87MG cells, when it was only ever knocked down in A172 and T98G?" (PerturBench's transfer task)
needs the covariate beside the condition. A *level* is a cell's covariate values (joined by "/" when
several `covariate_keys` are given). A `TransferSplit` holds out some conditions in one target level; their
cells leave training, while the same conditions in the other levels and the target level's controls and
remaining conditions train. Scores then compare predictions with the held-out cells of the target level,
relative to that level's own controls (`level_data`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from perturbedvae.data.conditions import CONTROL
from perturbedvae.data.loading import PerturbationData
from perturbedvae.errors import DataError, SplitError, close_matches

_FORMAT = "perturbedvae-transfer-split"


def covariate_levels(data: PerturbationData, keys: Sequence[str]) -> np.ndarray:
    """Per cell, its level: the values of the `keys` obs columns, joined by "/".

    Raises:
        DataError: for no keys, or a column obs lacks (with the close matches and the columns there are).
    """
    if not keys:
        raise DataError("the transfer task needs data.covariate_keys, the obs column(s) of the covariate (e.g. [cell_type])")
    obs = data.adata.obs
    for key in keys:
        if key not in obs:
            close = close_matches(key, map(str, obs.columns), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"data.covariate_keys: obs has no column {key!r}{hint}; columns: {', '.join(map(str, obs.columns))}")
        if obs[key].isna().any():
            raise DataError(f"obs[{key!r}] is missing for {int(obs[key].isna().sum())} cells; give every cell a covariate value")
    return obs[list(keys)].astype(str).agg("/".join, axis=1).to_numpy(dtype=object)


def level_data(data: PerturbationData, levels: np.ndarray, level: str) -> PerturbationData:
    """The cells of one level as a dataset of their own: its control mean is the level's control mean."""
    if data.backed:
        raise DataError("the transfer task reads the data in memory; set data.backed false")
    return PerturbationData(data.adata[levels == level].copy(), data.syntax, data.condition_key, data.is_counts,
                            dict(data.raw_spelling), data.source)


@dataclass
class TransferSplit:
    """Conditions held out in one target level of a covariate.

    Attributes:
        covariate_keys: The obs columns that make a level.
        target: The level predictions are made in.
        test: Conditions held out in the target level (their cells there never train).
        target_train: The target level's other perturbed conditions, which train (with its controls).
        seed, test_fraction: How `test` was drawn.
    """

    covariate_keys: list[str]
    target: str
    test: list[str]
    target_train: list[str]
    seed: int
    test_fraction: float

    def held_out_cells(self, data: PerturbationData, levels: np.ndarray) -> np.ndarray:
        """Row numbers of the held-out cells: the test conditions' cells in the target level."""
        return np.flatnonzero((levels == self.target) & np.isin(data.conditions, self.test))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": _FORMAT, **asdict(self)}, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TransferSplit:
        content = json.loads(Path(path).read_text())
        if content.pop("format", None) != _FORMAT:
            raise SplitError(f"{path} is not a transfer split file; make one with transfer_split(...).save(path)")
        return cls(**content)


def transfer_split(data: PerturbationData, keys: Sequence[str], target: str, test_fraction: float = 0.34, seed: int = 1) -> TransferSplit:
    """Hold out a seeded `test_fraction` (rounded half up, at least 1) of the target level's transferable conditions.

    A condition is transferable when the target level has cells of it and at least one other level does too
    (there is an effect to transfer from). Draws use numpy's legacy RandomState over sorted names.

    Raises:
        SplitError: unknown target level (close matches named), a bad fraction, or no transferable condition.
    """
    levels = covariate_levels(data, keys)
    known = sorted(set(levels))
    if target not in known:
        close = close_matches(target, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SplitError(f"transfer target {target!r} is no level of {'/'.join(keys)}{hint}; levels: {', '.join(known)}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction <= 1:
        raise SplitError(f"test_fraction must be a number in (0, 1], got {test_fraction!r}")
    table = pd.crosstab(pd.Series(data.conditions, name="condition"), pd.Series(levels, name="level"))
    in_target = table.index[table[target] > 0]
    elsewhere = table.drop(columns=target).sum(axis=1) > 0
    transferable = sorted(name for name in in_target if name != CONTROL and elsewhere[name])
    if not transferable:
        raise SplitError(f"no condition of level {target!r} is also measured in another level; nothing to transfer")
    if CONTROL not in in_target:
        raise SplitError(f"level {target!r} has no control cells; transfer predictions start from the target's controls")
    n_test = min(len(transferable), max(1, int(test_fraction * len(transferable) + 0.5)))
    test = sorted(np.random.RandomState(seed).choice(transferable, n_test, replace=False).tolist())
    target_train = sorted(set(in_target) - set(test) - {CONTROL})
    return TransferSplit(list(keys), target, test, target_train, int(seed), float(test_fraction))


def other_level_shift(data: PerturbationData, levels: np.ndarray, target: str, conditions: Sequence[str]) -> np.ndarray:
    """[conditions, genes] target control mean + each condition's mean shift from control over the other levels.

    The transfer baseline: the effect measured elsewhere (each level's condition mean minus that level's
    control mean, averaged over the levels that have the condition), applied to the target's controls.
    Reads no cell of the target level except its controls.
    """
    target_control = level_data(data, levels, target).control_mean
    shifts: dict[str, list[np.ndarray]] = {name: [] for name in conditions}
    for level in sorted(set(levels) - {target}):
        part = level_data(data, levels, level)
        for name in conditions:
            if name in part.mean_profiles.index and CONTROL in part.mean_profiles.index:
                shifts[name].append(part.mean_profiles.loc[name].to_numpy() - part.control_mean)
    missing = [name for name, found in shifts.items() if not found]
    if missing:
        raise SplitError(f"{', '.join(missing)}: measured in no level other than {target!r}; the transfer baseline has no shift")
    return np.vstack([target_control + np.mean(shifts[name], axis=0) for name in conditions])
