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

`train_from_config` makes one, `load_run` reads it back, `predict_conditions` answers "what would these
perturbations do?" from it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from perturbedvae.data.conditions import check_known_genes, genes_of
from perturbedvae.data.de import compute_de_genes
from perturbedvae.data.loading import PerturbationData, load_dataset
from perturbedvae.data.splits import ROLES, Split, make_split
from perturbedvae.encoders.lora import save_adapters
from perturbedvae.errors import CheckpointError, ConditionError, ConfigError
from perturbedvae.evaluate import Evaluator, Predictions, evaluate_named, write_metrics
from perturbedvae.model import PerturbedVAEHead
from perturbedvae.train.config import DataConfig, ExperimentConfig, SplitConfig, load_config
from perturbedvae.train.datamodule import PerturbationDataModule, dense_rows, hold_out_cells, is_predictable
from perturbedvae.train.diagnostics import latent_diagnostics
from perturbedvae.train.initialization import calibrate_head, finalize_head, initialize_head
from perturbedvae.train.predict import predict_from_controls
from perturbedvae.train.representation import (
    ADAPTERS_DIR,
    PCA_FILE,
    attach_encoder,
    build_representation,
    head_of,
)
from perturbedvae.train.trainer import SELECTION_METRIC, Selection, Trainer, TrainingResult, Validator, make_accelerator
from perturbedvae.train.unseen_genes import check_test_predictable, with_gene_features

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


def gene_features(datamodule: PerturbationDataModule) -> torch.Tensor | None:
    """The feature matrix of the vocabulary's genes, for a head with a gene-feature network."""
    features = datamodule.gene_features
    return None if features is None else torch.from_numpy(features.values)


class ConditionScorer:
    """Scores counterfactual predictions of held-out conditions the head can express.

    Conditions with a gene outside the perturbation vocabulary (never perturbed in training) cannot be
    predicted by a head without gene features; they are left out and listed in `skipped`.
    """

    def __init__(self, datamodule: PerturbationDataModule, conditions: Sequence[str], subgroups: Mapping[str, Sequence[str]], de_method: str, n_de_genes: int, control_cells: np.ndarray) -> None:
        vocabulary = datamodule.perturbation_genes
        self.datamodule = datamodule
        self.conditions = [name for name in conditions if is_predictable(name, vocabulary)]
        self.skipped = [name for name in conditions if not is_predictable(name, vocabulary)]
        groups = {group: [name for name in names if name in set(self.conditions)] for group, names in subgroups.items()}
        self.groups = {group: names for group, names in groups.items() if names} or {"all": self.conditions}
        self.de_method, self.n_de_genes = de_method, n_de_genes
        self.control_cells = control_cells
        self._evaluator: Evaluator | None = None

    @property
    def evaluator(self) -> Evaluator:
        """Built on first use, so only the process that scores pays for the DE genes."""
        if self._evaluator is None:
            de = compute_de_genes(self.datamodule.data, method=self.de_method, n_top=self.n_de_genes)
            self._evaluator = Evaluator(self.datamodule.data, de, self.groups)
        return self._evaluator

    def predict(self, module: torch.nn.Module) -> Predictions:
        return predict_from_controls(module, self.datamodule, self.conditions, self.control_cells)

    def __call__(self, module: torch.nn.Module) -> dict[str, float]:
        return {name: float(value) for name, value in self.evaluator.evaluate(self.predict(module)).overall.items()}


HELD_OUT_METRIC = "held_out_mse"


class HeldOutCellScorer:
    """Scores each training condition's counterfactual prediction against the mean of its held-out cells.

    The score is the mean over conditions of the MSE across genes (lower is better): it selects the epoch
    on the prediction path itself, on cells no step trained on, without spending a held-out condition.
    """

    selection = Selection(HELD_OUT_METRIC, maximize=False)

    def __init__(self, datamodule: PerturbationDataModule, control_cells: np.ndarray) -> None:
        held = datamodule.held_out_cells
        conditions = datamodule.data.conditions[held]
        self.conditions = sorted(set(conditions) & set(datamodule.split.train))
        self.datamodule, self.control_cells = datamodule, control_cells
        expression = datamodule.data.expression
        self.observed = np.vstack([dense_rows(expression, held[conditions == name]).mean(axis=0, dtype=np.float64) for name in self.conditions]) if self.conditions else None

    def __call__(self, module: torch.nn.Module) -> dict[str, float]:
        predicted = predict_from_controls(module, self.datamodule, self.conditions, self.control_cells).means.to_numpy()
        return {HELD_OUT_METRIC: float(((predicted - self.observed) ** 2).mean())}


def make_validator(config: ExperimentConfig, datamodule: PerturbationDataModule, split: Split, controls: np.ndarray) -> tuple[Validator | None, Selection, list[str]]:
    """The run's validator, its selection rule and the validation conditions it cannot predict."""
    if config.train.selection == "last":
        return None, Selection(), []
    if config.train.selection == "held_out_cells":
        scorer = HeldOutCellScorer(datamodule, controls)
        return (scorer if scorer.conditions else None), scorer.selection, []
    validator = ConditionScorer(datamodule, split.val, split.val_subgroups, config.data.de_method, config.data.n_de_genes, controls)
    if not validator.conditions:
        warnings.warn("no validation condition the head can predict: model selection uses the last epoch", UserWarning, stacklevel=3)
        return None, Selection(), validator.skipped
    return validator, Selection(), validator.skipped


def train_from_config(config: ExperimentConfig, resume: bool = False) -> Path:
    """Train the experiment a config describes, evaluate it on the test conditions, return the run dir.

    Works in one process or under `accelerate launch`; only the main process writes files.

    Raises:
        ConfigError: the run directory already holds a run (pass output.overwrite=true or resume).
        CheckpointError: resume without checkpoints, or with a config that changes more than train.epochs.
    """
    config.data.require_source()  # before the run directory is prepared (and an old run replaced)
    layout = RunLayout(Path(config.output.run_dir))
    accelerator = make_accelerator(config.train)
    if accelerator.is_main_process:
        _prepare_run_dir(layout, config, resume)
    accelerator.wait_for_everyone()
    data = load_data(config.data)
    split = Split.load(layout.split) if resume and layout.split.is_file() else load_or_make_split(config.split, data)
    with accelerator.main_process_first():  # the main process fills the embedding cache, the others read it
        datamodule = build_datamodule(config, data, split, layout.root if resume and layout.representation.is_file() else None)
    check_test_predictable(config, datamodule)
    if accelerator.is_main_process:
        config.save(layout.config)
        split.save(layout.split)
        datamodule.representation.save(layout.root)
    fitted = fit_head(config, datamodule, layout.root, accelerator, resume)
    if accelerator.is_main_process:
        head, controls = fitted.head, fitted.controls
        PerturbedVAEHead(head.config, head, datamodule.perturbation_genes, data.genes).save_pretrained(layout.model)
        if datamodule.representation.finetune:
            save_adapters(datamodule.representation.encoder, layout.adapters)
        test_scorer = ConditionScorer(datamodule, split.test, split.test_subgroups, config.data.de_method, config.data.n_de_genes, controls)
        run_info = {**fitted.result.run_info, "latent": _latent_record(fitted.trainer, head, datamodule, config.train.seed, fitted.initialize), "data_fingerprint": data.fingerprint, "n_train_cells": len(datamodule.train_cells),
                    "unpredictable_val_conditions": fitted.unpredictable_val, "unpredictable_test_conditions": test_scorer.skipped,
                    "gene_features": _feature_record(datamodule)}
        if test_scorer.conditions:
            summary, tidy = evaluate_named(test_scorer.evaluator, {MODEL_NAME: test_scorer.predict(fitted.result.module)})
            write_metrics(summary, tidy, layout.root)
        layout.run_info.write_text(json.dumps(run_info, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return layout.root


def _feature_record(datamodule: PerturbationDataModule) -> dict | None:
    """Which source described each perturbation gene, and the width of each block (None without gene features)."""
    features = datamodule.gene_features
    return None if features is None else {"columns": dict(features.columns), "sources_of": features.sources_of}


@dataclass
class FittedHead:
    """What `fit_head` trained: the module that predicts, the starting control cells and the run's facts."""

    trainer: Trainer
    result: TrainingResult
    datamodule: PerturbationDataModule
    controls: np.ndarray
    unpredictable_val: list[str]
    initialize: Callable[[torch.nn.Module], None] | None

    @property
    def head(self) -> torch.nn.Module:
        return head_of(self.result.module)


def fit_head(config: ExperimentConfig, datamodule: PerturbationDataModule, run_dir: Path, accelerator: Accelerator,
             resume: bool = False) -> FittedHead:
    """Train the head a config describes on a built datamodule (any data, in memory or from a file).

    `run_dir` receives the log and checkpoints. The main process finalizes the head (anchors and control
    calibration on all cells of the training conditions), as predictions need.
    """
    controls = datamodule.control_cells(config.train.n_control_cells, config.train.seed)
    validator, selection, unpredictable_val = make_validator(config, datamodule, datamodule.split, controls)
    mechanism = config.model["composition"] == "mechanism"
    initialize = (lambda head: initialize_head(head, datamodule, config.train.seed)) if mechanism else None
    calibrate = (lambda head: calibrate_head(head, datamodule)) if mechanism else None
    trainer = Trainer(config, datamodule, run_dir, validator, gene_features(datamodule), accelerator, selection,
                      initialize, calibrate)
    result = trainer.fit(resume=resume)
    if accelerator.is_main_process:
        finalize_head(head_of(result.module), datamodule)
    return FittedHead(trainer, result, datamodule, controls, unpredictable_val, initialize)


def _latent_record(trainer: Trainer, head, datamodule: PerturbationDataModule, seed: int, initialize) -> dict:
    """`latent_diagnostics` of the trained head, and the alignment statistic of the head as initialised."""
    with torch.random.fork_rng(devices=[]):
        initial = head_of(trainer.build_module())
        if initialize is not None:
            initialize(initial)
    before = latent_diagnostics(initial.to(next(head.parameters()).device), datamodule, seed, probe=False)
    return {**latent_diagnostics(head, datamodule, seed), **{f"initial_{key}": value for key, value in before.items()}}


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


__all__ = ["SELECTION_METRIC", "FittedHead", "LoadedRun", "RunLayout", "checked_conditions", "fit_head", "load_run", "predict_conditions",
           "train_from_config"]
