"""The PerturbedVAE head: pure torch, fed by any encoder through (cell representation, perturbation set).

`PerturbedVAEConfig` describes it, `PerturbedVAEModule` is the math (inference, perturbation effect,
generative model, loss, counterfactual prediction), and `PerturbedVAEHead` is the shareable checkpoint
directory with its gene vocabularies.
"""

from perturbedvae.model.config import PerturbedVAEConfig
from perturbedvae.model.effects import PerturbationOutput
from perturbedvae.model.likelihoods import GaussianOutput, GenerativeOutput, NegativeBinomialOutput
from perturbedvae.model.module import InferenceOutput, LossOutput, LossWeights, PerturbedVAEModule
from perturbedvae.model.pretrained import PerturbedVAEHead

__all__ = [
    "GaussianOutput",
    "GenerativeOutput",
    "InferenceOutput",
    "LossOutput",
    "LossWeights",
    "NegativeBinomialOutput",
    "PerturbationOutput",
    "PerturbedVAEConfig",
    "PerturbedVAEHead",
    "PerturbedVAEModule",
]
