"""Load and validate a perturbation AnnData once, so everything downstream can trust it.

The loader never writes to the user's file. It checks every input users get wrong (missing column, no
controls, malformed conditions, NaN/inf, duplicated genes, wrong file type), detects counts versus
log-normalized data, normalizes counts the usual way (total 1e4 + log1p, raw counts kept), and can
select highly variable genes while always keeping the measured perturbed genes.

Counts are recognised by their values, not their size: X holding only non-negative integers (not all
zero) is raw counts, whatever its maximum, because a log-normalized matrix is essentially never
all-integer (a shallow screen's counts may peak at 19, below where any threshold on the maximum would
put them). Otherwise, in memory, a `layers['counts']` holding counts is used as the raw counts beside X
as given. `counts=True/False` overrides the detection.

By default the expression matrix is read into memory. With `backed=True` only obs/var are: expression
stays in the file and is read (and normalized) a batch or a chunk at a time through
`PerturbationData.expression`, so a screen of millions of cells needs memory for its metadata only.
Either way, code reads expression through `expression`/`counts` (`perturbedvae.data.matrix`), never
through `adata.X`, so both modes serve the same numbers.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbedvae.checks import check_number
from perturbedvae.data.conditions import CONTROL, DEFAULT_CONTROL_LABELS, ConditionSyntax, genes_of
from perturbedvae.data.matrix import BackedRows, ExpressionRows, InMemoryRows, canonical_csr, log_normalize
from perturbedvae.errors import ConditionError, DataError

logger = logging.getLogger(__name__)

CONDITION_COLUMN = "perturbedvae_condition"
"""obs column of the working copy holding each cell's canonical condition."""

COUNTS_LAYER = "counts"
CountsSource = Literal["X", "layer", "none"]
"""Where a dataset's raw counts come from: X (normalized on load), `layers['counts']`, or nowhere."""
_NEGATIVE_VALUES = (
    "expression has negative values: it looks scaled or centred. Give raw counts or log-normalized "
    "data (sc.pp.normalize_total + sc.pp.log1p) instead"
)


@dataclass
class PerturbationData:
    """A validated perturbation dataset.

    Attributes:
        adata: Working copy; `obs[CONDITION_COLUMN]` holds canonical conditions. In memory, `X` is
            log-normalized (raw counts in `layers['counts']`); backed, it has obs, var and obsm but no `X`.
        syntax: How the source file spells conditions.
        condition_key: The obs column the conditions were read from.
        is_counts: Whether the source held raw counts.
        raw_spelling: Canonical name -> first spelling in the source (GEARS' split sorts spellings).
        source: Path of the file read, if any.
        backed_rows: For a backed dataset, the file's (normalized) expression rows; None in memory.
    """

    adata: ad.AnnData
    syntax: ConditionSyntax
    condition_key: str
    is_counts: bool
    raw_spelling: dict[str, str] = field(default_factory=dict)
    source: str | None = None
    backed_rows: BackedRows | None = None

    @property
    def backed(self) -> bool:
        """Whether expression stays in the file (read per batch) rather than in memory."""
        return self.backed_rows is not None

    @property
    def expression(self) -> ExpressionRows:
        """Log-normalized expression, cells x genes, float32."""
        return self.backed_rows if self.backed_rows is not None else InMemoryRows(self.adata.X)

    @property
    def counts(self) -> ExpressionRows | None:
        """Raw counts, when the source held counts."""
        if not self.is_counts:
            return None
        return self.backed_rows.raw() if self.backed_rows is not None else InMemoryRows(self.adata.layers[COUNTS_LAYER])

    @property
    def conditions(self) -> np.ndarray:
        """Canonical condition of every cell."""
        return self.adata.obs[CONDITION_COLUMN].to_numpy(dtype=object)

    @property
    def genes(self) -> list[str]:
        return list(self.adata.var_names)

    @cached_property
    def condition_names(self) -> list[str]:
        """Unique canonical conditions, control first, then sorted."""
        names = set(self.conditions)
        names.discard(CONTROL)
        return [CONTROL, *sorted(names)]

    @cached_property
    def perturbed_genes(self) -> list[str]:
        """Every gene perturbed alone or in a combination, sorted."""
        return sorted({gene for name in self.condition_names for gene in genes_of(name)})

    def cell_indices(self, condition: str) -> np.ndarray:
        """Row numbers of a canonical condition's cells (empty for a condition the data lacks)."""
        if condition not in self._condition_position:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.condition_codes == self._condition_position[condition])

    @cached_property
    def _condition_position(self) -> dict[str, int]:
        return {name: position for position, name in enumerate(self.condition_names)}

    @cached_property
    def condition_codes(self) -> np.ndarray:
        """Per cell, the position of its condition in `condition_names`."""
        return pd.Index(self.condition_names).get_indexer(self.conditions).astype(np.int64)

    @cached_property
    def condition_moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cells, sums and sums of squares of every condition (rows of `condition_names`; float64).

        One chunked pass gives what both the mean profiles and the t-test DE statistics need, so a run that
        uses both (training, evaluation, baselines) reads backed data once for them.
        """
        n_groups = len(self.condition_names)
        progress = "condition statistics" if self.backed else None
        sums, sum_squares = self.expression.group_sums(self.condition_codes, n_groups, squares=True, progress=progress)
        return np.bincount(self.condition_codes, minlength=n_groups).astype(np.float64), sums, sum_squares

    @cached_property
    def mean_profiles(self) -> pd.DataFrame:
        """Mean log-normalized profile of every condition (conditions x genes, float64)."""
        n_cells, sums, _ = self.condition_moments
        return pd.DataFrame(sums / n_cells[:, None], index=self.condition_names, columns=self.genes)

    @property
    def control_mean(self) -> np.ndarray:
        return self.mean_profiles.loc[CONTROL].to_numpy()

    @cached_property
    def fingerprint(self) -> str:
        """Short hash of expression, genes and conditions: keys caches and is printed in reports.

        Hashed chunk by chunk (values, column indices and row lengths separately), so the same data gives
        the same fingerprint in memory and backed.
        """
        parts = [hashlib.sha256() for _ in range(3)]
        for _, block in self.expression.chunks():
            if sp.issparse(block):  # canonical in both modes (see canonical_csr)
                pieces = (block.data, block.indices.astype(np.int64), np.diff(block.indptr).astype(np.int64))
            else:
                pieces = (block, np.zeros(0), np.zeros(0))
            for digest, piece in zip(parts, pieces):
                digest.update(np.ascontiguousarray(piece).tobytes())
        digest = hashlib.sha256(b"".join(part.digest() for part in parts))
        digest.update("\x1f".join(self.genes).encode())
        digest.update("\x1f".join(map(str, self.conditions)).encode())
        return digest.hexdigest()[:16]


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Read an .h5ad file into memory with a clear error for a missing, non-h5ad or corrupt file."""
    path = _check_h5ad_path(path)
    try:
        return ad.read_h5ad(path)
    except Exception as error:  # h5py/anndata raise many types for a corrupt file
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: Exception) -> DataError:
    return DataError(f"{path} could not be read as an AnnData .h5ad file ({type(error).__name__}: {error})")


def _check_h5ad_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path} is a directory; give the path of an .h5ad file")
    if path.suffix != ".h5ad":
        raise DataError(
            f"{path}: expected an AnnData .h5ad file; convert other formats with anndata/scanpy "
            "(e.g. sc.read_10x_h5(...).write_h5ad('data.h5ad'))"
        )
    _check_hdf5(path)
    return path


def _check_hdf5(path: Path) -> None:
    """Say what a file named .h5ad is when it is not HDF5, where h5py would only say "file signature not found"."""
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes); was it copied or downloaded completely?")
    if h5py.is_hdf5(path):
        return
    with path.open("rb") as handle:
        head = handle.read(4096)
    raise DataError(f"{path} could not be read as an AnnData .h5ad file: {_what_it_is(head)}")


def _what_it_is(head: bytes) -> str:
    """What the first bytes of a non-HDF5 file suggest it is, with the fix."""
    if head.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed, not HDF5; decompress it first (gunzip)"
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive, not HDF5; extract the .h5ad file from it"
    text = head.decode("utf-8", errors="ignore")
    if b"\x00" not in head and text and all(char.isprintable() or char.isspace() for char in text):
        first_line = text.splitlines()[0][:60] if text.strip() else ""
        return (
            f"it looks like a text/CSV file, not HDF5 (first line: {first_line!r}); read it with pandas or scanpy "
            "(e.g. sc.read_csv(path)) and save it with adata.write_h5ad(...)"
        )
    return f"it is not HDF5 (it starts with bytes {head[:8].hex(' ')}); the file is corrupt or of another format"


def load_dataset(
    source: str | Path | ad.AnnData,
    *,
    condition_key: str = "condition",
    control_labels: Sequence[str] | None = None,
    delimiter: str = "+",
    obs_filter: Mapping[str, object] | None = None,
    gene_symbol_key: str | None = None,
    min_cells: int = 10,
    n_top_genes: int | None = None,
    backed: bool = False,
    counts: bool | None = None,
) -> PerturbationData:
    """Load, validate and normalize a perturbation dataset.

    Args:
        source: Path of an `.h5ad` file or an AnnData (copied, never modified).
        condition_key: obs column with condition strings.
        control_labels: Labels meaning "no perturbation"; default `control`, `ctrl`, `non-targeting`.
        delimiter: Separator between genes of a combination.
        obs_filter: Keep only cells whose obs columns equal these values, e.g. `{"dataset": "norman19"}`.
        gene_symbol_key: var column with gene symbols to use as gene names (default: `var_names`).
        min_cells: Conditions with fewer cells trigger a warning (their metrics are noisy).
        n_top_genes: Keep this many highly variable genes plus every measured perturbed gene (backed: raw counts only).
        backed: Leave expression in the file (a path, CSR or dense `X`) and read it per batch or chunk.
        counts: None detects whether X holds raw counts (non-negative integers; else `layers['counts']`, in
            memory); True requires X to be raw counts; False reads X as log-normalized and uses no raw counts
            (a counts layer is ignored), even if X is integral.

    Raises:
        DataError, ConditionError: with a message naming the fix.
    """
    if backed:
        return _load_backed(source, condition_key, control_labels, delimiter, obs_filter, gene_symbol_key, min_cells, n_top_genes, counts)
    if isinstance(source, ad.AnnData):
        adata, path = source.copy(), None
    else:
        adata, path = read_h5ad(source), str(source)
    if adata.isbacked:
        adata = adata.to_memory()
    adata = _apply_obs_filter(adata, obs_filter)
    syntax, raw_spelling = _annotate_conditions(adata, condition_key, control_labels, delimiter, gene_symbol_key, min_cells)
    adata.X = _as_float32(adata.X)
    source_of_counts = _counts_source(_scan_expression(InMemoryRows(adata.X)), counts, COUNTS_LAYER in adata.layers)
    _place_counts(adata, source_of_counts)
    data = PerturbationData(adata, syntax, condition_key, source_of_counts != "none", raw_spelling, path)
    _log_read(data)
    if n_top_genes is not None:
        data = select_highly_variable_genes(data, n_top_genes)
    return data


def _annotate_conditions(
    adata: ad.AnnData, condition_key: str, control_labels: Sequence[str] | None, delimiter: str,
    gene_symbol_key: str | None, min_cells: int,
) -> tuple[ConditionSyntax, dict[str, str]]:
    """Check gene names and conditions and write canonical conditions to `obs[CONDITION_COLUMN]`."""
    _use_gene_symbols(adata, gene_symbol_key)
    _check_gene_names(adata)
    syntax = ConditionSyntax(tuple(control_labels) if control_labels else DEFAULT_CONTROL_LABELS, delimiter)
    canonical, raw_spelling = _parse_conditions(adata, condition_key, syntax)
    adata.obs[CONDITION_COLUMN] = pd.Categorical(canonical)
    _warn_small_conditions(canonical, min_cells)
    return syntax, raw_spelling


def _load_backed(
    source: str | Path | ad.AnnData, condition_key: str, control_labels: Sequence[str] | None, delimiter: str,
    obs_filter: Mapping[str, object] | None, gene_symbol_key: str | None, min_cells: int, n_top_genes: int | None,
    counts: bool | None,
) -> PerturbationData:
    """Metadata into memory, expression left in the file and checked in one chunked pass.

    Layers are not read, so raw counts can only come from X: where the in-memory loader would take them from
    `layers['counts']`, backed loading refuses rather than serve other data than memory would.
    """
    if isinstance(source, ad.AnnData):
        raise DataError("backed loading reads a file; pass the .h5ad path rather than an AnnData")
    adata = _read_metadata(source)
    keep = _obs_filter_mask(adata, obs_filter)
    adata = adata[keep].copy() if not keep.all() else adata
    syntax, raw_spelling = _annotate_conditions(adata, condition_key, control_labels, delimiter, gene_symbol_key, min_cells)
    rows = BackedRows(source, cells=np.flatnonzero(keep))
    source_of_counts = _counts_source(_scan_expression(rows), counts, _has_counts_layer(source))
    if source_of_counts == "layer":
        raise DataError(
            f"{source}: X is not raw counts and the counts are in layers['counts'], which backed loading does not "
            "read; load it in memory (without backed; config data.backed=false) to use them, or pass counts=False "
            "(CLI: --log-normalized; config data.counts=false) to use X alone, without raw counts"
        )
    is_counts = source_of_counts == "X"
    rows.normalize = is_counts
    data = PerturbationData(adata, syntax, condition_key, is_counts, raw_spelling, str(source), backed_rows=rows)
    _log_read(data)
    return data if n_top_genes is None else select_highly_variable_genes(data, n_top_genes)


def _log_read(data: PerturbationData) -> None:
    if not logger.isEnabledFor(logging.DEBUG):  # spares counting the conditions of a large screen
        return
    logger.debug("read %s: %d cells x %d genes, %d conditions, %s%s", data.source or "an AnnData in memory", data.adata.n_obs,
                 len(data.genes), len(data.condition_names), "raw counts" if data.is_counts else "log-normalized",
                 " (expression left in the file)" if data.backed else "")


def _read_metadata(source: str | Path) -> ad.AnnData:
    """obs, var and obsm of an .h5ad file, and nothing else: anndata's backed mode would load layers too."""
    path = _check_h5ad_path(source)
    try:
        with h5py.File(path, "r") as handle:
            if "X" not in handle:
                raise DataError(f"{path} has no expression matrix X")
            elements = {key: ad.io.read_elem(handle[key]) for key in ("obs", "var", "obsm") if key in handle}
        return ad.AnnData(obs=elements.get("obs"), var=elements.get("var"), obsm=elements.get("obsm") or None)
    except DataError:
        raise
    except Exception as error:  # h5py/anndata raise many types for a corrupt file
        raise _unreadable(path, error) from error


def _has_counts_layer(path: str | Path) -> bool:
    """Whether an .h5ad file has `layers['counts']`, looked up without reading it."""
    with h5py.File(path, "r") as handle:
        return "layers" in handle and COUNTS_LAYER in handle["layers"]


def _scan_values(rows: ExpressionRows, what: str = "expression") -> ValueScan:
    """Check every value is finite, chunk by chunk, and summarise what counts detection needs.

    The same scan in memory and backed, so both modes decide alike.
    """
    from tqdm.auto import tqdm

    scan, n_chunks = ValueScan(), rows.n_chunks()
    for _, block in tqdm(rows.chunks(), desc=f"checking {what}", total=n_chunks, unit="chunk", disable=n_chunks < 8):
        _check_finite(block, what)
        scan = scan | ValueScan.of(block)
    return scan


def _scan_expression(rows: ExpressionRows) -> ValueScan:
    """`_scan_values` of X, refusing negative (scaled or centred) values."""
    scan = _scan_values(rows)
    if scan.minimum < 0:
        raise DataError(_NEGATIVE_VALUES)
    return scan


def _counts_source(scan: ValueScan, counts: bool | None, has_counts_layer: bool) -> CountsSource:
    """Where the raw counts are: "X", "layer" (`layers['counts']`) or "none", by `counts` or by X's values."""
    if counts is False:
        return "none"
    if counts is True:
        if not scan.integral:
            raise DataError(
                f"counts=True (CLI: --counts), but X holds non-integer values (e.g. {scan.non_integer:g}), so it is "
                "not raw counts; leave counts unset to detect, or put the raw counts in X"
            )
        return "X"
    if scan.is_counts:
        if scan.maximum <= _LOG_SCALE_MAX:
            warnings.warn(
                f"X holds non-negative integers (max {scan.maximum:g}): read as raw counts; pass counts=False "
                "(CLI: --log-normalized) if it is not",
                UserWarning,
                stacklevel=3,
            )
        return "X"
    return "layer" if has_counts_layer else "none"


def _place_counts(adata: ad.AnnData, source_of_counts: CountsSource) -> None:
    """Leave log-normalized X in `X` and the raw counts (if any) in `layers['counts']`, as the rest reads them."""
    if source_of_counts == "X":
        _normalize_counts(adata)  # replaces a counts layer: X's counts are the ones backed mode reads too
    elif source_of_counts == "layer":
        adata.layers[COUNTS_LAYER] = _checked_counts_layer(adata)
    else:
        adata.layers.pop(COUNTS_LAYER, None)  # unused: `counts` and gene selection must not see it


def _checked_counts_layer(adata: ad.AnnData):
    """`layers['counts']` as float32 (canonical CSR), or a DataError saying why it is not raw counts."""
    layer = adata.layers[COUNTS_LAYER]
    where = f"layers[{COUNTS_LAYER!r}]"
    if tuple(layer.shape) != tuple(adata.shape):
        raise DataError(f"{where} has shape {tuple(layer.shape)} but X has {tuple(adata.shape)}; it cannot be X's raw counts")
    layer = _as_float32(layer)
    scan = _scan_values(InMemoryRows(layer), what=where)
    if scan.minimum < 0:
        raise DataError(f"{where} has negative values (min {scan.minimum:g}), so it is not raw counts; remove the layer or put raw counts in it")
    if not scan.integral:
        raise DataError(
            f"{where} holds non-integer values (e.g. {scan.non_integer:g}), so it is not raw counts; remove the "
            "layer or put raw counts in it"
        )
    return layer


def _apply_obs_filter(adata: ad.AnnData, obs_filter: Mapping[str, object] | None) -> ad.AnnData:
    keep = _obs_filter_mask(adata, obs_filter)
    return adata if keep.all() else adata[keep].copy()


def _obs_filter_mask(adata: ad.AnnData, obs_filter: Mapping[str, object] | None) -> np.ndarray:
    """Cells whose obs columns equal the filter's values (all cells without a filter)."""
    keep = np.ones(adata.n_obs, dtype=bool)
    if not obs_filter:
        return keep
    for column, value in obs_filter.items():
        if column not in adata.obs:
            raise DataError(f"obs_filter column {column!r} not in obs; available: {', '.join(map(str, adata.obs.columns))}")
        present = set(map(str, adata.obs[column].unique()))
        if str(value) not in present:
            raise DataError(f"obs_filter: no cell has {column} == {value!r}; values present: {', '.join(sorted(present))}")
        keep &= adata.obs[column].astype(str).to_numpy() == str(value)
    return keep


def _use_gene_symbols(adata: ad.AnnData, gene_symbol_key: str | None) -> None:
    if gene_symbol_key is None:
        return
    if gene_symbol_key not in adata.var:
        raise DataError(f"gene_symbol_key {gene_symbol_key!r} not in var; available: {', '.join(map(str, adata.var.columns))}")
    adata.var_names = adata.var[gene_symbol_key].astype(str).to_numpy()


def _check_gene_names(adata: ad.AnnData) -> None:
    if adata.n_vars == 0 or adata.n_obs == 0:
        raise DataError(f"the data has {adata.n_obs} cells and {adata.n_vars} genes; need at least one of each")
    names = pd.Index(adata.var_names)
    if names.has_duplicates:
        duplicated = names[names.duplicated()].unique()[:5]
        raise DataError(
            f"{names.duplicated().sum()} duplicated gene names (e.g. {', '.join(map(str, duplicated))}); "
            "make them unique first, e.g. adata.var_names_make_unique(), or pick another gene_symbol_key"
        )


def _parse_conditions(adata: ad.AnnData, condition_key: str, syntax: ConditionSyntax) -> tuple[np.ndarray, dict[str, str]]:
    if condition_key not in adata.obs:
        raise DataError(
            f"obs has no column {condition_key!r}; available: {', '.join(map(str, adata.obs.columns))}. "
            "Pass condition_key=... (CLI: --condition-key)"
        )
    raw = adata.obs[condition_key]
    missing = raw.isna().to_numpy()
    if missing.any():
        raise DataError(f"{missing.sum()} cells have no value in obs[{condition_key!r}]; label them or drop them")
    raw_values = raw.astype(str).to_numpy()
    unique_raw, inverse = np.unique(raw_values, return_inverse=True)
    canonical_of_unique = []
    raw_spelling: dict[str, str] = {}
    for text in unique_raw:
        try:
            name = syntax.canonical(text)
        except ConditionError as error:
            count = int((raw_values == text).sum())
            raise ConditionError(f"obs[{condition_key!r}]: {error} ({count} cells)") from None
        canonical_of_unique.append(name)
    canonical = np.asarray(canonical_of_unique, dtype=object)[inverse]
    first_seen = np.sort(np.unique(raw_values, return_index=True)[1])
    for index in first_seen:
        raw_spelling.setdefault(canonical[index], raw_values[index])
    if CONTROL not in raw_spelling:
        raise DataError(
            f"no control cells: no value of obs[{condition_key!r}] is one of {list(syntax.control_labels)}. "
            "Pass the label your data uses (control_labels=[...], CLI: --control-label)"
        )
    return canonical, raw_spelling


def _warn_small_conditions(canonical: np.ndarray, min_cells: int) -> None:
    names, counts = np.unique(canonical, return_counts=True)
    small = [f"{name} ({count})" for name, count in zip(names, counts) if count < min_cells]
    if small:
        warnings.warn(
            f"{len(small)} condition(s) have fewer than {min_cells} cells, so their metrics are noisy: "
            + ", ".join(small[:10]) + (" ..." if len(small) > 10 else ""),
            UserWarning,
            stacklevel=3,
        )


def _as_float32(matrix):
    """float32, and CSR in canonical form (see `canonical_csr`)."""
    if sp.issparse(matrix):
        return canonical_csr(matrix)
    array = np.asarray(matrix)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"expression matrix has dtype {array.dtype}; expected real numbers")
    return array.astype(np.float32, copy=False)


def _values(matrix) -> np.ndarray:
    return matrix.data if sp.issparse(matrix) else np.asarray(matrix).ravel()


def _check_finite(matrix, what: str = "expression") -> None:
    values = _values(matrix)
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(f"{what} has {int(bad.sum())} NaN or infinite values; fix or drop those cells/genes first")


_LOG_SCALE_MAX = 20
"""Counts peaking at or below this could be mistaken for log-scale values: the loader says how it read them."""


@dataclass(frozen=True)
class ValueScan:
    """What counts detection needs to know of a matrix's values, combinable chunk by chunk (`|`).

    Implicit zeros of a sparse matrix count as values. An empty matrix has minimum +inf and maximum -inf.
    """

    minimum: float = np.inf
    maximum: float = -np.inf
    non_integer: float | None = None
    """One value with a fractional part, for messages; None when every value is an integer."""

    @classmethod
    def of(cls, matrix) -> ValueScan:
        values = _values(matrix)
        minimum, maximum = (float(values.min()), float(values.max())) if values.size else (np.inf, -np.inf)
        if sp.issparse(matrix):  # implicit zeros are values too
            minimum, maximum = min(minimum, 0.0), max(maximum, 0.0)
        fractional = np.flatnonzero(np.mod(values, 1) != 0)
        return cls(minimum, maximum, float(values[fractional[0]]) if fractional.size else None)

    def __or__(self, other: ValueScan) -> ValueScan:
        return ValueScan(min(self.minimum, other.minimum), max(self.maximum, other.maximum),
                         self.non_integer if self.non_integer is not None else other.non_integer)

    @property
    def integral(self) -> bool:
        return self.non_integer is None

    @property
    def is_counts(self) -> bool:
        """Non-negative integers, not all zero: raw counts, whatever the maximum (log-normalized data is not integral)."""
        return self.integral and self.minimum >= 0 and self.maximum > 0


def looks_like_counts(matrix) -> bool:
    """True when every value is a non-negative integer and not all are zero (the loader's rule, `ValueScan.is_counts`)."""
    return ValueScan.of(matrix).is_counts


def _normalize_counts(adata: ad.AnnData) -> None:
    adata.layers[COUNTS_LAYER] = adata.X.copy()
    adata.X = log_normalize(adata.X)


def select_highly_variable_genes(data: PerturbationData, n_top_genes: int) -> PerturbationData:
    """Keep `n_top_genes` highly variable genes plus every measured perturbed gene.

    Counts: Seurat v3 (scanpy's, in memory; `perturbedvae.data.hvg` in two chunked passes, backed).
    Log-normalized data: scanpy's Seurat dispersion flavour, in memory only.
    """
    import scanpy as sc

    adata = data.adata
    check_number("n_top_genes", n_top_genes, low=1, integer=True, error=DataError)
    if n_top_genes >= adata.n_vars:
        return data
    if data.backed:
        if not data.is_counts:
            raise DataError(
                "n_top_genes on backed log-normalized data is not supported (the Seurat dispersion flavour needs "
                "the matrix in memory); give raw counts, select genes in memory once, or load without backed=True"
            )
        from perturbedvae.data.hvg import seurat_v3_normalized_variances, top_genes

        highly_variable = top_genes(seurat_v3_normalized_variances(data.counts), n_top_genes)
    elif data.is_counts:
        hvg = sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat_v3", layer=COUNTS_LAYER, inplace=False)
        highly_variable = hvg["highly_variable"].to_numpy()
    else:
        hvg = sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat", inplace=False)
        highly_variable = hvg["highly_variable"].to_numpy()
    keep = highly_variable | adata.var_names.isin(data.perturbed_genes)
    rows = data.backed_rows.select_genes(keep) if data.backed else None
    adata = adata[:, keep].copy()
    return PerturbationData(adata, data.syntax, data.condition_key, data.is_counts, data.raw_spelling, data.source, rows)
