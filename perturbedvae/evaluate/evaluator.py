"""One evaluator that scores any `Predictions` against the observed data, per condition and per subgroup.

The evaluator never knows how a prediction was made: models and baselines hand it the same format and get
the same table back, so a report can put them side by side (`evaluate_named`).

Metrics per condition (see `metrics.py` for formulas):
- GEARS: `mse`, `mse_de`, `pearson`, `pearson_de`, `pearson_delta`, `pearson_delta_de` (top-N DE genes)
  and `frac_opposite_direction_de` (non-dropout top-N DE genes).
- `r2`: discrepancy-VAE's clipped R² of the mean profile; `rank`: PerturBench's rank among the evaluated
  conditions (0 best, ~0.5 random).
- On cells: `nrmse` and `mmd` (discrepancy-VAE, averaged over batches of 32 paired cells) and
  `energy_distance`, on a fixed seeded subsample of at most `max_cells` cells per side.

Cells of a prediction that has only means: pseudo-cells = the subsampled observed control cells
+ (predicted mean − observed control mean). They carry the control's cell-to-cell variation around the
predicted mean, which is what a mean-shift model implies; they are not clipped at zero, so their mean is
exactly the predicted mean. A no-change prediction therefore gets the distance between control and
perturbed cells.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from perturbedvae.data.conditions import CONTROL
from perturbedvae.data.de import DEGenes
from perturbedvae.data.loading import PerturbationData
from perturbedvae.errors import DataError
from perturbedvae.evaluate import metrics
from perturbedvae.predictions import PREDICTION_CONDITION_KEY, Predictions

PROFILE_METRICS: tuple[str, ...] = (
    "mse",
    "mse_de",
    "pearson",
    "pearson_de",
    "pearson_delta",
    "pearson_delta_de",
    "frac_opposite_direction_de",
    "r2",
    "rank",
)
CELL_METRICS: tuple[str, ...] = ("nrmse", "mmd", "energy_distance")
METRICS: tuple[str, ...] = PROFILE_METRICS + CELL_METRICS
SUBGROUP_COLUMN = "subgroup"


@dataclass
class EvaluationResult:
    """Scores of one prediction set.

    Attributes:
        per_condition: One row per (subgroup, condition), index condition, columns METRICS + 'subgroup'.
        per_subgroup: Mean of each metric over the subgroup's conditions, plus 'n_conditions'.
        overall: Mean of each metric over all evaluated conditions (each counted once).
    """

    per_condition: pd.DataFrame
    per_subgroup: pd.DataFrame
    overall: pd.Series

    def to_dict(self) -> dict:
        """JSON-able nested dict: overall, per_subgroup and per_condition (NaN becomes None)."""
        per_condition: dict[str, dict] = {}
        for condition, row in self.per_condition.iterrows():
            entry = per_condition.setdefault(str(condition), {"subgroups": []})
            entry["subgroups"].append(row[SUBGROUP_COLUMN])
            entry.update({metric: _json_number(row[metric]) for metric in METRICS})
        return {
            "overall": {metric: _json_number(value) for metric, value in self.overall.items()},
            "per_subgroup": {
                str(name): {column: _json_number(self.per_subgroup.at[name, column]) for column in self.per_subgroup}
                for name in self.per_subgroup.index
            },
            "per_condition": per_condition,
        }


def _json_number(value: object) -> float | int | None:
    if isinstance(value, (int, np.integer)):
        return int(value)
    number = float(value)
    return None if math.isnan(number) else number


class Evaluator:
    """Scores predictions of the conditions in `groups` against the observed data."""

    def __init__(
        self,
        data: PerturbationData,
        de: DEGenes,
        groups: Mapping[str, Sequence[str]],
        *,
        max_cells: int = 200,
        batch_size: int = metrics.CELL_BATCH_SIZE,
        seed: int = 0,
    ) -> None:
        """
        Args:
            data: The observed dataset.
            de: DE genes of `data` (from `compute_de_genes`).
            groups: Subgroup name -> canonical conditions, e.g. a split's test subgroups. A condition may
                appear in several subgroups; it is scored once.
            max_cells: Cells per side for the cell metrics (a fixed, seeded subsample keeps them fast).
            batch_size: Batch size of the batched cell metrics.
            seed: Seed of the subsamples; each condition's subsample depends only on it and its name.

        Raises:
            DataError: empty groups, control or unknown conditions, or DE genes of other data.
        """
        if de.fingerprint is not None and de.fingerprint != data.fingerprint:
            raise DataError("the DE genes were computed on other data; recompute them with compute_de_genes(data)")
        self.data, self.de, self.max_cells, self.batch_size, self.seed = data, de, max_cells, batch_size, seed
        self.memberships = [(str(name), str(condition)) for name, conditions in groups.items() for condition in conditions]
        self.conditions = list(dict.fromkeys(condition for _, condition in self.memberships))
        if not self.conditions:
            raise DataError("no condition to evaluate: every subgroup is empty")
        if CONTROL in self.conditions:
            raise DataError("control is not a perturbation and cannot be evaluated; remove it from the subgroups")
        unknown = sorted(set(self.conditions) - set(data.condition_names))
        if unknown:
            raise DataError(
                f"{len(unknown)} evaluated condition(s) have no cells in the data: {', '.join(unknown[:10])}. "
                "Use canonical names (genes sorted, joined by '+') of conditions present in the data"
            )
        self._observed = data.mean_profiles.loc[self.conditions].to_numpy()
        self._control = data.control_mean
        n_genes = len(data.genes)
        self._de_mask = metrics.gene_mask([de.top(condition) for condition in self.conditions], n_genes)
        self._non_dropout_mask = metrics.gene_mask([de.non_dropout[condition] for condition in self.conditions], n_genes)

    def evaluate(self, predictions: Predictions) -> EvaluationResult:
        """Score `predictions`; conditions it has beyond the evaluated ones are ignored.

        Raises:
            DataError: predictions missing evaluated conditions (listed) or with other genes.
        """
        predictions = predictions.aligned(self.data.genes)
        _check_has_conditions(predictions.conditions, self.conditions, "predicted means")
        if predictions.cells is not None:
            _check_has_conditions(
                set(predictions.cells.obs[PREDICTION_CONDITION_KEY].astype(str)), self.conditions, "predicted cells"
            )
        predicted = predictions.means.loc[self.conditions].to_numpy(dtype=np.float64)
        scores = pd.DataFrame(self._profile_scores(predicted), index=self.conditions)
        # The cell blocks are at most max_cells rows: threaded BLAS only adds synchronisation there, and on
        # a busy machine it made the whole evaluation ten times slower (0.9 s vs 11.5 s on Norman).
        with threadpool_limits(limits=1, user_api="blas"):
            cell_scores = [self._cell_scores(condition, predictions, row) for row, condition in zip(predicted, self.conditions)]
        scores = scores.join(pd.DataFrame(cell_scores, index=self.conditions))[list(METRICS)]
        return self._aggregate(scores)

    def _profile_scores(self, predicted: np.ndarray) -> dict[str, np.ndarray]:
        observed, control = self._observed, self._control
        return {
            "mse": metrics.mse(predicted, observed),
            "mse_de": metrics.mse(predicted, observed, self._de_mask),
            "pearson": metrics.pearson(predicted, observed),
            "pearson_de": metrics.pearson(predicted, observed, self._de_mask),
            "pearson_delta": metrics.pearson_delta(predicted, observed, control),
            "pearson_delta_de": metrics.pearson_delta(predicted, observed, control, self._de_mask),
            "frac_opposite_direction_de": metrics.frac_opposite_direction(
                predicted, observed, control, self._non_dropout_mask
            ),
            "r2": metrics.r2_clipped(predicted, observed),
            "rank": metrics.rank_score(predicted, observed),
        }

    def _cell_scores(self, condition: str, predictions: Predictions, predicted_mean: np.ndarray) -> dict[str, float]:
        rng = np.random.default_rng([self.seed, zlib.crc32(condition.encode())])
        observed = self._sample_rows(self.data.expression, self.data.cell_indices(condition), rng)
        if predictions.cells is not None:
            cells = predictions.cells
            rows = np.flatnonzero(cells.obs[PREDICTION_CONDITION_KEY].astype(str).to_numpy() == condition)
            predicted = self._sample_rows(cells.X, rows, rng)
        else:
            control = self._sample_rows(self.data.expression, self.data.cell_indices(CONTROL), rng)
            predicted = control + (predicted_mean - self._control)
        return {
            "nrmse": metrics.mean_over_cell_batches(metrics.normalized_rmse, predicted, observed, self.batch_size),
            "mmd": metrics.mean_over_cell_batches(metrics.mmd, predicted, observed, self.batch_size),
            "energy_distance": metrics.energy_distance(predicted, observed),
        }

    def _sample_rows(self, matrix, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A seeded subsample of at most `max_cells` rows, shuffled so batches pair cells at random."""
        chosen = rng.permutation(rows)[: self.max_cells]
        block = matrix[np.sort(chosen)]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        return rng.permutation(block.astype(np.float64))

    def _aggregate(self, scores: pd.DataFrame) -> EvaluationResult:
        names = [name for name, _ in self.memberships]
        per_condition = scores.loc[[condition for _, condition in self.memberships]].copy()
        per_condition[SUBGROUP_COLUMN] = names
        per_subgroup = per_condition.groupby(SUBGROUP_COLUMN, sort=False)[list(METRICS)].mean()
        per_subgroup["n_conditions"] = per_condition.groupby(SUBGROUP_COLUMN, sort=False).size()
        return EvaluationResult(per_condition, per_subgroup, scores.mean())


def _check_has_conditions(present, expected: Sequence[str], what: str) -> None:
    missing = [condition for condition in expected if condition not in set(present)]
    if missing:
        raise DataError(
            f"{what} lack {len(missing)} evaluated condition(s): {', '.join(missing[:20])}"
            + (" ..." if len(missing) > 20 else "")
            + ". Predict every condition of the evaluated subgroups (canonical names: genes sorted, joined by '+')"
        )


def evaluate_named(evaluator: Evaluator, predictions: Mapping[str, Predictions]) -> tuple[dict, pd.DataFrame]:
    """Evaluate several named prediction sets (a model and its baselines) with one evaluator.

    Returns:
        A JSON-able dict {name: EvaluationResult.to_dict()} and a tidy frame with columns
        model, subgroup, condition, metric, value (one row per condition, subgroup and metric).
    """
    results, frames = {}, []
    for name, prediction in predictions.items():
        result = evaluator.evaluate(prediction)
        results[name] = result.to_dict()
        long = result.per_condition.rename_axis("condition").reset_index().melt(
            id_vars=["condition", SUBGROUP_COLUMN], value_vars=list(METRICS), var_name="metric", value_name="value"
        )
        long.insert(0, "model", name)
        frames.append(long)
    columns = ["model", SUBGROUP_COLUMN, "condition", "metric", "value"]
    tidy = pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
    return results, tidy


def write_metrics(results_dict: Mapping, tidy: pd.DataFrame, out_dir: str | Path) -> None:
    """Write `metrics.json` (the nested results) and `metrics.csv` (the tidy table) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(results_dict, indent=2, allow_nan=False) + "\n")
    tidy.to_csv(out_dir / "metrics.csv", index=False)
