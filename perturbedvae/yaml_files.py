"""Reading the YAML files users write (experiment configs, compare configs, adapter cards)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from perturbedvae.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-3` as a number as YAML 1.2 does (PyYAML alone leaves it a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """A command-line value read as YAML (`3`, `0.4`, `1e-3`, `true`, `[a, b]`, `train`); empty means None."""
    return yaml.load(text, Loader=_Loader) if text.strip() else None


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
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path} is not valid YAML: {error}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must be a YAML mapping of keys; {hint}")
    return raw
