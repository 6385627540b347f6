"""PerturbedVAE as one object a biologist drives from a notebook (the scvi-tools way).

    model = pv.PerturbedVAE(data, split, representation="pca", n_latent=16)
    model.train(max_epochs=20)                     # Accelerate inside; again with other settings
    predictions = model.predict(["KLF1+TGFBR2", "CEBPA"], per_cell=True)
    model.save("my_model"); model = pv.PerturbedVAE.load("my_model", data)

The object owns the data and split it was given, the experiment settings (checked on construction,
with the dotted key of any bad value) and, once trained, the head with what predictions start from: the
representation (PCA basis or encoder), the perturbation vocabulary and the control cells. Training runs
the very code of `perturbedvae train` (`perturbedvae.api.fitting.fit_head`), so a notebook model and a
CLI run of the same settings and seed train the same head.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate.state import AcceleratorState

from perturbedvae.api import latents
from perturbedvae.api.fitting import fit_head, train_from_config
from perturbedvae.data.loading import PerturbationData
from perturbedvae.data.splits import Split
from perturbedvae.errors import ConfigError
from perturbedvae.predictions import Predictions
from perturbedvae.processes import is_main_process
from perturbedvae.train.config import ExperimentConfig, RepresentationConfig, load_config
from perturbedvae.train.datamodule import PerturbationDataModule, is_predictable
from perturbedvae.train.predict import predict_from_controls
from perturbedvae.train.runs import (
    RunLayout,
    build_datamodule,
    checked_conditions,
    load_data,
    load_or_make_split,
    load_run,
)
from perturbedvae.train.trainer import make_accelerator

DEFAULT_REPRESENTATION: dict[str, Any] = {"kind": "expression", "n_components": 50}
"""50 principal components of the training cells' log-normalized expression."""

DEFAULT_MODEL: dict[str, Any] = {
    "composition": "mechanism", "alignment": "mmd_per_condition", "n_latent": 16, "n_hidden": 128, "n_layers": 2, "dropout": 0.1,
    "effect_init_std": 0.01, "sparsity_weight": 0.1, "saturation_init": 1.5, "saturation": "both",
    "curved_programs": True, "reference_controls": 32, "effect_members": 3,
}
"""The design the benchmark keeps (`configs/norman_subset.yaml`); any PerturbedVAEConfig field overrides it."""

DEFAULT_TRAIN: dict[str, Any] = {
    "epochs": 60, "weight_decay": 1e-4, "early_stopping_patience": 10, "selection": "held_out_cells",
}
"""Training of `configs/norman_subset.yaml`: the epoch is picked on 10% held-out cells of each training
condition, never on a held-out condition (one or two validation doubles select by noise)."""


def reset_accelerate_state() -> None:
    """Forget the settings of an earlier Accelerator in this process, so the next one may differ.

    Accelerate keeps one process-wide state and refuses a second Accelerator with another precision
    ("restart your runtime"). The distributed state (devices, process group) is kept: under
    `accelerate launch` it belongs to the launcher, and it does not change between runs.
    """
    AcceleratorState._reset_state(reset_partial_state=False)


def representation_options(representation: str | Mapping[str, Any] | RepresentationConfig) -> dict[str, Any]:
    """`RepresentationConfig` fields from a short name, a mapping or a config.

    Names: "pca" (50 principal components of expression), "expression" (log-normalized expression
    itself), "obsm:KEY" (an embedding in `adata.obsm[KEY]`), or the path of an adapter card (a frozen
    cell encoder; pass a mapping to name its checkpoint, e.g. {"kind": "encoder", "adapter": ..., "checkpoint": ...}).
    """
    if isinstance(representation, RepresentationConfig):
        return dataclasses.asdict(representation)
    if isinstance(representation, Mapping):
        return dict(representation)
    if representation == "pca":
        return dict(DEFAULT_REPRESENTATION)
    if representation == "expression":
        return {"kind": "expression"}
    if representation.startswith("obsm:"):
        return {"kind": "obsm", "obsm_key": representation.removeprefix("obsm:")}
    if Path(representation).suffix in (".yaml", ".yml"):
        return {"kind": "encoder", "adapter": str(Path(representation).expanduser().resolve())}
    raise ConfigError(
        f"representation {representation!r} is not one of 'pca', 'expression', 'obsm:KEY' or an adapter card path "
        "(.yaml); or pass a mapping of representation fields"
    )


@dataclass
class TrainedState:
    """What a trained (or loaded) model predicts with.

    Attributes:
        config: The experiment the head was trained with (data section without a path).
        datamodule: Representation of every cell of the data, perturbation vocabulary, library sizes.
        predictor: The head, or encoder + head when the encoder runs inside the step.
        controls: Row numbers of the control cells every counterfactual prediction starts from.
        history: One record per epoch (losses, validation score), as `log.jsonl` of a run.
        run_info: World size, precision, best epoch, throughput of the training run.
    """

    config: ExperimentConfig
    datamodule: PerturbationDataModule
    predictor: torch.nn.Module
    controls: np.ndarray
    history: list[dict[str, Any]]
    run_info: dict[str, Any]


class PerturbedVAE:
    """A PerturbedVAE head with its data, split, settings and, once trained, everything it predicts with.

    Args:
        data: The dataset (`pv.load_dataset`); only the split's training conditions train the head.
        split: Which conditions train, validate and test (`pv.splits.doubles(data)`...).
        representation: What the head reads per cell (see `representation_options`); default "pca".
        model_options: PerturbedVAEConfig fields over `DEFAULT_MODEL` (n_latent, composition,
            sparsity_weight...). `likelihood` defaults to "nb" for data read from raw counts, else "gaussian".

    Raises:
        ConfigError: an unknown option (with the closest valid one) or a value of the wrong type.
    """

    def __init__(
        self,
        data: PerturbationData | None = None,
        split: Split | None = None,
        representation: str | Mapping[str, Any] | RepresentationConfig = "pca",
        **model_options: Any,
    ) -> None:
        self.data, self.split = data, split
        self._sections: dict[str, Any] = {
            "data": {},
            "representation": representation_options(representation),
            "model": {**DEFAULT_MODEL, **model_options},
            "train": dict(DEFAULT_TRAIN),
        }
        self._state: TrainedState | None = None
        self._check_settings()

    @classmethod
    def from_config(cls, config: ExperimentConfig | str | Path, data: PerturbationData | None = None) -> PerturbedVAE:
        """The model an experiment config describes (as `perturbedvae train --config` reads it).

        The config's data and split are read unless `data` is given; its training settings become those
        of `train()`. Trained with the config's seed, it is the head the CLI trains.
        """
        config = config if isinstance(config, ExperimentConfig) else load_config(config)
        data = data if data is not None else load_data(config.data)
        model = cls(data, load_or_make_split(config.split, data), representation=config.representation)
        model._sections.update(settings_of(config))
        model._sections["train"]["checkpoint_every"] = 0  # checkpoints change no weight
        model._check_settings()
        return model

    @classmethod
    def from_run(cls, run_dir: str | Path) -> PerturbedVAE:
        """A finished `perturbedvae train` run directory as a model object (its data read as its config says).

        It predicts exactly as `perturbedvae predict RUN_DIR` does, and `save` makes it one self-contained folder.
        """
        run = load_run(run_dir)
        layout = RunLayout(Path(run_dir))
        controls = run.datamodule.control_cells(run.config.train.n_control_cells, run.config.train.seed)
        run_info = json.loads(layout.run_info.read_text()) if layout.run_info.is_file() else {}
        state = TrainedState(run.config, run.datamodule, run.predictor, controls, _read_log(layout.log), run_info)
        model = cls(run.datamodule.data, run.split, representation=run.config.representation)
        model._restore(settings_of(run.config), state)
        return model

    @classmethod
    def train_run(cls, config: ExperimentConfig, resume: bool = False) -> PerturbedVAE | None:
        """Train the run directory a config describes, as `perturbedvae train` does, and return its model.

        The directory (`output.run_dir`) gets what a run writes: checkpoints, the log, the test metrics
        and `run_info.json` (throughput, best epoch, latent diagnostics; `model.state.run_info`). Under
        `accelerate launch` every process trains and only the main one gets the model (the others None).
        """
        run_dir = train_from_config(config, resume=resume)
        return cls.from_run(run_dir) if is_main_process() else None

    # --- settings --------------------------------------------------------------------------------------

    @property
    def config(self) -> ExperimentConfig:
        """The experiment these settings make (data-derived shapes aside), checked."""
        return self._experiment(self._sections["train"])

    def _experiment(self, train: Mapping[str, Any]) -> ExperimentConfig:
        sections = {**self._sections, "train": dict(train)}
        model = dict(sections["model"])
        if "likelihood" not in model and self.data is not None:
            model["likelihood"] = "nb" if self.data.is_counts else "gaussian"
        sections["model"] = model
        if self.split is not None:
            seed = self.split.seed if self.split.seed is not None else 1
            sections["split"] = {"scheme": self.split.scheme, "seed": seed, "params": dict(self.split.params)}
        return ExperimentConfig.from_dict(sections)

    def _check_settings(self) -> None:
        if "likelihood" not in self._sections["model"] and self.data is None:
            return  # decided by the data at fit time; every other field is checked there too
        self.config  # noqa: B018 - builds and validates the config

    # --- the Predictor interface ------------------------------------------------------------------------

    def fit(self, data: PerturbationData, split: Split, **train_options: Any) -> PerturbedVAE:
        """Train on `data` with `split` (the interface every baseline shares; see `train`)."""
        self.data, self.split = data, split
        return self.train(**train_options)

    def train(self, max_epochs: int | None = None, **train_options: Any) -> PerturbedVAE:
        """Train the head (Accelerate: devices, mixed precision, gradient accumulation), return the model.

        Args:
            max_epochs: Epochs at most (early stopping may end sooner); default: the current setting.
            train_options: TrainConfig fields (lr, batch_size, seed, mixed_precision, selection...). They are
                kept, so a later `train()` starts from them; each call trains a new head from its seed.

        Raises:
            ConfigError: no data or split, an unknown option, or `checkpoint_every` (checkpoints belong to
                run directories: use `perturbedvae train`).
        """
        if self.data is None or self.split is None:
            raise ConfigError("the model has no data or split: PerturbedVAE(data, split), or model.fit(data, split)")
        options = {**self._sections["train"], **train_options}
        if max_epochs is not None:
            options["epochs"] = max_epochs
        config = self._experiment(options)
        if config.train.checkpoint_every:
            raise ConfigError("checkpoint_every: a notebook model keeps no checkpoints; use `perturbedvae train` for resumable runs")
        self._sections["train"] = options
        reset_accelerate_state()
        accelerator = make_accelerator(config.train)
        with tempfile.TemporaryDirectory(prefix="perturbedvae-") as directory:
            with accelerator.main_process_first():  # the main process fills an embedding cache, the others read it
                datamodule = build_datamodule(config, self.data, self.split)
            fitted = fit_head(config, datamodule, Path(directory), accelerator)
            history = _read_log(Path(directory) / "log.jsonl")
        self._state = TrainedState(config, datamodule, fitted.result.module, fitted.controls, history, fitted.result.run_info)
        return self

    @property
    def is_trained(self) -> bool:
        return self._state is not None

    @property
    def state(self) -> TrainedState:
        """The trained state; a clear error before `train()` or `load()`."""
        if self._state is None:
            raise ConfigError("the model is not trained yet: call model.train() (or PerturbedVAE.load(dir, data))")
        return self._state

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per epoch: losses, loss weights and the validation score of the last training run."""
        return self.state.history

    @property
    def genes(self) -> list[str]:
        """Genes the model predicts, in order (the data it was trained or loaded with)."""
        return list(self.state.datamodule.data.genes)

    @property
    def perturbation_genes(self) -> list[str]:
        """Genes the head has an effect for: those perturbed in the split's training conditions."""
        return list(self.state.datamodule.perturbation_genes)

    def can_predict(self, condition: str) -> bool:
        """Whether every gene of `condition` (spelled as in the data) has an effect in the head."""
        return is_predictable(self.state.datamodule.data.syntax.canonical(condition), self.state.datamodule.perturbation_genes)

    def predict(self, conditions: Sequence[str], per_cell: bool = False, sample_seed: int | None = None) -> Predictions:
        """Predicted mean profiles of `conditions` (and cells with `per_cell`), from the model's control cells.

        Args:
            conditions: Spelled as in the data (`"A+B"`, `"B+A"`, `"A+ctrl"`...); rows come back under canonical names.
            per_cell: Also return one predicted cell per control cell and condition (`Predictions.cells`).
            sample_seed: Return cells drawn from the model (latent and likelihood noise), reproducibly,
                rather than their expected expression (as `perturbedvae predict --sample-seed`).

        Raises:
            ConditionError: a malformed condition, or a gene the head has no effect for (a gene the split
                held out of training is named as such; for a typo, close matches are listed).
        """
        state = self.state
        data = state.datamodule.data
        canonical = checked_conditions(conditions, data, state.datamodule.split, state.datamodule.perturbation_genes)
        return predict_from_controls(state.predictor, state.datamodule, canonical, state.controls,
                                     per_cell=per_cell or sample_seed is not None, sample_seed=sample_seed)

    # --- what the head learned ------------------------------------------------------------------------

    def latent_representation(self, cells: Sequence[int] | np.ndarray | None = None, shifted: bool = False) -> np.ndarray:
        """[cells, n_latent] the head's encoder's cell state z_inv (posterior means) of data rows `cells`.

        Args:
            cells: Row numbers of the model's data (default: every cell).
            shifted: Add each cell's own condition's perturbation shift z_p, giving the latent the decoder
                reads for it (every cell's condition must be predictable, see `can_predict`).

        Raises:
            ConfigError: a row number outside the data. ConditionError: `shifted` with cells of a condition
                with a gene the head has no effect for.
        """
        n_obs = self.state.datamodule.data.adata.n_obs
        rows = np.arange(n_obs) if cells is None else np.asarray(cells, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= n_obs):
            raise ConfigError(f"cells are row numbers of the model's data, 0 to {n_obs - 1}; got {rows.min()} to {rows.max()}")
        return latents.latent_representation(self.state, rows, shifted=shifted)

    def mask_probabilities(self) -> pd.DataFrame:
        """[perturbation genes, latent dims] probability that each gene's mask keeps each latent dimension."""
        return latents.mask_probabilities(self.state)

    def effect_vectors(self) -> pd.DataFrame:
        """[perturbation genes, latent dims] each gene's masked effect on the latent (before causal mixing)."""
        return latents.effect_vectors(self.state)

    def gene_programs(self, dims: Sequence[int] | None = None) -> pd.DataFrame:
        """[dims, genes] the change in decoded expression one unit along each latent dimension makes (default: all)."""
        n_latent = latents.n_latent(self.state)
        dims = list(range(n_latent)) if dims is None else [int(k) for k in dims]
        if any(k < 0 or k >= n_latent for k in dims):
            raise ConfigError(f"latent dimensions are 0 to {n_latent - 1}; got {dims}")
        return latents.gene_programs(self.state, dims)

    def latent_views(self, n_cells: int = 2000, max_programs: int = 12, seed: int = 0) -> latents.LatentViews:
        """Masks, effects, programs of the strongest active dimensions and latents of `n_cells` seeded cells
        (the arrays of a report's interpretation figures; see `perturbedvae.api.latents.latent_views`)."""
        return latents.latent_views(self.state, n_cells, max_programs, seed)

    def __repr__(self) -> str:
        data = "no data" if self.data is None else f"{self.data.adata.n_obs} cells x {len(self.data.genes)} genes"
        return f"PerturbedVAE({data}, {'trained' if self.is_trained else 'not trained'})"

    # --- saving -----------------------------------------------------------------------------------------

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the trained model as one self-contained directory (see `perturbedvae.api.saved`)."""
        from perturbedvae.api.saved import save_model

        return save_model(self, Path(directory), overwrite=overwrite)

    @classmethod
    def load(cls, directory: str | Path, data: PerturbationData) -> PerturbedVAE:
        """A model saved with `save`, predicting from `data` (checked: same genes, its control cells present).

        Raises:
            CheckpointError: not a saved model, another format version, or a damaged file.
            DataError: the data's genes differ from the model's, or its control cells are missing.
        """
        from perturbedvae.api.saved import load_model

        return load_model(cls, Path(directory), data)

    def _restore(self, sections: Mapping[str, Any], state: TrainedState) -> None:
        """Adopt a saved model's settings and trained state (used by `load`)."""
        self._sections.update({key: dict(value) for key, value in sections.items()})
        self._state = state


def settings_of(config: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """The sections of a model's settings an experiment config fixes (its data and split come separately)."""
    return {
        "data": {key: getattr(config.data, key) for key in ("de_method", "n_de_genes")},
        "model": dict(config.model),
        "train": dataclasses.asdict(config.train),
    }


def _read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []

