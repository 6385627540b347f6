"""Reading the YAML files users write (experiment configs, compare configs, adapter cards)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from perturbedvae.errors import ConfigError


def read_yaml_mapping(path: str | Path, what: str, hint: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file, or a ConfigError naming `what` the file is and `hint` to fix it.

    Args:
        what: The kind of file, for messages (e.g. "adapter card").
        hint: What to do about a missing file or a top level that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; {hint}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path} is not valid YAML: {error}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must be a YAML mapping of keys; {hint}")
    return raw
