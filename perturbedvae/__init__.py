"""perturbedvae: predict single-cell responses to genetic perturbations.

Data -> encoder -> head -> trainer -> evaluator, imports flowing one way.
"""

__version__ = "0.1.0"
