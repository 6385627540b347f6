"""From a dataset and a split to the batches the head trains on.

Training cells are the cells of the split's training conditions (control included). Each batch carries
`h` (the representation; for an encoder run inside the step, its `prepare` rows under
`ENCODER_INPUTS_KEY` instead), `x` (the target: log-normalized expression for a gaussian head, raw counts for
a negative-binomial one), `perturbations` (multi-hot over the perturbation vocabulary: the genes
perturbed in training conditions, and with gene features the held-out genes they describe, sorted) and,
when counts exist, `library_size`; with covariate inputs, `covariates` (each cell's one-hot level). Rows are gathered from `PerturbationData.expression`/`counts` only
when a batch is collated, and sparse rows are densified only then, so memory scales with the data's non-zeros in memory, and with the batch for backed data.

The shuffling order is a pure function of (seed, epoch), which is what lets a resumed run replay
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from perturbedvae.checks import check_number
from perturbedvae.data.conditions import CONTROL, genes_of
from perturbedvae.data.gene_features import GeneFeatures
from perturbedvae.data.loading import PerturbationData
from perturbedvae.data.matrix import ExpressionRows
from perturbedvae.data.splits import Split
from perturbedvae.errors import ConfigError, DataError, SplitError
from perturbedvae.train.representation import ENCODER_INPUTS_KEY, CachedEmbeddings, Representation

INDEX_KEY = "index"
"""Batch key of the cells' row numbers: names the cells of a failing batch; not a model input."""


def perturbation_vocabulary(split: Split) -> list[str]:
    """Genes perturbed in the split's training conditions, sorted: the columns of the multi-hot input."""
    return sorted({gene for name in split.train for gene in genes_of(name)})


def multi_hot(conditions: Sequence[str], vocabulary: Sequence[str]) -> np.ndarray:
    """[len(conditions), len(vocabulary)] float32 indicator of each condition's genes (all must be known)."""
    column = {gene: index for index, gene in enumerate(vocabulary)}
    matrix = np.zeros((len(conditions), len(vocabulary)), dtype=np.float32)
    for row, name in enumerate(conditions):
        for gene in genes_of(name):
            matrix[row, column[gene]] = 1.0
    return matrix


def is_predictable(condition: str, vocabulary: Sequence[str]) -> bool:
    """Whether every gene of a condition has a column in the vocabulary (the head has no effect otherwise)."""
    known = set(vocabulary)
    return all(gene in known for gene in genes_of(condition))


def hold_out_cells(data: PerturbationData, conditions: Sequence[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of the cells of `conditions`: a seeded `fraction` of each condition held out.

    Draws depend only on (seed, condition name), so adding a condition to the split moves no other cell.
    """
    rows = np.flatnonzero(np.isin(data.conditions, list(conditions)))
    if fraction <= 0:
        return rows, np.zeros(0, dtype=np.int64)
    held_out = []
    for name in sorted(conditions):
        cells = data.cell_indices(name)
        n_held = min(len(cells) - 1, int(fraction * len(cells) + 0.5))
        if n_held > 0:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            held_out.append(rng.choice(cells, n_held, replace=False))
    held = np.sort(np.concatenate(held_out)) if held_out else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(rows, held), held


@dataclass
class PerturbationDataModule:
    """Everything the trainer and predictions need from the data, built once.

    Attributes:
        data: The loaded dataset.
        split: Its split (checked to match the data).
        representation: `h` for every cell.
        target: `x` for every cell, read by rows.
        library_size: Total counts per cell, when the data held counts.
        perturbation_genes: The perturbation vocabulary.
        train_cells: Row numbers of the training cells.
        held_out_cells: Row numbers of cells of training conditions kept out of training to select the
            epoch (`train.selection: held_out_cells`; empty otherwise).
        reference_controls: Training control cells added to every batch as `control_h`/`control_x` (`model.reference_controls`
            of the mechanism design; 0 adds none, and none are added when the encoder runs in the step).
        condition_codes: Per cell, the row of `condition_multi_hot` of its condition.
        train_controls: Row numbers of the training control cells (predictions and reference controls start there).
        condition_multi_hot: Multi-hot of every condition of the data; a condition with a gene outside the
            vocabulary gets the control row, which never matters since only training cells are batched.
        gene_features: Features of the vocabulary's genes (`gene_features.sources`), None without them.
        covariate_codes: Per cell, the column of its covariate level (`model.covariate_inputs`, set by
            `with_covariate_levels`); batches and control inputs then carry `covariates`, its one-hot.
        n_covariate_levels: Width of that one-hot (0 without covariate inputs).
    """

    data: PerturbationData
    split: Split
    representation: Representation
    target: ExpressionRows
    library_size: np.ndarray | None
    perturbation_genes: list[str]
    train_cells: np.ndarray
    held_out_cells: np.ndarray
    reference_controls: int = 0
    gene_features: GeneFeatures | None = None
    covariate_codes: np.ndarray | None = None
    n_covariate_levels: int = 0

    @classmethod
    def build(
        cls,
        data: PerturbationData,
        split: Split,
        representation: Representation,
        likelihood: str,
        held_out_fraction: float = 0.0,
        seed: int = 0,
        reference_controls: int = 0,
    ) -> PerturbationDataModule:
        """Check the split against the data and assemble targets and the vocabulary.

        With `held_out_fraction` > 0, that seeded fraction of every training condition's cells (rounded
        half up, leaving at least one to train on) moves from `train_cells` to `held_out_cells`.

        Raises:
            SplitError: when the split does not match the data or trains on no perturbed cell.
            ConfigError: for a negative-binomial head on data without raw counts.
        """
        split.check_matches(data)
        vocabulary = perturbation_vocabulary(split)
        if not vocabulary:
            raise SplitError("the split's training conditions perturb no gene; the head needs perturbed training cells")
        train_cells, held_out_cells = hold_out_cells(data, split.train, held_out_fraction, seed)
        if not np.any(data.conditions[train_cells] == CONTROL):
            raise SplitError("no control cells among the training cells; counterfactual predictions start from controls")
        counts = data.counts
        if likelihood == "nb" and counts is None:
            raise ConfigError(
                "model.likelihood nb needs raw counts, but the data is log-normalized; "
                "use model.likelihood=gaussian or load the raw-count file"
            )
        target = counts if likelihood == "nb" else data.expression
        library_size = None if counts is None else counts.row_sums().astype(np.float32)
        return cls(data, split, representation, target, library_size, vocabulary, train_cells, held_out_cells, reference_controls)

    def __post_init__(self) -> None:
        names = self.data.condition_names
        self.condition_codes = self.data.condition_codes.astype(np.int64)
        predictable = [name if is_predictable(name, self.perturbation_genes) else CONTROL for name in names]
        self.condition_multi_hot = multi_hot(predictable, self.perturbation_genes)
        self.train_controls = self.train_cells[self.data.conditions[self.train_cells] == CONTROL]

    @property
    def n_cells(self) -> int:
        return len(self.condition_codes)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Gather the rows of a batch, densifying sparse rows only now."""
        rows = np.asarray(indices, dtype=np.int64)
        target = self.target[rows]
        batch = {
            **self._representation_rows(rows),
            "x": torch.from_numpy(_dense_float32(target)),
            "perturbations": torch.from_numpy(self.condition_multi_hot[self.condition_codes[rows]]),
            INDEX_KEY: torch.from_numpy(rows),
        }
        if self.library_size is not None:
            batch["library_size"] = torch.from_numpy(self.library_size[rows])
        if sp.issparse(target):
            batch["x_nonzero"] = torch.from_numpy(stored_positions(target))
        if self.covariate_codes is not None:
            batch["covariates"] = self._covariate_rows(rows)
        if self.reference_controls and self.representation.inputs is None:
            reference = self._reference_rows(rows)
            batch["control_h"] = torch.from_numpy(dense_rows(self.representation.matrix, reference))
            batch["control_x"] = torch.from_numpy(dense_rows(self.target, reference))
        return batch

    def _covariate_rows(self, rows: np.ndarray) -> torch.Tensor:
        """[rows, n_covariate_levels] float32 one-hot of the cells' covariate levels."""
        return torch.nn.functional.one_hot(torch.from_numpy(self.covariate_codes[rows]), self.n_covariate_levels).float()

    def _reference_rows(self, rows: np.ndarray) -> np.ndarray:
        """Control cells joined to a batch: drawn from the batch's own rows, so a resumed run draws the same."""
        rng = np.random.default_rng(zlib.crc32(rows.tobytes()))
        n = min(self.reference_controls, len(self.train_controls))
        return np.sort(rng.choice(self.train_controls, n, replace=False))

    def _representation_rows(self, rows: np.ndarray) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        inputs = self.representation.inputs
        if inputs is not None:
            index = torch.from_numpy(rows)
            return {ENCODER_INPUTS_KEY: {key: value[index] for key, value in inputs.items()}}
        return {"h": torch.from_numpy(dense_rows(self.representation.matrix, rows))}

    def train_loader(self, batch_size: int, seed: int, shuffle_block: int = 1) -> DataLoader:
        """Loader over training cells, reshuffled per epoch by `loader.set_epoch(epoch)`.

        `shuffle_block` > 1 shuffles runs of that many consecutive training cells (file order) instead of
        single cells: see `EpochShuffleSampler`.
        """
        return DataLoader(
            _RowNumbers(self.train_cells),
            batch_size=batch_size,
            sampler=EpochShuffleSampler(len(self.train_cells), seed, shuffle_block),
            collate_fn=self.collate,
        )

    def control_cells(self, n_cells: int, seed: int) -> np.ndarray:
        """A fixed seeded subset (sorted) of at most `n_cells` training control cells."""
        controls = self.train_controls
        if len(controls) > n_cells:
            controls = np.sort(np.random.default_rng(seed).choice(controls, n_cells, replace=False))
        return controls

    def control_inputs(self, cells: np.ndarray) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        """`h` or encoder inputs (and `library_size`) of control cells, where counterfactual predictions start."""
        inputs = self._representation_rows(cells)
        if self.library_size is not None:
            inputs["library_size"] = torch.from_numpy(self.library_size[cells])
        if self.covariate_codes is not None:
            inputs["covariates"] = self._covariate_rows(cells)
        return inputs

    def with_covariate_levels(self, levels: np.ndarray) -> PerturbationDataModule:
        """This data module with every cell's covariate level (strings, one per cell) as a batch input; the
        one-hot columns follow the sorted level names."""
        names, codes = np.unique(np.asarray(levels, dtype=str), return_inverse=True)
        if len(codes) != self.n_cells:
            raise DataError(f"{len(codes)} covariate levels for {self.n_cells} cells; give one level per cell")
        return replace(self, covariate_codes=codes.astype(np.int64), n_covariate_levels=len(names))


class _RowNumbers(Dataset):
    """Item i is the row number of the i-th training cell; `collate` fetches the data of a whole batch."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> int:
        return int(self.rows[item])


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch): identical on every process and after a resume.

    With `block` > 1 the permutation moves runs of `block` consecutive items and keeps each run in order,
    so a batch is batch_size / block runs of consecutive training cells. For backed data that is the
    difference between reading a batch as a few contiguous spans of the file and as one scattered row
    per cell: on a 1M-cell, 5,000-gene CSR file, 512 scattered rows took 0.15-0.39 s to read, 32 runs
    of 16 rows 0.02-0.03 s. Runs share a condition when the file is sorted by condition, which is why
    it is an option (1, the default: every cell shuffled on its own).
    """

    def __init__(self, n_items: int, seed: int, block: int = 1) -> None:
        check_number("the shuffle block", block, low=1, integer=True, error=ValueError)
        self.n_items = n_items
        self.seed = seed
        self.block = block
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_items

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.block == 1:
            return iter(rng.permutation(self.n_items).tolist())
        starts = rng.permutation(-(-self.n_items // self.block)) * self.block
        items = (starts[:, None] + np.arange(self.block)).ravel()
        return iter(items[items < self.n_items].tolist())


Item = TypeVar("Item")
_END = object()


class _Failure:
    """An exception raised while collating ahead, re-raised by the consumer at the batch it belongs to."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(batches: Iterable[Item], depth: int) -> Iterator[Item]:
    """The items of `batches` in order, collated up to `depth` ahead by a background thread.

    The thread runs the loader's own iteration (sampler and `collate`), so every batch is the one the
    loop would have fetched itself; what changes is when: the next batches are gathered while the step
    runs, which overlaps row gathering, densifying and HDF5 reads with the step's math (numpy, h5py and
    torch release the GIL in their kernels). A thread, not a DataLoader worker process, because it
    shares the open (backed) file and the process's CPU clock counts its work. `depth` 0 fetches in
    the caller's thread, as without this wrapper.
    """
    if depth <= 0:
        yield from batches
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(_Failure(error))

    worker = threading.Thread(target=fill, name="perturbedvae-prefetch", daemon=True)
    worker.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()


def dense_rows(matrix: np.ndarray | ExpressionRows | CachedEmbeddings, rows: np.ndarray) -> np.ndarray:
    """Rows of any matrix the data module reads, dense float32 (sparse rows are densified only here)."""
    return _dense_float32(matrix[rows])


def _dense_float32(block: np.ndarray | sp.spmatrix | sp.sparray) -> np.ndarray:
    block = block.toarray() if sp.issparse(block) else block
    return np.ascontiguousarray(block, dtype=np.float32)


def stored_positions(block: sp.spmatrix | sp.sparray) -> np.ndarray:
    """Flat row-major positions (row × columns + column) of a sparse block's stored entries, int64.

    The batch's `x_nonzero`: read off the CSR structure they cost nothing, while the negative-binomial
    likelihood searching the dense rows for them took a twentieth of a training step (issue 14).
    """
    csr = block.tocsr()
    row_starts = np.repeat(np.arange(csr.shape[0], dtype=np.int64) * csr.shape[1], np.diff(csr.indptr))
    return row_starts + csr.indices.astype(np.int64)
