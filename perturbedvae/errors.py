"""Errors users can act on.

Every error raised for bad input is a `PerturbedVAEError` whose message names the problem and the fix,
so the CLI can print it without a traceback and tests can assert on one type. `close_matches` and
`differs_only_in_case` build the "did you mean" of such messages, one way everywhere.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to `n` choices spelled like `word`, closest first (difflib's ratio, at least 0.6)."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "", listing: str | None = "valid keys") -> str:
    """The hint after an unknown name: ` (did you mean <prefix>X?)`, else `; <listing>: a, b, c` (or nothing).

    One wording for every unknown key or name a user can mistype (config keys, datasets, baselines).
    """
    choices = [str(choice) for choice in choices]
    close = close_matches(str(word), choices, n=1)
    if close:
        return f" (did you mean {prefix}{close[0]}?)"
    return f"; {listing}: {', '.join(choices)}" if listing else ""


def differs_only_in_case(word: str, choices: Iterable[str]) -> str | None:
    """The choice equal to `word` but for letter case (`klf1` -> `KLF1`), if exactly one is."""
    matches = [choice for choice in choices if choice != word and choice.casefold() == word.casefold()]
    return matches[0] if len(matches) == 1 else None


class PerturbedVAEError(Exception):
    """Base class of every error that is the user's input, not a bug."""


class DataError(PerturbedVAEError, ValueError):
    """The AnnData file or matrix cannot be used as given."""


class ConditionError(PerturbedVAEError, ValueError):
    """A perturbation condition string is malformed or names an unknown gene."""


class SplitError(PerturbedVAEError, ValueError):
    """A split cannot be built, read or applied to this data."""


class ConfigError(PerturbedVAEError, ValueError):
    """A configuration value is missing, of the wrong type or inconsistent."""


class CheckpointError(PerturbedVAEError, ValueError):
    """A saved model, checkpoint or cache is missing, corrupt or does not match."""


class TrainingDivergedError(PerturbedVAEError, RuntimeError):
    """The loss became NaN or infinite; the message names the step, the cells and the usual fixes."""
