"""How much the package says while it works: one `perturbedvae` logger, and the switch that sets its level.

Every module logs to `logging.getLogger(__name__)`, a child of the `perturbedvae` logger: progress and
facts at INFO (a benchmark's folds, an encoder's gene coverage), details at DEBUG (what was read). What a
command was asked for (tables, written paths) is printed to stdout instead, and warnings stay `warnings.warn`.
INFO and DEBUG messages show once `set_verbosity` installs a handler: the CLI calls it (`-q`, default, `-v`), a
notebook may.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from perturbedvae.errors import ConfigError

LOGGER_NAME = "perturbedvae"
LEVELS: dict[str, int] = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}
"""`quiet`: warnings and errors only; `normal`: also progress (what the CLI showed before it logged); `verbose`: details."""


class _PlainStderrHandler(logging.StreamHandler):
    """Writes each message as one plain line (no time stamps, no level names) to `sys.stderr` as it is when the
    message comes, so a replaced stderr (a test's capture, a notebook's) receives it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self) -> TextIO:  # what StreamHandler writes to
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns one; stderr is looked up on each write instead
        pass


def set_verbosity(level: str = "normal") -> None:
    """Show the package's messages from `level` up on stderr, replacing an earlier call's handler.

    Raises:
        ConfigError: a level other than quiet, normal or verbose.
    """
    if level not in LEVELS:
        raise ConfigError(f"verbosity {level!r} is not one of {', '.join(LEVELS)}")
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(LEVELS[level])
    for handler in [h for h in logger.handlers if isinstance(h, _PlainStderrHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(_PlainStderrHandler())


__all__ = ["LEVELS", "LOGGER_NAME", "set_verbosity"]
