"""Expression rows on demand, from memory or from an `.h5ad` file left on disk (backed mode).

Code downstream of loading reads expression through `ExpressionRows` rather than `adata.X`, in two
ways only: gather some rows (a training batch, a sample of cells) or walk all rows in chunks of
consecutive cells (means per condition, DE statistics, library sizes, the data fingerprint). In memory
that is a view of the loaded matrix. Backed, rows are read from the file when asked for, so memory is
bounded by the batch or the chunk, not by the file, which is what lets a million-cell screen train on
a laptop. Raw counts are normalized as they are read, with the same per-cell function the in-memory
loader applies (`log_normalize`), which works because that normalization looks only at the cell's own
row: the backed and in-memory paths serve identical numbers.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from perturbedvae.errors import DataError

TARGET_SUM = 1e4
"""Counts per cell after library-size normalization (scanpy's and the field's usual 10,000)."""
CHUNK_VALUES = 1 << 24
"""Matrix entries (zeros included) per chunk when walking a whole matrix: 64 MB as dense float32."""


def chunk_cells(n_genes: int) -> int:
    """Cells per chunk: `CHUNK_VALUES` entries, between 64 and 8,192 cells."""
    return max(64, min(8192, CHUNK_VALUES // max(n_genes, 1)))


def canonical_csr(matrix) -> sp.csr_matrix:
    """float32 CSR with sorted, summed-up column indices.

    Duplicated entries would be normalized one by one (log1p of each part), and scipy sorts unsorted
    indices in place on first column slicing, changing stored arrays (and fingerprints) of unchanged data.
    Rebuilding through the constructor also unifies index dtypes (int32 indices with int64 indptr, as
    anndata may read them, make scipy's in-place sort fail).
    """
    matrix = sp.csr_matrix(matrix)
    matrix = sp.csr_matrix((matrix.data.astype(np.float32), matrix.indices, matrix.indptr), shape=matrix.shape)
    matrix.sum_duplicates()
    return matrix

Block = np.ndarray | sp.csr_matrix


def log_normalize(block: Block) -> Block:
    """log1p(counts / cell total * 1e4), float32, row by row; a cell with no counts stays zero.

    Totals are summed in float64 so the result of a row does not depend on which rows it is read with.
    """
    totals = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0).astype(np.float32)
    if sp.issparse(block):
        block = sp.csr_matrix(block, dtype=np.float32, copy=True)
        block.data *= np.repeat(scale, np.diff(block.indptr))
        np.log1p(block.data, out=block.data)
        return block
    out = np.array(block, dtype=np.float32)  # one copy, then in place
    out *= scale[:, None]
    return np.log1p(out, out=out)


class ExpressionRows(ABC):
    """A [n_cells, n_genes] float32 matrix read by row numbers or in chunks of consecutive rows.

    `rows[indices]` returns those rows (CSR for sparse data, else an ndarray) in the order asked for.
    """

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]: ...

    @property
    @abstractmethod
    def is_sparse(self) -> bool: ...

    @abstractmethod
    def __getitem__(self, rows: np.ndarray) -> Block: ...

    @abstractmethod
    def chunks(self) -> Iterator[tuple[int, Block]]:
        """(first row, block) for consecutive blocks of at most `chunk_cells(n_genes)` rows, in order."""

    def n_chunks(self) -> int:
        """How many chunks `chunks` yields at most (for progress bars)."""
        return -(-self.shape[0] // chunk_cells(self.shape[1]))

    def group_sums(self, codes: np.ndarray, n_groups: int, squares: bool = False, progress: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Per group (row `codes[cell]`), the float64 sum of its cells' rows and, optionally, of their squares.

        One pass in chunks: the sufficient statistics of per-condition means and t-tests on any size of data.
        """
        sums = np.zeros((n_groups, self.shape[1]), dtype=np.float64)
        sum_squares = np.zeros_like(sums) if squares else None
        total = self.n_chunks()
        for start, block in tqdm(self.chunks(), desc=progress, total=total, unit="chunk", disable=progress is None or total < 8):
            chunk_codes = codes[start : start + block.shape[0]]
            indicator = sp.csr_matrix(
                (np.ones(len(chunk_codes)), (chunk_codes, np.arange(len(chunk_codes)))), shape=(n_groups, len(chunk_codes))
            )
            block64 = block.astype(np.float64)
            sums += _dense(indicator @ block64)
            if sum_squares is not None:
                sum_squares += _dense(indicator @ (block64.multiply(block64) if sp.issparse(block64) else block64**2))
        return sums, sum_squares

    def row_sums(self) -> np.ndarray:
        """Sum of every row in float64 (library sizes of a counts matrix)."""
        sums = np.empty(self.shape[0], dtype=np.float64)
        for start, block in self.chunks():
            sums[start : start + block.shape[0]] = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
        return sums


class InMemoryRows(ExpressionRows):
    """Rows of a matrix already in memory (dense or CSR)."""

    def __init__(self, matrix: Block) -> None:
        self.matrix = matrix

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    @property
    def is_sparse(self) -> bool:
        return sp.issparse(self.matrix)

    def __getitem__(self, rows: np.ndarray) -> Block:
        return self.matrix[np.asarray(rows, dtype=np.int64)]

    def chunks(self) -> Iterator[tuple[int, Block]]:
        size = chunk_cells(self.shape[1])
        for start in range(0, self.shape[0], size):
            yield start, self.matrix[start : start + size]


def _dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


class BackedRows(ExpressionRows):
    """Rows of the `X` of an `.h5ad` file read from disk on demand; never writes the file.

    Args:
        path: The `.h5ad` file.
        cells: File row of every cell kept (ascending), e.g. after an obs filter; None keeps all.
        normalize: Apply `log_normalize` to what is read (the file holds raw counts).
        genes: File column of every gene kept (e.g. highly variable genes); None keeps all. Counts are
            normalized by each cell's total over all of the file's genes first, as in memory.

    CSR and dense `X` are supported; CSC cannot be read by rows and is refused with the conversion to run.
    The file is opened per read, so an object can be shared with DataLoader workers. The normalized and
    raw views (`raw()`) share the last rows read, so a batch needing both (the input `h` and
    negative-binomial targets) reads the file once.
    """

    def __init__(self, path: str | Path, cells: np.ndarray | None = None, normalize: bool = False,
                 genes: np.ndarray | None = None) -> None:
        self.path = Path(path)
        self.normalize = normalize
        self.genes = None if genes is None else np.asarray(genes, dtype=np.int64)
        with h5py.File(self.path, "r") as handle:
            if "X" not in handle:
                raise DataError(f"{self.path} has no expression matrix X")
            node = handle["X"]
            encoding = node.attrs.get("encoding-type", "array" if isinstance(node, h5py.Dataset) else "")
            if encoding == "csc_matrix":
                raise DataError(
                    f"{self.path}: X is stored column-major (CSC), which cannot be read cell by cell; rewrite it "
                    "row-major once: adata = anndata.read_h5ad(path); adata.X = adata.X.tocsr(); adata.write_h5ad(path)"
                )
            if encoding not in ("csr_matrix", "array"):
                raise DataError(
                    f"{self.path}: X has an unsupported encoding {encoding!r} (an old anndata format?); expected a CSR "
                    "or dense matrix. Rewrite it with current anndata: anndata.read_h5ad(path).write_h5ad(new_path)"
                )
            self._sparse = encoding == "csr_matrix"
            if self._sparse:
                self._file_shape = tuple(int(size) for size in node.attrs["shape"])
                self._indptr = node["indptr"][:].astype(np.int64)
            else:
                self._file_shape = tuple(node.shape)
                self._indptr = None
        all_cells = np.arange(self._file_shape[0], dtype=np.int64)
        self.cells = all_cells if cells is None else np.asarray(cells, dtype=np.int64)
        if len(self.cells) and (np.any(np.diff(self.cells) <= 0) or self.cells[0] < 0 or self.cells[-1] >= self._file_shape[0]):
            raise ValueError("cells must be ascending, unique file rows")
        self._last_read: dict[str, object] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.cells), int(self._file_shape[1] if self.genes is None else len(self.genes))

    @property
    def is_sparse(self) -> bool:
        return self._sparse

    def raw(self) -> BackedRows:
        """The same rows as stored in the file, without normalization (raw counts)."""
        view = copy.copy(self)
        view.normalize = False
        return view

    def select_genes(self, keep: np.ndarray) -> BackedRows:
        """A view of the genes where the boolean `keep` (over the current genes) is True."""
        view = copy.copy(self)
        current = np.arange(self._file_shape[1]) if self.genes is None else self.genes
        view.genes = current[np.asarray(keep, dtype=bool)]
        view._last_read = {}
        return view

    def __getitem__(self, rows: np.ndarray) -> Block:
        rows = np.asarray(rows, dtype=np.int64)
        file_rows = self.cells[rows]
        key = file_rows.tobytes()
        if self._last_read.get("key") != key:
            order = np.argsort(file_rows, kind="stable")
            restore = np.empty_like(order)
            restore[order] = np.arange(len(order))
            self._last_read.update(key=key, block=self._read_sorted(file_rows[order])[restore])
        return self._finish(self._last_read["block"])

    def chunks(self) -> Iterator[tuple[int, Block]]:
        """Walk the file in spans of consecutive file rows, keeping the cells selected in each span."""
        n_file_rows, size = self._file_shape[0], chunk_cells(self._file_shape[1])
        with h5py.File(self.path, "r") as handle:
            for span_start in range(0, n_file_rows, size):
                span_stop = min(span_start + size, n_file_rows)
                first, last = np.searchsorted(self.cells, [span_start, span_stop])
                if first == last:
                    continue
                block = self._read_span(handle["X"], span_start, span_stop)
                yield int(first), self._finish(block[self.cells[first:last] - span_start])

    def _finish(self, block: Block) -> Block:
        block = log_normalize(block) if self.normalize else block.copy()
        return block if self.genes is None else block[:, self.genes]

    def _read_span(self, node, start: int, stop: int) -> Block:
        if not self._sparse:
            return np.asarray(node[start:stop], dtype=np.float32)
        begin, end = self._indptr[start], self._indptr[stop]
        data = np.asarray(node["data"][begin:end], dtype=np.float32)
        indices = np.asarray(node["indices"][begin:end], dtype=np.int32)
        return canonical_csr(sp.csr_matrix((data, indices, self._indptr[start : stop + 1] - begin), shape=(stop - start, self._file_shape[1])))

    def _read_sorted(self, file_rows: np.ndarray) -> Block:
        """Read ascending file rows, at most `_ROWS_PER_READ` scattered rows per HDF5 read call."""
        unique, inverse = np.unique(file_rows, return_inverse=True)
        with h5py.File(self.path, "r") as handle:
            node = handle["X"]
            pieces = [
                self._read_rows(node, unique[start : start + _ROWS_PER_READ])
                for start in range(0, len(unique), _ROWS_PER_READ)
            ]
        if not pieces:
            return sp.csr_matrix((0, self._file_shape[1]), dtype=np.float32) if self._sparse else np.zeros((0, self._file_shape[1]), np.float32)
        block = sp.vstack(pieces, format="csr") if self._sparse else np.concatenate(pieces)
        return block[inverse] if len(unique) != len(file_rows) else block

    def _read_rows(self, node, rows: np.ndarray) -> Block:
        if not self._sparse:
            return np.asarray(node[rows], dtype=np.float32)
        starts, stops = self._indptr[rows], self._indptr[rows + 1]
        data, indices = _read_ranges((node["data"], node["indices"]), starts, stops, (np.float32, np.int32))
        indptr = np.concatenate([[0], np.cumsum(stops - starts)])
        return canonical_csr(sp.csr_matrix((data, indices, indptr), shape=(len(rows), self._file_shape[1])))


_ROWS_PER_READ = 512
"""Scattered rows per HDF5 read: one read selecting many ranges is ~6x faster than a read per row (h5py's
per-call overhead dominates), but building the selection grows faster than linearly beyond a few hundred."""


def _read_ranges(datasets: tuple[h5py.Dataset, ...], starts: np.ndarray, stops: np.ndarray, dtypes: tuple) -> list[np.ndarray]:
    """Concatenated dataset[start:stop] of each dataset for ascending, non-overlapping ranges, one HDF5 read each.

    The datasets have the same length (CSR data and indices), so one selection serves all: building it
    (a hyperslab per range, in Python) cost as much as the reads, and a backed training batch read it twice.
    Ranges that continue one another (consecutive rows, as `train.shuffle_block` batches them) join into
    one hyperslab: a batch of 32 runs of 16 rows selects 32 ranges, not 512.
    """
    outs = [np.empty(int((stops - starts).sum()), dtype=dtype) for dtype in dtypes]
    if len(outs[0]) == 0:
        return outs
    file_space = datasets[0].id.get_space()
    file_space.select_none()
    for start, stop in zip(*_joined_ranges(starts, stops)):
        file_space.select_hyperslab((start,), (stop - start,), op=h5py.h5s.SELECT_OR)
    memory_space = h5py.h5s.create_simple((len(outs[0]),))
    for dataset, out in zip(datasets, outs):
        dataset.id.read(memory_space, file_space, out)
    return outs


def _joined_ranges(starts: np.ndarray, stops: np.ndarray) -> tuple[list[int], list[int]]:
    """Ascending non-empty ranges [start, stop) with every range that starts where the previous stops merged into it."""
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    if len(starts) == 0:
        return [], []
    breaks = np.flatnonzero(starts[1:] != stops[:-1]) + 1
    return starts[np.r_[0, breaks]].tolist(), stops[np.r_[breaks - 1, len(stops) - 1]].tolist()
