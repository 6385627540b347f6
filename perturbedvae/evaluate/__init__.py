"""Evaluation: the metrics, the evaluator and the baselines (predictions are `perturbedvae.predictions`)."""

from perturbedvae.evaluate.evaluator import EvaluationResult, Evaluator, evaluate_named, write_metrics

__all__ = ["EvaluationResult", "Evaluator", "evaluate_named", "write_metrics"]
