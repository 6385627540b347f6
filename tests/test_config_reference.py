"""docs/configuration.md is what the config classes say, and every config key has a meaning there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from perturbedvae.train import config_reference
from perturbedvae.train.config_reference import DEFAULT_PATH, attribute_docs, render


def test_the_reference_is_up_to_date() -> None:
    assert DEFAULT_PATH.read_text() == render(), "regenerate it: python -m perturbedvae.train.config_reference"


def test_every_key_is_in_the_reference_with_type_and_default() -> None:
    text = render()
    assert "| `train.epochs` | int | 20 |" in text
    assert "| `train.mixed_precision` | `no` \\| `bf16` \\| `fp16` \\| null | null |" in text
    assert "| `model.n_latent` | int | 32 |" in text and "model.n_input" not in text  # derived from the data
    assert "`representation.cache_dir`" in text and "`model.gene_feature_dim`" in text


def test_grouped_and_continued_attribute_entries() -> None:
    @dataclasses.dataclass
    class Example:
        """Summary.

        Attributes:
            a, b: Shared text
                continued here.
            c: Own text.

        Raises:
            Nothing: not an attribute.
        """

        a: int = 1
        b: int = 2
        c: int = 3

    assert attribute_docs(Example) == {"a": "Shared text continued here.", "b": "Shared text continued here.", "c": "Own text."}


def test_an_undocumented_key_stops_the_generation(monkeypatch) -> None:
    @dataclasses.dataclass
    class Undocumented:
        """No attributes section."""

        mystery: int = 0

    monkeypatch.setattr(config_reference, "SECTIONS", (("extra", Undocumented),))
    with pytest.raises(ValueError, match="no description of mystery"):
        render()


def test_main_writes_the_file(tmp_path: Path) -> None:
    config_reference.main(["--out", str(tmp_path / "configuration.md")])
    assert (tmp_path / "configuration.md").read_text() == render()
