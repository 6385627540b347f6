"""Checks of numbers read from configs, files and arguments, worded the same everywhere.

Every layer validates numbers a user typed (a config key, a CLI argument, a simulator setting); one
helper keeps the messages identical ("n_genes must be at least 1, got 0") and catches what ad hoc
comparisons miss: booleans (True is an int in Python), NaN and infinities, strings from a YAML file.
"""

from __future__ import annotations

import math
import numbers

from perturbedvae.errors import ConfigError


def check_number(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    error: type[Exception] = ConfigError,
) -> None:
    """Raise `error` unless `value` is a finite real (an integer with `integer`) inside the interval.

    `low`/`high` bound the interval (None: unbounded), closed unless `low_open`/`high_open`.
    """
    if integer and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise error(f"{name} must be an integer, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise error(f"{name} must {_interval_text(low, high, low_open, high_open)}, got {value!r}")


def _interval_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"be greater than {low}" if low_open else f"be at least {low}"
    if low is None:
        return f"be less than {high}" if high_open else f"be at most {high}"
    return f"lie in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
