"""Which process writes files and prints: one answer before and after Accelerate is set up.

Under `accelerate launch` (or torchrun) every process runs the same code and only the main one (global
rank 0) may write a run directory or print a report. Before the first Accelerator exists, the answer
comes from the launcher's `RANK`: making a `PartialState` that early would miss the launcher's CPU flag
(see `perturbedvae.train.trainer.make_accelerator`). Afterwards Accelerate's own state answers, the same
as `accelerator.is_main_process` where an Accelerator is at hand.
"""

from __future__ import annotations

import os

from accelerate.state import PartialState


def is_main_process() -> bool:
    """Whether this is the main process (also True for a plain, unlaunched single process)."""
    if PartialState._shared_state:  # Accelerate is set up: its answer
        return PartialState().is_main_process
    return int(os.environ.get("RANK", "0")) == 0
