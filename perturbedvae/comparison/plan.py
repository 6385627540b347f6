"""A compare config read and checked: the base experiment, the variants, the seeds and the report settings."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from perturbedvae.errors import ConfigError, did_you_mean
from perturbedvae.evaluate.baselines import BASELINES
from perturbedvae.train.config import INPUT_PATH_KEYS, ExperimentConfig, load_config, parse_overrides
from perturbedvae.yaml_files import read_yaml_mapping

COMPARE_PREFIX = "compare."
EMBEDDING_METHODS = ("umap", "pca")


@dataclass
class CompareSettings:
    """The `compare:` section.

    Attributes:
        seeds: Training seeds (`train.seed`); the split stays the base config's.
        baselines: Baselines shown beside the variants (names of `perturbedvae.evaluate.baselines.BASELINES`).
        out_dir: Report directory, relative to where the command runs.
        overwrite: Replace an existing report directory.
        embedding: "umap" (scanpy; needs umap-learn) or "pca" for the latent-space figure.
        embedding_cells: Cells (a seeded random subset) drawn in the latent-space figure.
        program_genes: Genes per latent program in the program figure and table.
        max_programs: Active latent dimensions shown at most, strongest first.
    """

    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    out_dir: str = "runs/compare"
    overwrite: bool = False
    embedding: str = "umap"
    embedding_cells: int = 2000
    program_genes: int = 10
    max_programs: int = 12

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(not isinstance(seed, int) or seed < 0 for seed in self.seeds):
            raise ConfigError(f"compare.seeds must be distinct non-negative integers, e.g. [1, 2, 3]; got {self.seeds!r}")
        unknown = [name for name in self.baselines if name not in BASELINES]
        if unknown:
            raise ConfigError(f"compare.baselines: unknown {', '.join(map(str, unknown))}; choose from {', '.join(BASELINES)}")
        if self.embedding not in EMBEDDING_METHODS:
            raise ConfigError(f"compare.embedding must be one of {', '.join(EMBEDDING_METHODS)}, got {self.embedding!r}")
        for name in ("embedding_cells", "program_genes", "max_programs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"compare.{name} must be a positive integer, got {value!r}")


@dataclass
class ComparePlan:
    """A loaded compare config: what to train and where to write."""

    path: Path
    experiment: Path
    overrides: list[str]
    variants: dict[str, list[str]]
    settings: CompareSettings
    text: str = ""
    configs: dict[tuple[str, int], ExperimentConfig] = field(default_factory=dict)

    def experiment_config(self, variant: str, seed: int) -> ExperimentConfig:
        """The experiment of one variant and seed, writing its run under the report directory.

        Read once, when the plan is loaded: a long comparison keeps its settings even if a config file
        is edited while it runs.
        """
        if (variant, seed) not in self.configs:
            run_dir = Path(self.settings.out_dir) / "runs" / variant / f"seed_{seed}"
            self.configs[(variant, seed)] = load_config(self.experiment, [
                *self.overrides, *self.variants[variant], f"train.seed={seed}", f"output.run_dir={run_dir}", "output.overwrite=true"])
        return self.configs[(variant, seed)]


def load_compare_config(path: str | Path, overrides: Sequence[str] = ()) -> ComparePlan:
    """Read a compare YAML; `compare.KEY=VALUE` overrides settings, other `section.key=value` every variant.

    Raises:
        ConfigError: a missing file or key, an unknown key, a bad setting, or a variant that does not
            make a valid experiment config (checked now, before anything trains).
    """
    path = Path(path)
    raw = read_yaml_mapping(path, "compare config", "pass e.g. configs/compare_norman.yaml")
    _check_keys(raw, ("experiment", "overrides", "variants", "compare"), "the compare config")
    if not raw.get("experiment"):
        raise ConfigError(f"{path}: set `experiment:` to the base experiment config, e.g. norman_subset.yaml")
    base = path.resolve().parent
    experiment = (base / str(raw["experiment"])).resolve()
    variants_raw = raw.get("variants") or {"standalone": {}}
    if not isinstance(variants_raw, Mapping):
        raise ConfigError(f"{path}: variants must map a name to overrides, e.g. {{standalone: {{}}}}")
    variants = {str(name): _override_strings(values or {}, base, f"variants.{name}") for name, values in variants_raw.items()}
    settings_raw = dict(raw.get("compare") or {})
    command_line = parse_overrides(overrides)
    settings_raw.update({key[len(COMPARE_PREFIX):]: value for key, value in command_line.items() if key.startswith(COMPARE_PREFIX)})
    _check_keys(settings_raw, [item.name for item in dataclasses.fields(CompareSettings)], "compare")
    settings = CompareSettings(**settings_raw)
    common = _override_strings(raw.get("overrides") or {}, base, "overrides")
    common += [item for item in overrides if not item.partition("=")[0].strip().startswith(COMPARE_PREFIX)]
    plan = ComparePlan(path.resolve(), experiment, common, variants, settings, path.read_text())
    for variant in variants:
        try:
            for seed in settings.seeds:
                plan.experiment_config(variant, seed)
        except ConfigError as error:
            raise ConfigError(f"variant {variant!r}: {error}") from None
    return plan


def _check_keys(values: object, allowed: Sequence[str], where: str) -> None:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    for key in values:
        if key not in allowed:
            raise ConfigError(f"unknown key {key!r} in {where}{did_you_mean(key, allowed)}")


def _override_strings(values: object, base: Path, where: str) -> list[str]:
    """`{representation.adapter: x.yaml}` -> `["representation.adapter=/abs/x.yaml"]` (paths relative to `base`)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must map dotted keys to values, e.g. {{representation.kind: encoder}}")
    strings = []
    for key, value in values.items():
        if key in INPUT_PATH_KEYS and isinstance(value, str):
            value = str((base / Path(value).expanduser()).resolve())
        strings.append(f"{key}={json.dumps(value)}")
    return strings



__all__ = ["ComparePlan", "CompareSettings", "load_compare_config"]
