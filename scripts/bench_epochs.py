"""Training cells per CPU-second of each epoch of `perturbedvae train`, for any version of the code.

    python scripts/bench_epochs.py kept configs/norman_subset.yaml
    git worktree add ../old-head 71a0be2 && cd ../old-head && PYTHONPATH=. python "$OLDPWD/scripts/bench_epochs.py" --old-cli old configs/norman_subset.yaml

Trains CONFIG for `--epochs` epochs (no early stop) and times each call of `Trainer._train_epoch` by the
process's CPU time, so validation, setup and the first epoch (allocations, caches) stay out; prints the
median and the largest rate over epochs 2 and later. The code measured is whatever `perturbedvae` the
interpreter imports, so a worktree of an older commit on PYTHONPATH measures that commit in the same
conditions (a worktree beside the repository, so that its configs find ../shared). Torch keeps one
thread even where the code under test sets its own count (older commits set as many as the machine has
cores). `--old-cli`: the commit's CLI has no `-q`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--old-cli", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_num_threads = lambda n: None  # the code under test keeps 1 thread

    from perturbedvae.cli import main as cli
    from perturbedvae.train import trainer

    train_epoch, rates = trainer.Trainer._train_epoch, []

    def timed(self, *arguments, **keywords):
        start = time.process_time()
        result = train_epoch(self, *arguments, **keywords)
        rates.append(result[1] / (time.process_time() - start))
        return result

    trainer.Trainer._train_epoch = timed
    command = ([] if args.old_cli else ["-q"]) + [
        "train", "--config", args.config, f"train.epochs={args.epochs}", f"train.early_stopping_patience={args.epochs * 10}",
        f"output.run_dir=runs/bench_epochs/{args.name}", "output.overwrite=true", *args.overrides]
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        cli(command)
    later = rates[1:]
    print(f"{args.name}: median {statistics.median(later):.0f}, max {max(later):.0f} training cells per CPU-second "
          f"over epochs 2-{len(rates)}")


if __name__ == "__main__":
    main()
