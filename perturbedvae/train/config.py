"""The experiment configuration: one YAML file says everything a training run needs.

A run is reproducible from its `config.yaml` alone, so every choice lives here, checked once on load:
an unknown key or a value of the wrong type is a `ConfigError` naming the dotted key (`train.lr`) before
any data is read. Command-line overrides use the same dotted keys (`model.n_latent=16 train.epochs=3`),
their values parsed as YAML scalars/lists (`true`, `null`, `[a, b]`).

Relative paths: inside a YAML file they are relative to *that file's directory* (a config keeps
working wherever it is launched from); in command-line overrides they are relative to the *current
working directory*. `output.run_dir` is the exception: a relative run directory always lands under the
current working directory, where the user launched the run. The saved `config.yaml` holds absolute paths.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from perturbedvae.checks import check_number
from perturbedvae.data.gene_features import SOURCES as GENE_FEATURE_SOURCES
from perturbedvae.errors import ConfigError, close_matches, did_you_mean
from perturbedvae.model.config import PerturbedVAEConfig
from perturbedvae.yaml_files import parse_value, read_yaml_mapping

DERIVED_MODEL_FIELDS = ("n_input", "n_genes", "n_perturbations", "n_covariate_levels")
"""PerturbedVAEConfig fields the trainer takes from the data, never from the YAML."""

INPUT_PATH_KEYS = (
    "data.path", "split.path", "representation.adapter", "representation.checkpoint", "representation.vocab_dir",
    "representation.cache_dir", "gene_features.table",
)
OUTPUT_PATH_KEYS = ("output.run_dir",)


@dataclass
class DataConfig:
    """Which cells and genes to read (arguments of `perturbedvae.data.loading.load_dataset`).

    Exactly one of `path` (an .h5ad file) and `synthetic` (fields of `SimulationConfig`, simulated in
    memory at the start of the run) is set. `de_method`/`n_de_genes` pick the DE genes of the metrics.
    `backed` leaves expression in the file and reads it per batch (memory bounded by the batch, for
    screens too large for memory; representation kinds expression and obsm). `counts` overrides the
    detection of raw counts: null detects, true requires X to be counts, false reads X as log-normalized.

    Attributes:
        path: The .h5ad file (relative to the config file).
        synthetic: Fields of `perturbedvae.data.synthetic.SimulationConfig`: a screen simulated in memory.
        condition_key: obs column holding each cell's condition.
        control_labels: Labels of control cells (default `control`, `ctrl`, `non-targeting`).
        delimiter: Separator of the genes of a combination.
        obs_filter: Keep only cells whose obs columns equal these values, e.g. `{dataset: norman19}`.
        n_top_genes: Keep this many highly variable genes, plus every measured perturbed gene.
        min_cells: Conditions with fewer cells get a warning (their metrics are noisy).
        gene_symbol_key: var column with gene symbols to use as gene names (default: var_names).
        de_method: Test ranking the DE genes of the `_de` metrics: `t-test` or `wilcoxon`.
        n_de_genes: Number of DE genes per condition in the `_de` metrics.
        backed: Leave expression in the file and read it per batch or chunk.
        counts: Raw counts in X: null detects, true requires them, false reads X as log-normalized.
        covariate_keys: obs column(s) of a covariate (cell line, stimulation) for the transfer task
            (`perturbedvae transfer`, `perturbedvae.data.covariates`).
    """

    path: str | None = None
    synthetic: dict[str, Any] | None = None
    condition_key: str = "condition"
    control_labels: list[str] | None = None
    delimiter: str = "+"
    obs_filter: dict[str, Any] | None = None
    n_top_genes: int | None = None
    min_cells: int = 10
    gene_symbol_key: str | None = None
    de_method: str = "t-test"
    n_de_genes: int = 20
    backed: bool = False
    counts: bool | None = None
    covariate_keys: list[str] | None = None

    def require_source(self) -> None:
        """Fail unless the config names its data: a model trained on an in-memory AnnData saves no path.

        Raises:
            ConfigError: naming both ways to give the data.
        """
        if self.path is None and self.synthetic is None:
            raise ConfigError(
                "set exactly one of data.path (an .h5ad file) and data.synthetic (simulation settings); a model "
                "trained from an in-memory AnnData names neither: load it with perturbedvae.PerturbedVAE.load(dir, data)"
            )


@dataclass
class SplitConfig:
    """How conditions are split: a scheme of `make_split` with its params, or a saved split.json (`path`).

    Attributes:
        scheme: `doubles`, `gears`, `custom`, `lodo`, `kfold` or `singles_only`.
        seed: Seed of the scheme's random draws.
        params: The scheme's parameters, e.g. `{test_fraction: 0.4, unseen_combos: train}`, `{column: split}`.
        path: A split.json to use instead (`perturbedvae split ... --out`).
    """

    scheme: str = "doubles"
    seed: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


@dataclass
class RepresentationConfig:
    """What the head reads as a cell's representation `h`.

    kind "expression": log-normalized X, projected on `n_components` principal components of the
    training cells when set; "obsm": `adata.obsm[obsm_key]`; "encoder": a cell encoder built from the
    adapter card `adapter`, weights `checkpoint` and vocabulary `vocab_dir` (default: the card's rules).

    A frozen encoder embeds every cell once into the embedding cache under `cache_dir` (default
    ~/.cache/perturbedvae/embeddings), keyed by data and encoder fingerprints so later runs reuse it;
    `cache_embeddings: false` runs the frozen backbone inside every training step instead (slower; it
    exists to measure what the cache saves). `finetune: lora` trains rank-`lora_r` adapters on the
    card's target modules together with the head, end to end.

    Attributes:
        kind: `expression`, `obsm` or `encoder`.
        n_components: Principal components of the training cells' expression (kind expression; null: all genes).
        obsm_key: The `adata.obsm` entry to read (kind obsm).
        adapter: Adapter card of the encoder (kind encoder), e.g. adapters/geneformer-v1.yaml.
        checkpoint: Encoder weights directory (default: the card's).
        vocab_dir: Vocabulary directory (default: the card's rules, then `../shared/vocab`).
        pooling: How token outputs become a cell embedding, overriding the card's: `mean` (over gene
            tokens), `cls` (the first token) or `max` (per dimension over gene tokens); null: the card's.
        finetune: `frozen` (embeddings cached once) or `lora` (adapters trained with the head).
        cache_dir: Embedding cache of frozen encoders (default ~/.cache/perturbedvae/embeddings).
        cache_embeddings: Read frozen embeddings from the cache (false: run the backbone in every step).
        lora_r: Rank of the LoRA adapters.
        lora_alpha: LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).
        lora_dropout: Dropout on the LoRA path.
        embed_batch_size: Cells per encoder call when embedding or predicting.
    """

    kind: Literal["expression", "obsm", "encoder"] = "expression"
    n_components: int | None = None
    obsm_key: str | None = None
    adapter: str | None = None
    checkpoint: str | None = None
    vocab_dir: str | None = None
    pooling: Literal["mean", "cls", "max"] | None = None
    finetune: Literal["frozen", "lora"] = "frozen"
    cache_dir: str | None = None
    cache_embeddings: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    embed_batch_size: int = 64


@dataclass
class GeneFeaturesConfig:
    """Where the features of perturbation genes come from (see `perturbedvae.data.gene_features`).

    With `sources` set, effects are a network of gene features, so held-out genes those sources cover are
    predicted; `model.gene_feature_dim` is then the assembled width, derived, not set. `coexpression` (the
    gene's row of a rank-`n_components` factor of the gene-gene correlation over the training cells),
    `encoder` (the encoder's gene embeddings; representation.kind encoder), `table` (the file `table`).
    """

    sources: list[str] = field(default_factory=list)
    n_components: int = 16
    table: str | None = None


@dataclass
class TrainConfig:
    """Optimisation. Warm-ups are linear over epochs; `checkpoint_every: 0` saves no checkpoints.

    `mixed_precision: null` takes the launcher's setting (`accelerate launch --mixed_precision` or the
    accelerate config file), "no" when launched without one; a value here overrides the launcher.

    `n_control_cells` control cells (a fixed seeded subset) are the starting points of every
    counterfactual prediction, in validation and in `predict_conditions`.

    `selection` picks the kept epoch: "val_conditions" (the split's validation conditions, by
    pearson_delta_de), "held_out_cells" (a seeded `held_out_fraction` of the cells of every training
    condition leaves training; each condition's counterfactual prediction is scored by its mean squared
    error against their mean) or "last" (the last epoch: a fixed epoch count). With one or two
    validation combinations the first stops by noise; the benchmark uses the second.

    Attributes:
        epochs: Epochs at most (early stopping may end sooner).
        batch_size: Training cells per batch (per process).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        kl_warmup_epochs: Epochs over which the KL weight rises linearly from 0.
        sparsity_warmup_epochs: Epochs over which the mask sparsity weight rises linearly from 0.
        mixed_precision: `no`, `bf16` or `fp16`; null takes the launcher's setting.
        gradient_accumulation_steps: Batches per optimizer step.
        seed: Seed of initialisation, batch order, held-out cells and control cells.
        early_stopping_patience: Stop after this many evaluations without improvement (null: never).
        eval_every: Epochs between validations.
        checkpoint_every: Epochs between Accelerate checkpoints (0: none).
        max_grad_norm: Gradient norm clipping (null: no clipping).
        n_control_cells: Control cells every counterfactual prediction starts from.
        selection: How the kept epoch is chosen: `val_conditions`, `held_out_cells` or `last`.
        held_out_fraction: Fraction of each training condition's cells held out (selection held_out_cells).
        shuffle_block: Consecutive training cells (file order) shuffled as one run: 1 shuffles every
            cell; 16 lets a backed batch read 32 contiguous spans of the file instead of 512 scattered
            rows (see `EpochShuffleSampler`).
        prefetch_batches: Batches a background thread collates ahead while the step runs (0: none;
            `datamodule.prefetched`); the batches and results are the same either way.
        compile: Compile the training step with `torch.compile` (inductor) through Accelerate's dynamo
            plugin, as `accelerate launch --dynamo_backend inductor` does (false leaves the launcher's
            choice). The first epoch pays the compilation (46-139 s measured on a CPU core) and a batch of
            a new shape a recompilation; on CPU the compiled step was at most a few percent faster (README,
            "Speed"), so it is off by default.
    """

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    kl_warmup_epochs: int = 5
    sparsity_warmup_epochs: int = 5
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    gradient_accumulation_steps: int = 1
    seed: int = 0
    early_stopping_patience: int | None = None
    eval_every: int = 1
    checkpoint_every: int = 0
    max_grad_norm: float | None = 10.0
    n_control_cells: int = 1000
    selection: Literal["val_conditions", "held_out_cells", "last"] = "val_conditions"
    held_out_fraction: float = 0.1
    shuffle_block: int = 1
    prefetch_batches: int = 0
    compile: bool = False


@dataclass
class OutputConfig:
    """Where a run is written.

    Attributes:
        run_dir: The run directory (relative to where the run is launched).
        overwrite: Replace a finished run in `run_dir` (otherwise refused).
    """

    run_dir: str = "runs/run"
    overwrite: bool = False


@dataclass
class ExperimentConfig:
    """A whole experiment. `model` holds PerturbedVAEConfig fields except the data-derived shapes."""

    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    representation: RepresentationConfig = field(default_factory=RepresentationConfig)
    gene_features: GeneFeaturesConfig = field(default_factory=GeneFeaturesConfig)
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        self.model = _complete_model_section(self.model)
        _check_consistency(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ExperimentConfig:
        """Build from a nested mapping; unknown keys and wrong types are ConfigErrors naming the key."""
        return _build(cls, values, prefix="")

    def model_config(self, n_input: int, n_genes: int, n_perturbations: int, gene_feature_dim: int | None = None,
                     n_covariate_levels: int = 0) -> PerturbedVAEConfig:
        """The head's config; `gene_feature_dim` is the width of the assembled gene features, when there are any,
        `n_covariate_levels` the number of covariate levels the data module carries (0: none)."""
        values = {**self.model, "gene_feature_dim": gene_feature_dim} if gene_feature_dim is not None else self.model
        return PerturbedVAEConfig(n_input=n_input, n_genes=n_genes, n_perturbations=n_perturbations,
                                  n_covariate_levels=n_covariate_levels, **values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment config and apply `key=value` overrides (see the module docstring for paths)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "config file", "pass a YAML config of sections (data, split, model, train, ...), e.g. configs/synthetic_tiny.yaml")
    _resolve_paths(raw, INPUT_PATH_KEYS, base=path.resolve().parent)
    _resolve_paths(raw, OUTPUT_PATH_KEYS, base=Path.cwd())
    for key, value in parse_overrides(overrides).items():
        _set_dotted(raw, key, value)
        if key in INPUT_PATH_KEYS + OUTPUT_PATH_KEYS:
            _resolve_paths(raw, (key,), base=Path.cwd())
    return ExperimentConfig.from_dict(raw)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`["model.n_latent=16", "data.control_labels=[ctrl]"]` -> `{"model.n_latent": 16, ...}`."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.epochs=3")
        try:
            parsed[key] = parse_value(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({error})") from error
    return parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _resolve_paths(raw: dict[str, Any], keys: Sequence[str], base: Path) -> None:
    for key in keys:
        section_name, name = key.split(".")
        section = raw.get(section_name)
        if isinstance(section, dict) and isinstance(section.get(name), str):
            section[name] = str((base / Path(section[name]).expanduser()).resolve())


def _build(cls: type, values: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, checking keys and value types recursively."""
    where = prefix.rstrip(".") or "the config"
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [item.name for item in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}{key}{did_you_mean(key, names, prefix)}")
    kwargs = {}
    for key, value in values.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, kind)
    return cls(**kwargs)


def _check_type(key: str, value: Any, kind: Any) -> Any:
    """Return `value` (ints widened to float where a float is expected) or raise a ConfigError."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _check_type(key, value, inner[0]) if len(inner) == 1 else value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = origin or kind
    ok = isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key} must be of type {_type_name(kind)}, got {value!r} ({type(value).__name__})")
    if origin is list and args:
        return [_check_type(f"{key}[{index}]", item, args[0]) for index, item in enumerate(value)]
    return value


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _complete_model_section(model: Mapping[str, Any]) -> dict[str, Any]:
    """Fill model defaults from PerturbedVAEConfig and validate the values with it (shapes are dummies)."""
    if not isinstance(model, Mapping):
        raise ConfigError(f"model must be a mapping of PerturbedVAEConfig fields, got {model!r}")
    fields = {item.name: item for item in dataclasses.fields(PerturbedVAEConfig) if item.name not in DERIVED_MODEL_FIELDS}
    for key in model:
        if key in DERIVED_MODEL_FIELDS:
            raise ConfigError(f"model.{key} is derived from the data; remove it from the config")
        if key not in fields:
            raise ConfigError(f"unknown config key model.{key}{did_you_mean(key, fields, 'model.')}")
    completed = {name: model.get(name, item.default) for name, item in fields.items()}
    try:
        PerturbedVAEConfig(n_input=1, n_genes=1, n_perturbations=1, **completed)
    except ConfigError as error:
        raise ConfigError(f"model.{error}") from None
    return completed


def _check_consistency(config: ExperimentConfig) -> None:
    data, representation, train = config.data, config.representation, config.train
    if data.path is not None and data.synthetic is not None:
        raise ConfigError("set exactly one of data.path (an .h5ad file) and data.synthetic (simulation settings)")
    if representation.kind == "obsm" and not representation.obsm_key:
        raise ConfigError("representation.kind obsm needs representation.obsm_key, the obsm entry to read")
    if representation.kind == "encoder" and not representation.adapter:
        raise ConfigError("representation.kind encoder needs representation.adapter, the path of an adapter card")
    _check_gene_features(config)
    if data.covariate_keys and config.split.scheme != "transfer":
        raise ConfigError("data.covariate_keys is read by the transfer task only (split.scheme transfer, perturbedvae transfer); "
                          "other runs do not condition on covariates: remove it, or filter cells with data.obs_filter")
    if config.model.get("covariate_inputs") and config.split.scheme != "transfer":
        raise ConfigError("model.covariate_inputs conditions the head on data.covariate_keys, which only the transfer task "
                          "reads (split.scheme transfer, perturbedvae transfer); remove it")
    positive = {
        "train.epochs": train.epochs,
        "train.batch_size": train.batch_size,
        "train.gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train.eval_every": train.eval_every,
        "train.n_control_cells": train.n_control_cells,
        "train.shuffle_block": train.shuffle_block,
        "data.n_de_genes": data.n_de_genes,
        "representation.embed_batch_size": representation.embed_batch_size,
    }
    optional_positive = {
        "representation.n_components": representation.n_components,
        "train.early_stopping_patience": train.early_stopping_patience,
        "data.n_top_genes": data.n_top_genes,
        "representation.lora_r": representation.lora_r,
    }
    for key, value in {**positive, **optional_positive}.items():
        if value is not None:
            check_number(key, value, low=1)
    non_negative = {
        "train.weight_decay": train.weight_decay,
        "train.kl_warmup_epochs": train.kl_warmup_epochs,
        "train.sparsity_warmup_epochs": train.sparsity_warmup_epochs,
        "train.checkpoint_every": train.checkpoint_every,
        "train.seed": train.seed,
        "train.prefetch_batches": train.prefetch_batches,
        "data.min_cells": data.min_cells,
    }
    for key, value in non_negative.items():
        check_number(key, value, low=0)
    check_number("train.lr", train.lr, low=0, low_open=True)
    if train.max_grad_norm is not None:  # null: no clipping
        check_number("train.max_grad_norm", train.max_grad_norm, low=0, low_open=True)
    if train.prefetch_batches and train.gradient_accumulation_steps > 1:
        raise ConfigError("train.prefetch_batches needs train.gradient_accumulation_steps 1: Accelerate ends an accumulation "
                          "window when its loader runs out, which a prefetching loader does early")
    check_number("train.held_out_fraction", train.held_out_fraction, low=0, high=1, low_open=True, high_open=True)
    check_number("representation.lora_dropout", representation.lora_dropout, low=0, high=1, high_open=True)


def _check_gene_features(config: ExperimentConfig) -> None:
    features, model = config.gene_features, config.model
    sources = features.sources
    if ("table" in sources) != (features.table is not None):
        raise ConfigError("gene_features.table (a genes × features file) and the source 'table' go together: set both or neither")
    if not sources:
        if model["gene_feature_dim"] is not None:
            raise ConfigError("model.gene_feature_dim is derived from the gene features: set gene_features.sources "
                              f"(any of {', '.join(GENE_FEATURE_SOURCES)}, e.g. [encoder]) and remove model.gene_feature_dim")
        return
    unknown = [source for source in sources if source not in GENE_FEATURE_SOURCES]
    if unknown:
        close = close_matches(str(unknown[0]), GENE_FEATURE_SOURCES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"gene_features.sources: unknown source {unknown[0]!r}{hint}; choose from {', '.join(GENE_FEATURE_SOURCES)}")
    if len(set(sources)) != len(sources):
        raise ConfigError("gene_features.sources names a source more than once")
    if model["gene_feature_dim"] is not None:
        raise ConfigError("model.gene_feature_dim is derived from gene_features.sources; remove it from the config")
    if model["composition"] != "latent_sum":
        raise ConfigError("gene_features need model.composition latent_sum (the mechanism design has no gene-feature network)")
    if "encoder" in sources and config.representation.kind != "encoder":
        raise ConfigError("gene_features source 'encoder' needs representation.kind encoder (its gene embeddings)")
    check_number("gene_features.n_components", features.n_components, low=1)
