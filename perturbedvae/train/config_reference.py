"""The configuration reference, generated from the config classes so it cannot drift from them.

    python -m perturbedvae.train.config_reference            # rewrites docs/configuration.md

Every key of an experiment config (`data`, `split`, `representation`, `model`, `train`, `output`) with its
type, default and meaning. The meaning is the key's entry in the `Attributes:` section of its class's
docstring; a key without one stops the generation (and the test that keeps the file current).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perturbedvae.model.config import PerturbedVAEConfig
from perturbedvae.train.config import (
    DERIVED_MODEL_FIELDS,
    DataConfig,
    OutputConfig,
    RepresentationConfig,
    SplitConfig,
    TrainConfig,
)

SECTIONS: tuple[tuple[str, type], ...] = (
    ("data", DataConfig),
    ("split", SplitConfig),
    ("representation", RepresentationConfig),
    ("model", PerturbedVAEConfig),
    ("train", TrainConfig),
    ("output", OutputConfig),
)
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
_ENTRY = re.compile(r"^(?P<names>[a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*): (?P<text>.*)$")


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> its text in the class docstring's `Attributes:` section (`a, b: text` documents both)."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    if "Attributes:" not in lines:
        return {}
    docs: dict[str, str] = {}
    current: list[str] = []
    for line in lines[lines.index("Attributes:") + 1 :]:
        if line and not line.startswith(" "):
            break  # the next section
        match = _ENTRY.match(line.strip()) if line.startswith("    ") and not line.startswith("     ") else None
        if match:
            current = match["names"].split(", ")
            for name in current:
                docs[name] = match["text"]
        elif line.strip() and current:
            for name in current:
                docs[name] += " " + line.strip()
    return docs


def render() -> str:
    """The whole reference as Markdown.

    Raises:
        ValueError: a config key without a description in its class's docstring.
    """
    parts = [
        "# Configuration reference",
        "",
        "Every key of an experiment config (`perturbedvae train --config`, `pv.PerturbedVAE.from_config`), generated",
        "from the config classes by `python -m perturbedvae.train.config_reference`; do not edit by hand.",
        "Command-line overrides use the dotted keys (`train.epochs=3`); the notebook class takes the `model`",
        "keys as keyword arguments and the `train` keys as arguments of `train()`.",
        "",
    ]
    for section, cls in SECTIONS:
        docs = attribute_docs(cls)
        hints = typing.get_type_hints(cls)
        fields = [item for item in dataclasses.fields(cls) if not (cls is PerturbedVAEConfig and item.name in DERIVED_MODEL_FIELDS)]
        missing = [item.name for item in fields if item.name not in docs]
        if missing:
            raise ValueError(f"{cls.__name__}: no description of {', '.join(missing)} in its docstring's Attributes section")
        summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        parts += [f"## `{section}`", "", f"{summary} (`{cls.__module__}.{cls.__name__}`)", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for item in fields:
            text = docs[item.name].replace("|", "\\|")
            parts.append(f"| `{section}.{item.name}` | {_type_name(hints[item.name])} | {_default(item)} | {text} |")
        parts.append("")
    return "\n".join(parts)


def _type_name(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in args)
    if args and origin is not None and type(None) in args:
        inner = [arg for arg in args if arg is not type(None)]
        return " \\| ".join([*(_type_name(arg) for arg in inner), "null"])
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in args)}]"
    return getattr(kind, "__name__", str(kind).replace("typing.", ""))


def _default(item: dataclasses.Field) -> str:
    if item.default is not dataclasses.MISSING:
        value = item.default
    elif item.default_factory is not dataclasses.MISSING:
        value = item.default_factory()
    else:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if isinstance(value, str) else str(value)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help="file to write (default docs/configuration.md)")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
