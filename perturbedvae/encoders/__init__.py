"""Cell encoders: adapter kinds selected by the YAML cards in adapters/.

`load_encoder(card, checkpoint)` builds one; `perturbedvae.encoders.lora.apply_lora` fine-tunes it.
"""

from perturbedvae.encoders.base import CellEncoder, GeneCoverage
from perturbedvae.encoders.cards import AdapterCard, load_card
from perturbedvae.encoders.registry import load_encoder

__all__ = ["AdapterCard", "CellEncoder", "GeneCoverage", "load_card", "load_encoder"]
