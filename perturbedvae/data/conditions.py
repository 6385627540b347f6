"""Perturbation condition strings: one parser for every convention in the field.

GEARS writes `ctrl`, `A+ctrl`, `A+B`; PerturBench and scPerturb write `control`, `A`, `A+B`; cell-eval
uses `non-targeting`. Internally a condition is the *set* of perturbed genes, so `A+B == B+A` and
`A+ctrl == A`. Its canonical name lists the genes sorted and joined by `+` (control is `control`), which
makes names comparable across files without remembering who wrote them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from perturbedvae.errors import ConditionError
from perturbedvae.vocabulary import check_known_genes

CONTROL = "control"
"""Canonical name of unperturbed (control) cells."""

__all__ = ["CONTROL", "DEFAULT_CONTROL_LABELS", "ConditionSyntax", "canonical_name", "check_known_genes", "genes_of"]

DEFAULT_CONTROL_LABELS: tuple[str, ...] = ("control", "ctrl", "non-targeting")

_WHITESPACE = re.compile(r"\s")


@dataclass(frozen=True)
class ConditionSyntax:
    """How a dataset spells conditions.

    Attributes:
        control_labels: Strings meaning "no perturbation", either as the whole condition (`ctrl`) or as a
            placeholder inside a combination (`A+ctrl`). Compared case-insensitively.
        delimiter: Separator between the genes of a combination.
    """

    control_labels: tuple[str, ...] = DEFAULT_CONTROL_LABELS
    delimiter: str = "+"

    def __post_init__(self) -> None:
        if not self.delimiter or _WHITESPACE.search(self.delimiter):
            raise ConditionError(f"delimiter must be a non-empty string without spaces, got {self.delimiter!r}")
        if not self.control_labels:
            raise ConditionError("control_labels must name at least one label, e.g. ('control',)")
        object.__setattr__(self, "control_labels", tuple(self.control_labels))

    def is_control_label(self, token: str) -> bool:
        return token.lower() in {label.lower() for label in self.control_labels}

    def parse(self, text: object) -> tuple[str, ...]:
        """Return the sorted perturbed genes of a condition string; `()` means control.

        Raises:
            ConditionError: for a non-string, an empty condition, an empty gene between delimiters, a gene
                containing whitespace, or a gene named twice.
        """
        if not isinstance(text, str):
            raise ConditionError(f"condition must be a string, got {text!r} of type {type(text).__name__}")
        stripped = text.strip()
        if not stripped:
            raise ConditionError("empty condition: every cell needs a condition (use a control label for controls)")
        tokens = [token.strip() for token in stripped.split(self.delimiter)]
        if any(not token for token in tokens):
            raise ConditionError(
                f"malformed condition {text!r}: empty gene name between {self.delimiter!r} delimiters"
            )
        genes = [token for token in tokens if not self.is_control_label(token)]
        for gene in genes:
            if _WHITESPACE.search(gene):
                raise ConditionError(f"malformed condition {text!r}: gene name {gene!r} contains whitespace")
        if len(set(genes)) != len(genes):
            raise ConditionError(f"malformed condition {text!r}: a gene is named more than once")
        return tuple(sorted(genes))

    def canonical(self, text: object) -> str:
        """Canonical name of a condition string (`B+A` -> `A+B`, `A+ctrl` -> `A`, `ctrl` -> `control`)."""
        return canonical_name(self.parse(text))


def canonical_name(genes: Iterable[str]) -> str:
    """Canonical name of a set of perturbed genes; the empty set is `control`."""
    ordered = sorted(set(genes))
    return "+".join(ordered) if ordered else CONTROL


def genes_of(canonical: str) -> tuple[str, ...]:
    """Genes of a canonical condition name (inverse of `canonical_name`)."""
    return () if canonical == CONTROL else tuple(canonical.split("+"))
