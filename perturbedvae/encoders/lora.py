"""LoRA fine-tuning of an encoder's backbone with PEFT.

`apply_lora` wraps `encoder.trainable_module()` with `get_peft_model`. PEFT injects the low-rank adapters
into the backbone's own Linear layers in place, so the encoder keeps calling the same module and now
runs through the adapters; base weights are frozen and only the adapters train. The PeftModel is kept
as `encoder.peft_model`, which `save_adapters` (adapters only, a few hundred KB) and `merge_adapters`
use.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from perturbedvae.encoders.base import CellEncoder
from perturbedvae.errors import CheckpointError, ConfigError


def apply_lora(
    encoder: CellEncoder,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
) -> CellEncoder:
    """Freeze the encoder's backbone and add LoRA adapters to `target_modules` (default: the card's).

    Only modules whose output reaches the embedding the encoder reads are adapted (`lora_layers()`, when
    the encoder has it): adapters in transformer layers above the read layer would get no gradient, while
    modules outside the layer stack (scGPT's value encoder) feed every layer and are always adapted.

    Raises:
        ConfigError: the encoder has no weights, no target modules are known, or none match the backbone.
    """
    from peft import LoraConfig, get_peft_model

    backbone = _backbone(encoder)
    if getattr(encoder, "peft_model", None) is not None:
        raise ConfigError(f"{encoder.name} already has LoRA adapters; merge_adapters first or load a fresh encoder")
    targets = list(target_modules or getattr(getattr(encoder, "card", None), "lora_target_modules", ()) or ())
    if not targets:
        raise ConfigError(f"{encoder.name}: no LoRA target modules; set lora_target_modules in the card, e.g. [query, value]")
    names = {name.rsplit(".", 1)[-1] for name, module in backbone.named_modules() if isinstance(module, torch.nn.Linear)}
    unmatched = [target for target in targets if target not in names]
    if unmatched:
        raise ConfigError(f"{encoder.name}: LoRA targets {unmatched} are not Linear layers of the backbone; choose from {sorted(names)}")
    if r <= 0 or alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA needs r > 0, alpha > 0 and 0 <= dropout < 1; got r={r}, alpha={alpha}, dropout={dropout}")
    modules = _modules_to_adapt(backbone, targets, encoder.lora_layers() if hasattr(encoder, "lora_layers") else None)
    if not modules:
        raise ConfigError(f"{encoder.name}: no {targets} module reaches the hidden state the encoder reads; LoRA would change nothing")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, bias="none")
    encoder.peft_model = get_peft_model(backbone, config)
    return encoder


def _modules_to_adapt(backbone: torch.nn.Module, targets: Sequence[str], layers: Sequence[int] | None) -> list[str]:
    """Full names of the Linear modules named like a target, in a used layer or outside the layer stack."""
    chosen = []
    for name, module in backbone.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
            continue
        in_layer = _LAYER_INDEX.search(name)
        if layers is None or in_layer is None or int(in_layer.group(1)) in layers:
            chosen.append(name)
    return chosen


_LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")
"""The transformer layer a module belongs to: `encoder.layer.3.` (BERT), `transformer_encoder.layers.3.` (scGPT)."""


def save_adapters(encoder: CellEncoder, directory: str | Path) -> Path:
    """Write only the LoRA adapters (adapter_config.json + adapter_model.safetensors) to `directory`."""
    directory = Path(directory)
    _peft_model(encoder).save_pretrained(str(directory))
    return directory


def load_adapters(encoder: CellEncoder, directory: str | Path, trainable: bool = False) -> CellEncoder:
    """Attach adapters saved by `save_adapters` to a freshly loaded encoder of the same card and checkpoint."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise CheckpointError(f"{directory} holds no LoRA adapters (adapter_config.json missing); save them with save_adapters")
    if getattr(encoder, "peft_model", None) is not None:
        raise ConfigError(f"{encoder.name} already has LoRA adapters; load adapters into a fresh encoder")
    encoder.peft_model = PeftModel.from_pretrained(_backbone(encoder), str(directory), is_trainable=trainable)
    return encoder


def merge_adapters(encoder: CellEncoder) -> CellEncoder:
    """Fold the adapters into the base weights (same outputs, no adapter overhead, nothing left to train)."""
    _peft_model(encoder).merge_and_unload()
    encoder.peft_model = None
    return encoder


def count_trainable(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)


def _backbone(encoder: CellEncoder) -> torch.nn.Module:
    backbone = encoder.trainable_module()
    if backbone is None:
        raise ConfigError(f"{encoder.name} has no network weights to fine-tune; LoRA needs a geneformer, scgpt or huggingface encoder")
    return backbone


def _peft_model(encoder: CellEncoder):
    model = getattr(encoder, "peft_model", None)
    if model is None:
        raise ConfigError(f"{encoder.name} has no LoRA adapters; call apply_lora(encoder) first")
    return model
