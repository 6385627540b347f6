"""Compare PerturbedVAE variants beside the baselines over seeds and write a report, also under `accelerate launch`.

    python scripts/compare.py --config configs/compare_norman.yaml
    python scripts/compare.py --config configs/compare_norman.yaml compare.seeds=[1] train.epochs=5
    accelerate launch --config_file configs/accelerate/single_gpu.yaml scripts/compare.py --config configs/compare_norman.yaml

The same as `perturbedvae compare ...`; this file exists because `accelerate launch` takes a script path.
Overrides `compare.KEY=VALUE` change the comparison, others (`section.key=value`) every variant's experiment.
"""

import sys

from perturbedvae.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("compare", sys.argv[1:]))
