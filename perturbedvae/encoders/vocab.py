"""Reading vocabulary files safely, and reporting how much of a dataset a vocabulary covers.

Geneformer ships its dictionaries as Python pickles. Unpickling runs code, so a pickle is read only
from a path the user named (an adapter card or its vocabulary directory), and the first read of each
file in a process says so in a warning (reads are cached). JSON vocabularies (scGPT, user mappings) carry no such risk.
"""

from __future__ import annotations

import json
import logging
import pickle
import warnings
from collections.abc import Collection, Sequence
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

from perturbedvae.encoders.base import GeneCoverage
from perturbedvae.errors import ConfigError

logger = logging.getLogger(__name__)


@lru_cache(maxsize=16)
def load_pickle_dictionary(path: Path) -> dict[Any, Any]:
    """Load a pickled dict from a user-named vocabulary path (cached: the V2 dictionaries take seconds)."""
    warnings.warn(
        f"unpickling {path}: pickles can execute code, so only use vocabulary files you trust "
        "(the Geneformer dictionaries from its model repository)",
        UserWarning,
        stacklevel=2,
    )
    try:
        with open(path, "rb") as handle:
            value = pickle.load(handle)
    except (OSError, pickle.UnpicklingError, EOFError) as error:
        raise ConfigError(f"{path} could not be read as a pickled dictionary ({error}); re-download the file") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} holds a {type(value).__name__}, expected a dictionary")
    return value


def load_json_dictionary(path: Path) -> dict[str, Any]:
    """Load a JSON object (gene -> token id, gene -> median) with a clear error for anything else."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} could not be read as JSON ({error})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must hold a JSON object mapping genes to values")
    return value


def measure_coverage(genes: Sequence[str], perturbed_genes: Sequence[str], known: Collection[str]) -> GeneCoverage:
    """Count the dataset genes and perturbed genes present in `known` (the genes an encoder can read)."""
    covered = sum(gene in known for gene in genes)
    missing = [gene for gene in perturbed_genes if gene not in known]
    return GeneCoverage(len(genes), covered, len(perturbed_genes), len(perturbed_genes) - len(missing), missing)


def coverage_report(coverage: GeneCoverage, encoder_name: str) -> dict[str, Any]:
    """JSON-ready summary of a coverage, with the fractions spelled out."""
    return {
        "encoder": encoder_name,
        **asdict(coverage),
        "fraction": round(coverage.fraction, 4),
        "perturbed_fraction": round(coverage.perturbed_fraction, 4),
    }


def check_coverage(
    coverage: GeneCoverage,
    encoder_name: str,
    min_fraction: float = 0.0,
    min_perturbed_fraction: float = 0.0,
    report_path: str | Path | None = None,
) -> dict[str, Any]:
    """Log (and optionally save) the coverage report; raise when it is below the thresholds.

    Raises:
        ConfigError: when the covered fraction of genes or of perturbed genes is below its threshold.
    """
    report = coverage_report(coverage, encoder_name)
    logger.info(
        f"{encoder_name}: vocabulary covers {coverage.n_covered}/{coverage.n_genes} genes "
        f"({coverage.fraction:.1%}) and {coverage.n_perturbed_covered}/{coverage.n_perturbed} perturbed genes"
        + (f" (missing: {', '.join(coverage.missing_perturbed[:10])})" if coverage.missing_perturbed else "")
    )
    if report_path is not None:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(report, indent=2) + "\n")
    problems = []
    if coverage.fraction < min_fraction:
        problems.append(f"{coverage.fraction:.1%} of genes covered, below min_gene_coverage {min_fraction:.0%}")
    if coverage.perturbed_fraction < min_perturbed_fraction:
        problems.append(
            f"{coverage.perturbed_fraction:.1%} of perturbed genes covered, below min_perturbed_coverage "
            f"{min_perturbed_fraction:.0%}"
        )
    if problems:
        raise ConfigError(
            f"{encoder_name}: " + "; ".join(problems) + ". Check that var_names use the gene naming the vocabulary "
            "expects (symbols or Ensembl ids; load_dataset(gene_symbol_key=...)) or lower the threshold in the card"
        )
    return report

