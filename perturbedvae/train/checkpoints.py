"""Training checkpoints that are complete or absent, never half-written.

A process can die while Accelerate writes a checkpoint (weights, optimizer, every process's RNG state,
our progress record), and a disk can truncate or corrupt files later. Resuming from such a folder would
fail deep inside torch or, worse, continue from inconsistent state. So a checkpoint is written under a
hidden temporary name, a manifest of every file's size and SHA-256 is added, and only then is the
folder renamed to `epoch_NNNN`; resuming verifies the manifest first and names the damaged file.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from accelerate import Accelerator

from perturbedvae.errors import CheckpointError
from perturbedvae.files import file_digest

CHECKPOINT_PREFIX = "epoch_"
MANIFEST = "manifest.json"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (unfinished ones have a hidden name and are skipped)."""
    folder = run_dir / "checkpoints"
    return sorted(folder.glob(f"{CHECKPOINT_PREFIX}*")) if folder.is_dir() else []


def save_checkpoint(accelerator: Accelerator, run_dir: Path, epochs_done: int) -> Path:
    """Write the state of every process, then publish it atomically (main process renames)."""
    final = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{epochs_done:04d}"
    partial, replaced = final.with_name(f".{final.name}.partial"), final.with_name(f".{final.name}.replaced")
    if accelerator.is_main_process:
        for stale in final.parent.glob(".*"):  # left by a process killed while saving
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / MANIFEST).write_text(json.dumps(_describe(partial), indent=1, sort_keys=True) + "\n")
        if final.exists():  # an epoch saved again (a resumed run): the old copy stays until the new one is in place
            final.rename(replaced)
        partial.rename(final)
        if replaced.exists():
            shutil.rmtree(replaced)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(path: Path) -> None:
    """Raise unless every file the manifest lists is present with its size and hash (warn without a manifest).

    Raises:
        CheckpointError: naming the missing or damaged file and what to do.
    """
    fix = "delete this folder to resume from the previous checkpoint, or start again without --resume"
    if not (path / MANIFEST).exists():
        warnings.warn(f"{path} has no {MANIFEST} (written before checkpoints had manifests); its files cannot be verified",
                      UserWarning, stacklevel=2)
        return
    try:
        expected = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{path}: {MANIFEST} is unreadable, so the checkpoint is damaged; {fix}") from None
    for name, (size, digest) in expected.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing; {fix}")
        if file.stat().st_size != size or file_digest(file) != digest:
            raise CheckpointError(f"{path}: {name} is truncated or corrupt (size or SHA-256 differs); {fix}")


def _describe(folder: Path) -> dict[str, list]:
    return {
        str(file.relative_to(folder)): [file.stat().st_size, file_digest(file)]
        for file in sorted(folder.rglob("*"))
        if file.is_file() and file.name != MANIFEST
    }


