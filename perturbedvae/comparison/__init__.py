"""Compare model variants beside the baselines over seeds, and write one readable report.

    perturbedvae compare --config configs/compare_norman.yaml [compare.seeds=[1] train.epochs=5 ...]

A compare config names a base experiment config, the variants (each a set of overrides of it, e.g. an
encoder for `representation.*`), the seeds and the baselines:

    experiment: norman_subset.yaml             # relative to this file
    overrides: {train.checkpoint_every: 0}     # applied to every variant
    variants:
      standalone: {}
      geneformer_frozen: {representation.kind: encoder, representation.adapter: ../adapters/geneformer-v1.yaml}
    compare: {seeds: [1, 2, 3], out_dir: runs/compare_norman}

Every variant trains once per seed (`train.seed`) on the *same split* (the base config's), so the spread
over seeds is the training randomness and every model is scored on the same held-out conditions. Command-
line overrides `compare.KEY=VALUE` change the compare settings, any other `section.key=value` every
variant's experiment. The report directory holds `report.md`, `report.html` (figures embedded),
`metrics.csv` (variant, seed, subgroup, condition, metric, value), `interactions.csv`, `figures/` and
the run directories under `runs/<variant>/seed_<seed>/`.

The package: `plan` reads the config, `run` trains and meters every run (`metering`) through the model
class (`trained`), `scoring` scores them beside the baselines and `sections` writes the report.
"""

from perturbedvae.comparison.plan import ComparePlan, CompareSettings, load_compare_config
from perturbedvae.comparison.run import run_compare

__all__ = ["ComparePlan", "CompareSettings", "load_compare_config", "run_compare"]
