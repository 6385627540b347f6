"""Adapter cards: one small YAML file says how to turn cells into inputs of one encoder family.

A card names the encoder `kind`, its tokenization scheme, the vocabulary files it reads (relative to a
vocabulary directory), the maximum input length, how token outputs are pooled into a cell embedding,
which hidden layer to read, and which Linear layers LoRA adapts. Everything is validated here once, so
an encoder never starts from a half-understood card and users get a `ConfigError` naming the bad key.

Vocabulary directory, first that applies: the `vocab_dir` argument, the `PERTURBEDVAE_VOCAB_DIR`
environment variable, the card's `vocab_dir` (relative to the card file), `../shared/vocab` relative
to the working directory (the layout of this repository).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from perturbedvae.errors import ConfigError
from perturbedvae.yaml_files import read_yaml_mapping

VOCAB_DIR_ENV = "PERTURBEDVAE_VOCAB_DIR"
DEFAULT_VOCAB_DIR = Path("../shared/vocab")
POOLINGS = ("mean", "cls", "max")


@dataclass(frozen=True)
class KindSchema:
    """What a card of one kind may and must say."""

    tokenization: str | None
    required_vocab: tuple[str, ...] = ()
    optional_vocab: tuple[str, ...] = ()
    options: Mapping[str, type | tuple[type, ...]] = field(default_factory=dict)
    required_options: tuple[str, ...] = ()
    needs_checkpoint: bool = True


KINDS: dict[str, KindSchema] = {
    "geneformer": KindSchema(
        tokenization="rank_value",
        required_vocab=("token_dictionary", "gene_median_dictionary", "gene_name_id_dictionary"),
        optional_vocab=("ensembl_mapping_dictionary",),
        options={"special_tokens": bool},
    ),
    "scgpt": KindSchema(
        tokenization="value_binning",
        optional_vocab=("gene_vocab",),
        options={"n_bins": int},
    ),
    "huggingface": KindSchema(
        tokenization="rank_value",
        required_vocab=("gene_to_token",),
        optional_vocab=("gene_medians",),
        options={"cls_token_id": int, "eos_token_id": int},
    ),
    "precomputed": KindSchema(tokenization=None, options={"obsm_key": str}, required_options=("obsm_key",), needs_checkpoint=False),
    "expression": KindSchema(
        tokenization=None, options={"representation": str, "n_components": int}, needs_checkpoint=False
    ),
}

_COMMON_KEYS = {
    "kind", "name", "class", "tokenization", "vocab_dir", "vocab", "max_length", "pooling", "layer",
    "lora_target_modules", "min_gene_coverage", "min_perturbed_coverage", "checkpoint", "description",
}


@dataclass(frozen=True)
class AdapterCard:
    """A validated adapter card (see the module docstring for the vocabulary directory rules)."""

    kind: str
    name: str
    encoder_class: str | None = None
    tokenization: str | None = None
    vocab_files: Mapping[str, Path] = field(default_factory=dict)
    max_length: int | None = None
    pooling: str = "mean"
    layer: int = -1
    lora_target_modules: tuple[str, ...] = ()
    min_gene_coverage: float = 0.0
    min_perturbed_coverage: float = 0.0
    checkpoint: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    source: Path | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)
    vocab_dir: Path | None = None
    """The vocabulary directory the card's files were resolved in (a saved model pins it)."""

    @property
    def schema(self) -> KindSchema:
        return KINDS[self.kind]

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def vocab_file(self, role: str) -> Path | None:
        """Absolute path of a vocabulary file, checked to exist."""
        path = self.vocab_files.get(role)
        if path is not None and not path.is_file():
            raise ConfigError(
                f"adapter card {self.name!r}: vocabulary file {role} = {path} does not exist; set the vocabulary "
                f"directory with vocab_dir in the card or the {VOCAB_DIR_ENV} environment variable"
            )
        return path


def with_pooling(card: AdapterCard, pooling: str) -> AdapterCard:
    """`card` with another pooling (an experiment's `representation.pooling`); the raw card records it, so
    embeddings of different poolings never share a cache entry."""
    _check_pooling(pooling, card.name)
    return replace(card, pooling=pooling, raw={**card.raw, "pooling": pooling})


def _check_pooling(pooling: str, label: str) -> None:
    if pooling not in POOLINGS:
        raise ConfigError(f"{label}: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def load_card(card: str | Path | Mapping[str, Any], vocab_dir: str | Path | None = None) -> AdapterCard:
    """Read and validate an adapter card from a YAML path or a mapping.

    Raises:
        ConfigError: for a missing file, invalid YAML, an unknown kind or key, or a value of the wrong type.
    """
    source: Path | None = None
    if isinstance(card, Mapping):
        raw = dict(card)
    else:
        source = Path(card)
        raw = read_yaml_mapping(source, "adapter card", "the cards shipped with perturbedvae are in adapters/ (kind: ..., ...)")
    label = str(source) if source else "adapter card"
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{label}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    schema = KINDS[kind]
    unknown = set(raw) - _COMMON_KEYS - set(schema.options)
    if unknown:
        allowed = sorted(_COMMON_KEYS | set(schema.options))
        raise ConfigError(f"{label}: unknown key(s) {', '.join(sorted(unknown))} for kind {kind!r}; allowed: {', '.join(allowed)}")
    options = {key: _typed(raw, key, expected, label) for key, expected in schema.options.items() if key in raw}
    missing = [key for key in schema.required_options if key not in options]
    if missing:
        raise ConfigError(f"{label}: kind {kind!r} needs {', '.join(missing)}")
    tokenization = raw.get("tokenization", schema.tokenization)
    if tokenization != schema.tokenization:
        raise ConfigError(f"{label}: kind {kind!r} uses tokenization {schema.tokenization!r}, got {tokenization!r}")
    pooling = _typed(raw, "pooling", str, label) or "mean"
    _check_pooling(pooling, label)
    directory = _vocab_dir(raw, source, vocab_dir)
    return AdapterCard(
        kind=kind,
        name=_typed(raw, "name", str, label) or (source.stem if source else kind),
        encoder_class=_encoder_class(raw, label),
        tokenization=tokenization,
        vocab_files=_vocab_files(raw, schema, directory, label),
        max_length=_positive(raw, "max_length", label),
        pooling=pooling,
        layer=_typed(raw, "layer", int, label) if "layer" in raw else -1,
        lora_target_modules=tuple(_string_list(raw, "lora_target_modules", label)),
        min_gene_coverage=_fraction(raw, "min_gene_coverage", label),
        min_perturbed_coverage=_fraction(raw, "min_perturbed_coverage", label),
        checkpoint=_relative_path(raw.get("checkpoint"), source),
        options=options,
        source=source,
        raw=raw,
        vocab_dir=directory,
    )


def _typed(raw: Mapping[str, Any], key: str, expected: type | tuple[type, ...], label: str) -> Any:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and expected is not bool:
        raise ConfigError(f"{label}: {key} must be {_type_name(expected)}, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{label}: {key} must be {_type_name(expected)}, got {value!r}")
    return value


def _type_name(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join({"int": "an integer", "str": "a string", "bool": "true/false", "float": "a number"}.get(t.__name__, t.__name__) for t in types)


def _positive(raw: Mapping[str, Any], key: str, label: str) -> int | None:
    value = _typed(raw, key, int, label)
    if value is not None and value <= 0:
        raise ConfigError(f"{label}: {key} must be a positive integer, got {value}")
    return value


def _fraction(raw: Mapping[str, Any], key: str, label: str) -> float:
    value = _typed(raw, key, (int, float), label)
    if value is None:
        return 0.0
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{label}: {key} is a fraction between 0 and 1, got {value}")
    return float(value)


def _string_list(raw: Mapping[str, Any], key: str, label: str) -> list[str]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ConfigError(f"{label}: {key} must be a list of module names, e.g. [query, value]; got {value!r}")
    return value


def _encoder_class(raw: Mapping[str, Any], label: str) -> str | None:
    value = _typed(raw, "class", str, label)
    if value is not None and value.count(":") != 1:
        raise ConfigError(f"{label}: class must read 'package.module:ClassName', got {value!r}")
    return value


def _vocab_dir(raw: Mapping[str, Any], source: Path | None, explicit: str | Path | None) -> Path:
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(VOCAB_DIR_ENV):
        return Path(os.environ[VOCAB_DIR_ENV])
    card_value = _relative_path(raw.get("vocab_dir"), source)
    return card_value if card_value is not None else DEFAULT_VOCAB_DIR


def _relative_path(value: Any, source: Path | None) -> Path | None:
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() or source is None else source.parent / path


def _vocab_files(raw: Mapping[str, Any], schema: KindSchema, directory: Path, label: str) -> dict[str, Path]:
    vocab = raw.get("vocab") or {}
    if not isinstance(vocab, Mapping):
        raise ConfigError(f"{label}: vocab must map a role to a file, e.g. token_dictionary: geneformer_v1/token_dictionary_gc30M.pkl")
    allowed = schema.required_vocab + schema.optional_vocab
    unknown = [role for role in vocab if role not in allowed]
    if unknown:
        raise ConfigError(f"{label}: unknown vocab role(s) {', '.join(unknown)}; this kind reads {', '.join(allowed) or 'no vocabulary'}")
    missing = [role for role in schema.required_vocab if role not in vocab]
    if missing:
        raise ConfigError(f"{label}: vocab is missing {', '.join(missing)}")
    return {role: directory / str(relative) for role, relative in vocab.items()}
