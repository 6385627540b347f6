"""Gene vocabulary checks shared by the data layer and the model (which may not import `data/`)."""

from __future__ import annotations

from collections.abc import Iterable

from perturbedvae.errors import ConditionError, close_matches, differs_only_in_case


def check_known_genes(genes: Iterable[str], known: Iterable[str], what: str = "perturbation vocabulary", advice: str = "") -> None:
    """Raise a ConditionError naming close matches when a gene is not in `known`.

    A gene that differs from a known one only in case (`klf1`, a mouse-style `Klf1` for `KLF1`) is named as
    such: difflib's close matches may not even include it.

    Args:
        advice: A sentence appended to the message, e.g. how to predict genes outside the vocabulary.
    """
    known_set = set(known)
    unknown = [gene for gene in genes if gene not in known_set]
    if not unknown:
        return
    hints = []
    for gene in unknown:
        cased, close = differs_only_in_case(gene, known_set), close_matches(gene, sorted(known_set))
        if cased:
            hints.append(f"{gene!r}: did you mean {cased}? (only the case differs)")
        else:
            hints.append(f"{gene!r} (close matches: {', '.join(close)})" if close else f"{gene!r} (no close match)")
    message = f"unknown gene(s) not in the {what}: " + "; ".join(hints)
    raise ConditionError(f"{message}. {advice}" if advice else message)
