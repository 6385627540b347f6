"""Run directories: everything one training run produced, in one folder a user can keep or share.

    <run_dir>/config.yaml        the full experiment config (absolute paths), enough to redo the run
    <run_dir>/split.json         the split it trained on
    <run_dir>/representation.npz the PCA basis of the inputs (only for representation.n_components)
    <run_dir>/model/             the head, `PerturbedVAEHead.save_pretrained`
    <run_dir>/adapters/          LoRA adapters of the encoder (representation.finetune lora), PEFT format
    <run_dir>/log.jsonl          one line per epoch: losses, loss weights, validation metrics
    <run_dir>/metrics.json       final evaluation on the test conditions (+ the evaluator's tidy table)
    <run_dir>/run_info.json      world size, precision, seed, versions, throughput, wall time
    <run_dir>/checkpoints/       Accelerate states every `train.checkpoint_every` epochs (for --resume)

`perturbedvae.api.fitting.train_from_config` makes one (it scores, so it sits above training and
evaluation), `load_run` reads it back, `predict_conditions` answers "what would these perturbations do?"
from it. `build_datamodule` and `new_module` make what the trainer is given.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from perturbedvae.data.conditions import check_known_genes, genes_of
from perturbedvae.data.loading import PerturbationData, load_dataset
from perturbedvae.data.splits import ROLES, Split, make_split
from perturbedvae.errors import CheckpointError, ConditionError, ConfigError
from perturbedvae.model import PerturbedVAEHead, PerturbedVAEModule
from perturbedvae.predictions import Predictions
from perturbedvae.train.config import DataConfig, ExperimentConfig, SplitConfig, load_config
from perturbedvae.train.datamodule import PerturbationDataModule, hold_out_cells
from perturbedvae.train.initialization import initialize_head, initialize_inputs
from perturbedvae.train.predict import predict_from_controls
from perturbedvae.train.representation import ADAPTERS_DIR, PCA_FILE, attach_encoder, build_representation
from perturbedvae.train.unseen_genes import with_gene_features

MODEL_NAME = "perturbedvae"
"""Name of the head's predictions in metrics.json (baselines sit beside it under their own names)."""

RESUME_MAY_CHANGE = ("train.epochs", "output.run_dir", "output.overwrite")
"""Config keys a resumed run may change; any other difference would make the resumed run another run."""


@dataclass(frozen=True)
class RunLayout:
    """Paths inside a run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def run_info(self) -> Path:
        return self.root / "run_info.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def representation(self) -> Path:
        return self.root / PCA_FILE

    @property
    def adapters(self) -> Path:
        return self.root / ADAPTERS_DIR

    def existing_outputs(self) -> list[Path]:
        candidates = [self.config, self.split, self.model, self.log, self.metrics, self.run_info, self.checkpoints,
                      self.representation, self.adapters]
        return [path for path in candidates if path.exists()]


def load_data(config: DataConfig) -> PerturbationData:
    """Read (or simulate, for `data.synthetic`) and validate the dataset a config names."""
    config.require_source()
    source = config.path
    if config.synthetic is not None:
        from perturbedvae.data.synthetic import SimulationConfig, simulate

        try:
            source = simulate(SimulationConfig(**config.synthetic))
        except TypeError as error:
            raise ConfigError(f"data.synthetic: {error}; use fields of SimulationConfig") from None
    return load_dataset(
        source,
        condition_key=config.condition_key,
        control_labels=config.control_labels,
        delimiter=config.delimiter,
        obs_filter=config.obs_filter,
        gene_symbol_key=config.gene_symbol_key,
        n_top_genes=config.n_top_genes,
        min_cells=config.min_cells,
        backed=config.backed,
        counts=config.counts,
    )


def load_or_make_split(config: SplitConfig, data: PerturbationData) -> Split:
    return Split.load(config.path) if config.path else make_split(data, config.scheme, seed=config.seed, **config.params)


def build_datamodule(config: ExperimentConfig, data: PerturbationData, split: Split, run_dir: Path | None = None) -> PerturbationDataModule:
    """Representation + targets + vocabulary; with `run_dir`, the saved PCA basis or adapters are reused.

    With `train.selection: held_out_cells` the held-out cells leave the training cells, the PCA fit too.
    """
    held_out_fraction = config.train.held_out_fraction if config.train.selection == "held_out_cells" else 0.0
    train_cells, _ = hold_out_cells(data, split.train, held_out_fraction, config.train.seed)
    representation = build_representation(config.representation, data, train_cells, run_dir)
    reference_controls = config.model["reference_controls"] if config.model["composition"] == "mechanism" else 0
    datamodule = PerturbationDataModule.build(
        data, split, representation, config.model["likelihood"], held_out_fraction=held_out_fraction, seed=config.train.seed,
        reference_controls=reference_controls,
    )
    return with_gene_features(config, datamodule)


def new_module(config: ExperimentConfig, datamodule: PerturbationDataModule) -> torch.nn.Module:
    """A new head drawn from `train.seed`, joined to the encoder backbone when the representation runs in the loop.

    The seed is set here, right before the weights are drawn (the trainer seeds nothing), so one seeded
    stream runs from them through every training step. A mechanism head starts from the SVD fit of the
    measured singles. The backbone is the representation's own module (shared, not copied), so what
    trains in it is what later predictions and the saved adapters use.
    """
    features = None if datamodule.gene_features is None else torch.from_numpy(datamodule.gene_features.values)
    head_config = config.model_config(
        n_input=datamodule.representation.dim,
        n_genes=len(datamodule.data.genes),
        n_perturbations=len(datamodule.perturbation_genes),
        gene_feature_dim=None if features is None else features.shape[1],
        n_covariate_levels=datamodule.n_covariate_levels,
    )
    set_seed(config.train.seed)
    head = PerturbedVAEModule(head_config, gene_features=features)
    module = attach_encoder(datamodule.representation, head)
    if head_config.standardize_inputs:
        initialize_inputs(head, datamodule, config.train.seed)
    if head_config.composition == "mechanism":
        initialize_head(head, datamodule, config.train.seed)
    return module


def save_head(head: PerturbedVAEModule, datamodule: PerturbationDataModule, directory: Path) -> None:
    """`PerturbedVAEHead.save_pretrained` of a trained head with the vocabulary and genes it predicts."""
    PerturbedVAEHead(head.config, head, datamodule.perturbation_genes, datamodule.data.genes).save_pretrained(directory)


MIN_FREE_BYTES = 200 * 2**20
"""Free disk a run needs before it starts (checkpoints, the head, logs; embeddings are cached elsewhere)."""


def check_writable(root: Path, min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """Fail before any data is loaded when `root` cannot be written or its disk is (nearly) full.

    Raises:
        ConfigError: naming the folder and what to do.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".perturbedvae_write_test"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"cannot write to output.run_dir {root} ({error.strerror or error}); choose a writable folder") from None
    free = shutil.disk_usage(root).free
    if free < min_free_bytes:
        raise ConfigError(
            f"only {free / 2**20:.0f} MiB free under {root}; a run needs at least {min_free_bytes / 2**20:.0f} MiB "
            "(checkpoints, model, logs): free some space or choose another output.run_dir"
        )


def _prepare_run_dir(layout: RunLayout, config: ExperimentConfig, resume: bool) -> None:
    check_writable(layout.root)
    existing = layout.existing_outputs()
    if resume:
        if layout.config.is_file():
            _check_resumable(load_config(layout.config), config)
        return
    if existing and not config.output.overwrite:
        raise ConfigError(
            f"{layout.root} already holds a run ({', '.join(path.name for path in existing)}); choose another "
            "output.run_dir, pass output.overwrite=true to replace it, or --resume to continue it"
        )
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_resumable(saved: ExperimentConfig, current: ExperimentConfig) -> None:
    before, after = _flatten(saved.to_dict()), _flatten(current.to_dict())
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key) and key not in RESUME_MAY_CHANGE)
    if changed:
        raise CheckpointError(
            f"cannot resume: the config differs from the run's config.yaml in {', '.join(changed)}; "
            "resume with the same config (only train.epochs may change) or start a new run"
        )


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and prefix.count(".") < 1:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass
class LoadedRun:
    """A finished run: its config, split, trained head and the data to start predictions from.

    `predictor` is what predictions run: the head, or the encoder with its trained adapters + the head
    when the run fine-tuned its encoder.
    """

    run_dir: Path
    config: ExperimentConfig
    split: Split
    model: PerturbedVAEHead
    datamodule: PerturbationDataModule
    predictor: torch.nn.Module

    def predict(self, conditions: Sequence[str], per_cell: bool = False, sample_seed: int | None = None) -> Predictions:
        """Predicted mean profiles (and per-cell profiles) of conditions spelled as in the run's data.

        Rows are named by canonical condition (`B+A` -> `A+B`, `A+ctrl` -> `A`), each once.

        Raises:
            ConditionError: for a malformed condition or a gene outside the run's perturbation vocabulary: one
                the split held out of training is named as such, for others close matches are listed.
        """
        canonical = checked_conditions(conditions, self.datamodule.data, self.split, self.model.perturbation_genes)
        controls = self.datamodule.control_cells(self.config.train.n_control_cells, self.config.train.seed)
        return predict_from_controls(self.predictor, self.datamodule, canonical, controls, per_cell=per_cell, sample_seed=sample_seed)


def checked_conditions(conditions: Sequence[str], data: PerturbationData, split: Split, vocabulary: Sequence[str]) -> list[str]:
    """Canonical names (each once) of conditions spelled as in `data`, every gene in the head's `vocabulary`.

    Raises:
        ConditionError: for a malformed condition or a gene outside the vocabulary: one the split held out of
            training is named as such, for others close matches are listed.
    """
    canonical = []
    for text in conditions:
        try:
            canonical.append(data.syntax.canonical(text))
        except ConditionError as error:
            raise ConditionError(f"cannot predict {text!r}: {error}") from None
    canonical = list(dict.fromkeys(canonical))
    genes = sorted({gene for name in canonical for gene in genes_of(name)})
    known, perturbed = set(vocabulary), set(data.perturbed_genes)
    held_out = [gene for gene in genes if gene not in known and gene in perturbed]
    if held_out:  # a gene the data perturbs is no typo
        raise ConditionError("; ".join(_held_out_reason(gene, split) for gene in held_out) + ". Predict it with a run whose split trains on it")
    check_known_genes(genes, known, what="perturbation vocabulary of this run (genes perturbed in its training conditions)")
    return canonical


def _held_out_reason(gene: str, split: Split) -> str:
    roles = {role for name, role in split.assignments().items() if gene in genes_of(name)}
    where = ", ".join(role for role in ROLES if role in roles) or "in none of its conditions"
    return f"{gene} is perturbed in the data but held out of training by the split ({where}), so this run has no effect for it"


def load_run(run_dir: str | Path) -> LoadedRun:
    """Read a run directory back: reloads the data its config names, the trained head and its adapters.

    Raises:
        CheckpointError: when the directory is not a finished run or its head does not match the data.
    """
    layout = RunLayout(Path(run_dir))
    missing = [path.name for path in (layout.config, layout.split, layout.model) if not path.exists()]
    if missing:
        raise CheckpointError(f"{layout.root} is not a finished run (missing {', '.join(missing)}); train it with train_from_config")
    config = load_config(layout.config)
    data = load_data(config.data)
    split = Split.load(layout.split)
    datamodule = build_datamodule(config, data, split, layout.root)
    model = PerturbedVAEHead.from_pretrained(layout.model)
    if model.perturbation_genes != datamodule.perturbation_genes or model.gene_names != data.genes:
        raise CheckpointError(f"{layout.model} does not match the data its config names (other genes or vocabulary); was the data file changed?")
    return LoadedRun(layout.root, config, split, model, datamodule, attach_encoder(datamodule.representation, model.module))


def predict_conditions(
    run_dir: str | Path, conditions: Sequence[str], per_cell: bool = False, sample_seed: int | None = None
) -> Predictions:
    """Load a run and predict `conditions` (see `LoadedRun.predict`)."""
    return load_run(run_dir).predict(conditions, per_cell=per_cell, sample_seed=sample_seed)


__all__ = ["LoadedRun", "RunLayout", "build_datamodule", "checked_conditions", "load_run", "new_module", "predict_conditions", "save_head"]
