"""Evaluation: the metrics, the evaluator and the baselines (predictions are `perturbedvae.predictions`)."""

from perturbedvae.evaluate.evaluator import EvaluationResult, Evaluator, compare, write_metrics

__all__ = ["EvaluationResult", "Evaluator", "compare", "write_metrics"]
