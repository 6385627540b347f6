"""Validation scoring: the callbacks the trainer is given to pick the kept epoch, and the test scorer of a run.

The trainer only calls a validator (`perturbedvae.train.trainer.Validator`); these build it from the
evaluator, so training never imports evaluation. `train.selection` chooses one: `val_conditions` scores
the split's validation conditions with the evaluator (`pearson_delta_de`), `held_out_cells` the mean
squared error of each training condition's prediction against its held-out cells, `last` none.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from perturbedvae.data.de import compute_de_genes
from perturbedvae.data.splits import Split
from perturbedvae.evaluate import Evaluator
from perturbedvae.predictions import Predictions
from perturbedvae.train.config import ExperimentConfig
from perturbedvae.train.datamodule import PerturbationDataModule, dense_rows, is_predictable
from perturbedvae.train.predict import predict_from_controls
from perturbedvae.train.trainer import Selection, Validator


class ConditionScorer:
    """Scores counterfactual predictions of held-out conditions the head can express.

    Conditions with a gene outside the perturbation vocabulary (never perturbed in training) cannot be
    predicted by a head without gene features; they are left out and listed in `skipped`.
    """

    def __init__(self, datamodule: PerturbationDataModule, conditions: Sequence[str], subgroups: Mapping[str, Sequence[str]], de_method: str, n_de_genes: int, control_cells: np.ndarray) -> None:
        vocabulary = datamodule.perturbation_genes
        self.datamodule = datamodule
        self.conditions = [name for name in conditions if is_predictable(name, vocabulary)]
        self.skipped = [name for name in conditions if not is_predictable(name, vocabulary)]
        groups = {group: [name for name in names if name in set(self.conditions)] for group, names in subgroups.items()}
        self.groups = {group: names for group, names in groups.items() if names} or {"all": self.conditions}
        self.de_method, self.n_de_genes = de_method, n_de_genes
        self.control_cells = control_cells
        self._evaluator: Evaluator | None = None

    @property
    def evaluator(self) -> Evaluator:
        """Built on first use, so only the process that scores pays for the DE genes."""
        if self._evaluator is None:
            de = compute_de_genes(self.datamodule.data, method=self.de_method, n_top=self.n_de_genes)
            self._evaluator = Evaluator(self.datamodule.data, de, self.groups)
        return self._evaluator

    def predict(self, module: torch.nn.Module) -> Predictions:
        return predict_from_controls(module, self.datamodule, self.conditions, self.control_cells)

    def __call__(self, module: torch.nn.Module) -> dict[str, float]:
        return {name: float(value) for name, value in self.evaluator.evaluate(self.predict(module)).overall.items()}


HELD_OUT_METRIC = "held_out_mse"


class HeldOutCellScorer:
    """Scores each training condition's counterfactual prediction against the mean of its held-out cells.

    The score is the mean over conditions of the MSE across genes (lower is better): it selects the epoch
    on the prediction path itself, on cells no step trained on, without spending a held-out condition.
    """

    selection = Selection(HELD_OUT_METRIC, maximize=False)

    def __init__(self, datamodule: PerturbationDataModule, control_cells: np.ndarray) -> None:
        held = datamodule.held_out_cells
        conditions = datamodule.data.conditions[held]
        self.conditions = sorted(set(conditions) & set(datamodule.split.train))
        self.datamodule, self.control_cells = datamodule, control_cells
        expression = datamodule.data.expression
        self.observed = np.vstack([dense_rows(expression, held[conditions == name]).mean(axis=0, dtype=np.float64) for name in self.conditions]) if self.conditions else None

    def __call__(self, module: torch.nn.Module) -> dict[str, float]:
        predicted = predict_from_controls(module, self.datamodule, self.conditions, self.control_cells).means.to_numpy()
        return {HELD_OUT_METRIC: float(((predicted - self.observed) ** 2).mean())}


def make_validator(config: ExperimentConfig, datamodule: PerturbationDataModule, split: Split, controls: np.ndarray) -> tuple[Validator | None, Selection, list[str]]:
    """The run's validator (`train.selection`), its selection rule and the validation conditions it cannot predict."""
    if config.train.selection == "last":
        return None, Selection(), []
    if config.train.selection == "held_out_cells":
        scorer = HeldOutCellScorer(datamodule, controls)
        return (scorer if scorer.conditions else None), scorer.selection, []
    validator = ConditionScorer(datamodule, split.val, split.val_subgroups, config.data.de_method, config.data.n_de_genes, controls)
    if not validator.conditions:
        warnings.warn("no validation condition the head can predict: model selection uses the last epoch", UserWarning, stacklevel=3)
        return None, Selection(), validator.skipped
    return validator, Selection(), validator.skipped
