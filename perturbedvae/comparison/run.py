"""The comparison's orchestration: every variant × seed trained, metered and predicted, then one report."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from perturbedvae.comparison.metering import ResourceMeter
from perturbedvae.comparison.plan import load_compare_config
from perturbedvae.comparison.sections import write_report
from perturbedvae.comparison.trained import TestPredictions, VariantResult, train_and_predict
from perturbedvae.errors import ConfigError
from perturbedvae.processes import is_main_process


def run_compare(config_path: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Train every variant × seed of a compare config, score them beside the baselines, write the report.

    Works in one process or under `accelerate launch` (training uses every process; the main one
    predicts and writes). Returns the report directory.

    Raises:
        ConfigError: a bad compare config, an existing report directory without compare.overwrite=true,
            or variants that change the data or the split (they must be scored on the same conditions).
    """
    started = time.perf_counter()
    plan = load_compare_config(config_path, overrides)
    out = Path(plan.settings.out_dir)
    _prepare_out_dir(out, plan.settings.overwrite)
    results: dict[str, VariantResult] = {}
    first: TestPredictions | None = None
    for variant in plan.variants:
        result = results[variant] = VariantResult()
        for seed in plan.settings.seeds:
            with ResourceMeter() as meter:
                trained = train_and_predict(plan.experiment_config(variant, seed))
            if trained is None:
                continue
            first = first or trained
            _check_same_scoring(first, trained, variant)
            result.predictions[seed] = trained.predictions
            result.groups[seed] = trained.groups
            result.run_infos[seed] = trained.run_info
            result.logs.append(trained.training_log().assign(model=variant, seed=seed))
            result.seconds += meter.seconds
            result.cpu_seconds += meter.cpu_seconds
            result.peak_rss_mb = max(result.peak_rss_mb, meter.peak_rss_mb)
            result.peak_is_lifetime |= not meter.block_peak
            if result.views is None:
                result.views = trained.model.latent_views(plan.settings.embedding_cells, plan.settings.max_programs, seed)
    if first is not None:
        write_report(plan, first, results, out, time.perf_counter() - started, list(overrides))
    return out


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix two comparisons in one directory; the main process clears it when asked to.

    No Accelerator exists yet, so `is_main_process` reads the launcher's RANK.
    """
    existing = [out / name for name in ("report.md", "report.html", "metrics.csv", "figures", "runs") if (out / name).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{out} already holds a comparison; choose another compare.out_dir or pass compare.overwrite=true")
    if is_main_process():
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _check_same_scoring(first: TestPredictions, other: TestPredictions, variant: str) -> None:
    if other.model.data.fingerprint != first.model.data.fingerprint or other.model.split.to_dict() != first.model.split.to_dict():
        raise ConfigError(f"variant {variant!r} changes the data or the split; variants may only change the representation, "
                          "model and training, so that all are scored on the same held-out conditions")


__all__ = ["run_compare"]
