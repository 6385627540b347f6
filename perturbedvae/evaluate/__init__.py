"""Evaluation: the prediction format, the metrics, the evaluator and the baselines."""

from perturbedvae.evaluate.evaluator import EvaluationResult, Evaluator, evaluate_named, write_metrics
from perturbedvae.evaluate.predictions import Predictions

__all__ = ["EvaluationResult", "Evaluator", "Predictions", "evaluate_named", "write_metrics"]
