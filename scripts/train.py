"""Train PerturbedVAE from a YAML experiment config, in one process or under `accelerate launch`.

    python scripts/train.py --config configs/synthetic_tiny.yaml train.epochs=3
    accelerate launch --config_file configs/accelerate/multi_gpu_bf16.yaml scripts/train.py --config configs/norman_subset.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/train.py --config configs/synthetic_tiny.yaml
    python scripts/train.py --config configs/norman_subset.yaml --resume     # continue from the last checkpoint
    python scripts/train.py -q --config configs/synthetic_tiny.yaml          # -q: warnings only; -v: details too

The same as `perturbedvae train ...`; this file exists because `accelerate launch` takes a script path.
Overrides are `section.key=value` (see `perturbedvae.train.config`). Bad input prints one line and exits 2.
"""

import sys

from perturbedvae.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("train", sys.argv[1:]))
