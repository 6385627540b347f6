"""Train PerturbedVAE from a YAML experiment config, in one process or under `accelerate launch`.

    python scripts/train.py --config configs/synthetic_tiny.yaml train.epochs=3
    accelerate launch --config_file configs/accelerate/multi_gpu_bf16.yaml scripts/train.py --config configs/norman_subset.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/train.py --config configs/synthetic_tiny.yaml
    python scripts/train.py --config configs/norman_subset.yaml --resume     # continue from the last checkpoint

Overrides are `section.key=value` (see `perturbedvae.train.config`). Bad input prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from accelerate import PartialState

from perturbedvae.errors import PerturbedVAEError
from perturbedvae.train.config import load_config
from perturbedvae.train.runs import train_from_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML experiment config, e.g. configs/synthetic_tiny.yaml")
    parser.add_argument("--resume", action="store_true", help="continue the run in output.run_dir from its last checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.n_latent=16 train.epochs=3")
    args = parser.parse_args(argv)
    try:
        run_dir = train_from_config(load_config(args.config, args.overrides), resume=args.resume)
    except PerturbedVAEError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if PartialState().is_main_process:
        print(f"run written to {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
