"""The training loop, one for a laptop and a GPU cluster alike, driven by HuggingFace Accelerate.

Accelerate places tensors, wraps the head (with the encoder backbone, when the encoder runs inside the
step: `EncoderWithHead`) for DDP/FSDP, runs mixed precision and gradient accumulation,
and saves/restores complete checkpoints (weights, optimizer, every process's RNG, and our progress
record). The loop adds what is specific to this head: KL and sparsity warm-ups, model selection and early
stopping on a validation callback it is given (it only calls it: the scorers live above training, in
`perturbedvae.api.validation`), and a readable log. It trains the module it is given; building one from
an experiment config is the caller's job (`perturbedvae.train.runs.new_module`). Resuming from a
checkpoint replays exactly what an uninterrupted run does: data order depends only on (seed, epoch) and
RNG states come back with the checkpoint.

Only the main process writes files (Accelerate's per-process RNG files inside checkpoints aside).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import accelerate
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, broadcast_object_list, is_compiled_module
from tqdm.auto import tqdm

from perturbedvae import __version__ as perturbedvae_version
from perturbedvae.errors import CheckpointError, ConfigError, TrainingDivergedError
from perturbedvae.model import LossWeights, PerturbedVAEModule
from perturbedvae.train.checkpoints import checkpoint_dirs, save_checkpoint, verify_checkpoint
from perturbedvae.train.config import TrainConfig
from perturbedvae.train.datamodule import INDEX_KEY, PerturbationDataModule, prefetched
from perturbedvae.train.representation import attach_encoder, head_of

SELECTION_METRIC = "pearson_delta_de"
"""Metric of model selection on validation conditions (`train.selection: val_conditions`), higher is better."""


@dataclass(frozen=True)
class Selection:
    """Which validation score picks the kept epoch, and its direction."""

    metric: str = SELECTION_METRIC
    maximize: bool = True

    def signed(self, value: float) -> float:
        """The value as a score to maximise (errors negated)."""
        return value if self.maximize else -value


Validator = Callable[[torch.nn.Module], Mapping[str, float]]
"""Scores the (unwrapped) head; must return the metric of the trainer's `Selection`."""


@dataclass(frozen=True)
class TrainingArguments:
    """What the trainer is told besides the module: the optimisation settings and the loss-weight schedule.

    Attributes:
        settings: The experiment's `train` section (epochs, lr, warm-ups, precision, patience...).
        loss_weights: The weights of the loss terms once warmed up; KL and sparsity rise linearly from 0
            over `settings.kl_warmup_epochs` and `settings.sparsity_warmup_epochs`.
    """

    settings: TrainConfig
    loss_weights: LossWeights = field(default_factory=LossWeights)

    @classmethod
    def for_head(cls, settings: TrainConfig, head: PerturbedVAEModule) -> TrainingArguments:
        """The head config's loss weights (`kl_weight`, `sparsity_weight`...) on the schedule of `settings`."""
        return cls(settings, LossWeights.from_config(head.config))

    def loss_weights_at(self, epoch: int) -> LossWeights:
        """The weights of epoch `epoch` (0-based): KL and sparsity warmed up, alignment and DAG constant."""
        full, settings = self.loss_weights, self.settings
        return LossWeights(
            kl=full.kl * warmup_factor(epoch, settings.kl_warmup_epochs),
            alignment=full.alignment,
            sparsity=full.sparsity * warmup_factor(epoch, settings.sparsity_warmup_epochs),
            dag=full.dag,
        )


@dataclass
class TrainingProgress:
    """What a checkpoint must remember beyond weights and optimizer to resume exactly."""

    epochs_done: int = 0
    global_step: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    evals_without_improvement: int = 0
    stopped_early: bool = False
    best_state: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class TrainingResult:
    """What `Trainer.fit` returns: the trained module (best validation weights) and run facts.

    `module` is the head, or an `EncoderWithHead` whose `head` is the head when the encoder ran in the loop.
    """

    module: torch.nn.Module
    progress: TrainingProgress
    run_info: dict[str, Any] = field(default_factory=dict)


def make_accelerator(settings: TrainConfig) -> Accelerator:
    """The run's Accelerator; create it before anything else asks which process is the main one.

    Accelerate reads the launcher's environment (world size, `ACCELERATE_USE_CPU`, precision) when the
    first Accelerator is made; a bare `PartialState()` made earlier would miss the CPU flag and see one
    process. Several processes on a machine without CUDA can only be CPU processes (gloo), so then CPU
    is forced even when the launcher did not pass the flag (as with an accelerate config file).
    Unused-parameter detection is on because a batch without doubles leaves the pairwise term without
    gradient.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launched_on_cpu = not torch.cuda.is_available() and world_size > 1
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and not torch.cuda.is_available():
        raise ConfigError(
            "FSDP was requested (configs/accelerate/fsdp.yaml) but no GPU is visible, and Accelerate shards only "
            "across accelerators; on CPU launch with configs/accelerate/cpu_2proc.yaml (DDP over gloo) instead"
        )
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        _share_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))  # processes on this machine
    return Accelerator(
        cpu=launched_on_cpu,
        mixed_precision=settings.mixed_precision,
        dynamo_backend="inductor" if settings.compile else None,  # None: the launcher's --dynamo_backend
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _share_cpu_threads(local_processes: int) -> None:
    """Give each CPU process its share of the cores it may run on that other jobs leave idle.

    When intra-op threads outnumber free cores they spin against each other: on a loaded 2-core
    machine one small training step took 1.7 s with 2 threads and 10 ms with 1, and a step of the
    issue-14 benchmark (20,000 cells x 2,000 genes, batch 512) cost 409 CPU-ms with 2 threads and 90
    with 1 at load average 5.7. `OMP_NUM_THREADS`, when set, wins.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    torch.set_num_threads(thread_share(usable, busy, local_processes))


def thread_share(usable_cores: int, load_average: float, local_processes: int) -> int:
    """Threads per process: the usable cores not kept busy by the load average, split among the local processes.

    `os.cpu_count()` counts the machine, not the cores this process may use (`os.sched_getaffinity`:
    a container's or `taskset`'s share), and ignores other jobs on them.
    """
    idle = usable_cores - round(load_average)
    return max(1, min(usable_cores, idle) // max(1, local_processes))


_FUSED_ADAMW_DEVICES = ("cpu", "cuda")
"""Devices with a fused AdamW kernel in torch (2.4 and later)."""


def make_optimizer(parameters: list[torch.nn.Parameter], settings: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, as one fused kernel where torch has one for their device.

    The same update as the per-parameter loop (equal within float rounding; tested): on the issue-14
    benchmark the loop's ~10 small ops per parameter tensor cost 5.8 CPU-ms of a ~60 ms step, the fused
    kernel 2.2.
    """
    fused = all(parameter.is_floating_point() and parameter.device.type in _FUSED_ADAMW_DEVICES for parameter in parameters)
    return torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused or None)


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """Linear warm-up: 0 at epoch 0, 1 from epoch `warmup_epochs` on (always 1 without warm-up)."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, epoch / warmup_epochs)


class Trainer:
    """Trains a PerturbedVAE head (or encoder + head) on a datamodule.

    The trainer seeds nothing: the caller seeds, then draws the module's weights (`new_module` does both),
    so one seeded stream runs from the initial weights through every training step. A resumed run
    takes its RNG states from the checkpoint.

    Args:
        module: The head, or an `EncoderWithHead` whose backbone is the datamodule representation's own
            module (so what trains in it is what later predictions and saved adapters use).
        arguments: Optimisation settings and the loss-weight schedule.
        datamodule: Batches and the perturbation vocabulary.
        run_dir: Where the log, run info and checkpoints go (created by the main process).
        validator: Called on the main process every `train.eval_every` epochs; None disables
            validation (then the last epoch's weights are kept).
        accelerator: An Accelerator made by `make_accelerator` (made here when None).
        selection: The validator's metric that picks the kept epoch, and its direction.
        calibrate: Called on the (unwrapped) head before each validation and on the final head without
            validation (e.g. `initialization.calibrate_head`).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        arguments: TrainingArguments,
        datamodule: PerturbationDataModule,
        run_dir: Path,
        validator: Validator | None = None,
        accelerator: Accelerator | None = None,
        selection: Selection = Selection(),
        calibrate: Callable[[PerturbedVAEModule], None] | None = None,
    ) -> None:
        self.module = module
        self.arguments = arguments
        self.settings = arguments.settings
        self.selection = selection
        self.calibrate = calibrate
        self.datamodule = datamodule
        self.run_dir = Path(run_dir)
        self.validator = validator
        self.accelerator = accelerator or make_accelerator(arguments.settings)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def fit(self, resume: bool = False) -> TrainingResult:
        """Train (or resume the last checkpoint) and return the head with the best validation weights.

        Raises:
            CheckpointError: `resume` without a checkpoint in the run directory.
            TrainingDivergedError: a NaN or infinite loss.
        """
        settings, accelerator, module = self.settings, self.accelerator, self.module
        final = self._plain_copy(module)
        trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
        optimizer = make_optimizer(trainable, settings)
        loader = self.datamodule.train_loader(settings.batch_size, settings.seed, settings.shuffle_block)
        module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
        progress = TrainingProgress()
        accelerator.register_for_checkpointing(progress)
        if resume:
            self._resume(progress)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()

        started, cells_seen = time.perf_counter(), 0
        epoch_seconds: list[float] = []  # the training part of each epoch (no validation), wall and this process's CPU
        epoch_cpu_seconds: list[float] = []
        for epoch in range(progress.epochs_done, settings.epochs):
            if progress.stopped_early:
                break
            epoch_start, epoch_cpu_start = time.perf_counter(), time.process_time()
            losses, n_cells = self._train_epoch(module, optimizer, loader, epoch, progress)
            epoch_seconds.append(time.perf_counter() - epoch_start)
            epoch_cpu_seconds.append(time.process_time() - epoch_cpu_start)
            cells_seen += n_cells
            progress.epochs_done = epoch + 1
            record = {"epoch": epoch + 1, "step": progress.global_step, **losses}
            if progress.epochs_done % settings.eval_every == 0 or progress.epochs_done == settings.epochs:
                record["val"] = self._validate_and_select(module, progress)
            record["seconds"] = round(time.perf_counter() - epoch_start, 3)
            self._append_log(record)
            if settings.checkpoint_every and progress.epochs_done % settings.checkpoint_every == 0:
                save_checkpoint(accelerator, self.run_dir, progress.epochs_done)

        head = self._final_head(final, module, progress)
        train_cpu_seconds = sum(epoch_cpu_seconds)
        run_info = self._run_info(progress, cells_seen, sum(epoch_seconds), time.perf_counter() - started)
        # This process's CPU time (all its threads): unlike wall time, barely moved by other jobs on the cores.
        run_info["train_cpu_seconds"] = train_cpu_seconds
        # Per epoch this call trained, its training part only (a compiled run's first epoch holds the compilation).
        run_info["train_seconds_per_epoch"], run_info["train_cpu_seconds_per_epoch"] = epoch_seconds, epoch_cpu_seconds
        per_process = cells_seen / accelerator.num_processes
        run_info["train_cells_per_cpu_second"] = per_process / train_cpu_seconds if train_cpu_seconds > 0 else None
        run_info["trainable_parameters"] = sum(parameter.numel() for parameter in trainable)
        return TrainingResult(head, progress, run_info)

    def _plain_copy(self, module: torch.nn.Module) -> torch.nn.Module:
        """A copy of the head, joined to the same (shared) encoder backbone, that `accelerator.prepare` never wraps.

        `prepare` wraps the module it is given (DDP, FSDP shards, a mixed-precision forward); the final
        weights are loaded into this copy instead.
        """
        return attach_encoder(self.datamodule.representation, copy.deepcopy(head_of(module)))

    def _final_head(self, final: torch.nn.Module, module, progress: TrainingProgress) -> torch.nn.Module:
        """`final` (plain: unwrapped, unsharded) with the best validation weights, else the last ones.

        Gathering a sharded (FSDP) state is collective, so every process calls this; the weights are
        complete on the main process, the only one that saves or evaluates them.
        """
        state = progress.best_state if progress.best_state is not None else self._full_state(module)
        head = final.to(self.accelerator.device)
        if self.is_main:
            head.load_state_dict(state)
            if progress.best_state is None:
                self._calibrate(head)
        return head

    def _calibrate(self, module: torch.nn.Module) -> None:
        if self.calibrate is not None:
            self.calibrate(head_of(module))

    def _full_state(self, module) -> dict[str, torch.Tensor]:
        if is_compiled_module(module):  # `prepare` compiles last, around DDP / FSDP: their keys, not `_orig_mod.`
            module = module._orig_mod
        state = self.accelerator.get_state_dict(module)
        return {key: value.detach().cpu().clone() for key, value in state.items()}

    def _resume(self, progress: TrainingProgress) -> None:
        checkpoints = checkpoint_dirs(self.run_dir)
        if not checkpoints:
            raise CheckpointError(
                f"--resume: no checkpoint under {self.run_dir / 'checkpoints'}; start without --resume, "
                "and set train.checkpoint_every to save checkpoints"
            )
        verify_checkpoint(checkpoints[-1])
        try:
            self.accelerator.load_state(str(checkpoints[-1]))
        except Exception as error:  # torch, safetensors and pickle raise many types for one problem
            raise CheckpointError(
                f"{checkpoints[-1]} could not be loaded ({type(error).__name__}: {error}); was it written by another "
                "model or configuration? Delete it to resume from the previous checkpoint"
            ) from error
        if self.is_main:
            self._truncate_log(progress.epochs_done)

    def _train_epoch(self, module, optimizer, loader, epoch: int, progress: TrainingProgress) -> tuple[dict[str, float], int]:
        """One pass over the training cells; returns cell-weighted mean losses over all processes."""
        settings, accelerator = self.settings, self.accelerator
        weights = self.arguments.loss_weights_at(epoch)
        loader.set_epoch(epoch)
        module.train()
        sums: dict[str, torch.Tensor] = {}
        n_cells = torch.zeros((), device=accelerator.device)
        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{settings.epochs}", disable=not accelerator.is_local_main_process, leave=False)
        for step, batch in enumerate(prefetched(loader, settings.prefetch_batches)):
            cell_rows = batch.pop(INDEX_KEY)
            with accelerator.accumulate(module):
                output = module(batch, weights)
                self._check_finite(output.loss, epoch, step, progress.global_step, cell_rows)
                accelerator.backward(output.loss)
                if accelerator.sync_gradients and settings.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(module.parameters(), settings.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            progress.global_step += 1
            size = len(cell_rows)
            n_cells += size
            for name, value in {"loss": output.loss, **output.parts}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * size
            # The postfix shows at the bar's next (rate-limited) redraw: redrawing for it every step cost 3% of a
            # Norman training step.
            bar.set_postfix(loss=f"{output.loss.item():.4g}", refresh=False)
            bar.update(1)
        bar.close()
        total = accelerator.reduce(n_cells, reduction="sum")
        means = {name: float(accelerator.reduce(value, reduction="sum") / total) for name, value in sums.items()}
        means["kl_weight"], means["sparsity_weight"] = weights.kl, weights.sparsity
        return means, int(total)

    def _check_finite(self, loss: torch.Tensor, epoch: int, step: int, global_step: int, cell_rows: torch.Tensor) -> None:
        """Stop every process together when any process sees a non-finite loss."""
        finite = torch.isfinite(loss.detach()).reshape(1).float()
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.gather(finite)
        if bool(finite.min() > 0):
            return
        names = self.datamodule.data.adata.obs_names[cell_rows.cpu().numpy()[:5]].tolist()
        raise TrainingDivergedError(
            f"loss is {loss.item()} at epoch {epoch + 1}, step {step} of the epoch (global step {global_step}); "
            f"batch of {len(cell_rows)} cells starting with {', '.join(names)} (on process "
            f"{self.accelerator.process_index} or another). Lower train.lr, set train.max_grad_norm, or use "
            "train.mixed_precision=no"
        )

    def _validate_and_select(self, module, progress: TrainingProgress) -> dict[str, float] | None:
        """Score on the main process, share the scores, keep the best weights, count patience."""
        if self.validator is None:
            return None
        metrics = None
        with _full_parameters(self.accelerator, module):
            if self.is_main:
                self._calibrate(self.accelerator.unwrap_model(module))
                scores = self.validator(self.accelerator.unwrap_model(module))
                metrics = {name: float(value) for name, value in scores.items()}
        metrics = broadcast_object_list([metrics])[0] if self.accelerator.num_processes > 1 else metrics
        score = self.selection.signed(metrics.get(self.selection.metric, math.nan))
        if not math.isnan(score) and score > progress.best_score:
            progress.best_score, progress.best_epoch = score, progress.epochs_done
            progress.evals_without_improvement = 0
            progress.best_state = self._full_state(module)
        else:
            progress.evals_without_improvement += 1
        patience = self.settings.early_stopping_patience
        progress.stopped_early = patience is not None and progress.evals_without_improvement >= patience
        return metrics

    def _append_log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.run_dir / "log.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _truncate_log(self, epochs_done: int) -> None:
        """Drop log lines of epochs after the checkpoint: the resumed run writes them again."""
        path = self.run_dir / "log.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= epochs_done]
            path.write_text("".join(line + "\n" for line in kept))

    def _run_info(self, progress: TrainingProgress, cells_seen: int, train_seconds: float, wall_seconds: float) -> dict[str, Any]:
        state = self.accelerator.state
        return {
            "world_size": self.accelerator.num_processes,
            "distributed_type": str(state.distributed_type),
            "device": str(self.accelerator.device),
            "torch_threads": torch.get_num_threads(),
            "mixed_precision": self.accelerator.mixed_precision,
            "dynamo_backend": str(state.dynamo_plugin.backend.value).lower(),
            "gradient_accumulation_steps": self.settings.gradient_accumulation_steps,
            "seed": self.settings.seed,
            "epochs_done": progress.epochs_done,
            "global_steps": progress.global_step,
            "best_epoch": progress.best_epoch,
            "selection_metric": self.selection.metric,
            "best_val_" + self.selection.metric: None if math.isinf(progress.best_score) else self.selection.signed(progress.best_score),
            "stopped_early": progress.stopped_early,
            "train_cells_per_second": cells_seen / train_seconds if train_seconds > 0 else None,
            "train_seconds": train_seconds,
            "wall_seconds": wall_seconds,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "accelerate": accelerate.__version__,
                "perturbedvae": perturbedvae_version,
            },
        }


def _full_parameters(accelerator: Accelerator, module):
    """Context in which a sharded (FSDP) head holds its full parameters; a no-op otherwise."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(module, writeback=False)
