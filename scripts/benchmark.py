"""PerturbedVAE beside every baseline on cross-validated held-out combinations (`perturbedvae benchmark`).

    python scripts/benchmark.py --config configs/norman_subset.yaml --protocol lodo --seeds 1 2 3 --out runs/benchmark

The same command as `perturbedvae benchmark`; here so that `accelerate launch scripts/benchmark.py ...`
trains every run with several processes. See `perturbedvae.benchmark` for the protocols and outputs.
"""

from __future__ import annotations

import sys

from perturbedvae.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("benchmark", sys.argv[1:]))
