"""Reproducible train/val/test splits of perturbation conditions, saved as JSON beside every result.

A split assigns whole conditions (never cells) to roles, because the question the field asks is how well a
model predicts a perturbation it has never seen. The schemes:

- `gears`: GEARS' simulation split, reproduced draw for draw so numbers stay comparable with GEARS-based
  papers (see `gears_simulation_split`); with `drop_unmeasured`, of the conditions whose genes the data
  measures, as GEARS splits only the perturbations its gene graph covers (`gears_split`).
- `doubles`: hold out combinations whose genes were all seen alone (SAMS-VAE's Norman OOD protocol).
- `custom`: the user's own obs column of train/val/test labels.
- `transfer`: conditions held out in one level of a covariate (`perturbedvae.data.covariates`); the scheme name
  of those runs, made by `transfer_split`, not by `make_split`.
- `cells`: a seeded fraction of every condition's cells held out (`perturbedvae.cell_split`, `perturbedvae cells`).
- `unseen_singles`: hold out whole genes, every condition of them (GEARS' `unseen_single` subgroup), optionally
  only genes the data measures (the ones co-expression gene features can describe).
- Benchmark folds over the combinations whose genes were all seen alone (`benchmark_combinations`):
  `lodo` holds out one of them per fold, `kfold` one of K seeded folds, `singles_only` trains on control
  and singles and tests every such combination (discrepancy-VAE's protocol). A fold has no validation
  condition: models select their epoch on held-out cells of the training conditions.

A split is always written to a file: GEARS' split depends on which copy of the data it ran on, so the file,
not the seed, is what makes a result reproducible.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from perturbedvae.data.conditions import CONTROL, ConditionSyntax, canonical_name, genes_of
from perturbedvae.data.loading import PerturbationData
from perturbedvae.errors import ConditionError, SplitError

SCHEMES: tuple[str, ...] = ("gears", "doubles", "custom", "lodo", "kfold", "singles_only", "unseen_singles", "transfer", "cells")
BENCHMARK_PROTOCOLS: tuple[str, ...] = ("lodo", "kfold", "singles_only")
ROLES: tuple[str, ...] = ("train", "val", "test")
UNSEEN_COMBO_CHOICES: tuple[str, ...] = ("test", "train")

_FORMAT = "perturbedvae-split"
_FORMAT_VERSION = 1
_LIST_FIELDS = ("train", "val", "test")
_SUBGROUP_FIELDS = ("test_subgroups", "val_subgroups")
_REQUIRED_KEYS = ("scheme", "seed", *_LIST_FIELDS, *_SUBGROUP_FIELDS, "params")

_GEARS_CONTROL = "ctrl"
_GEARS_VALIDATION_FRACTION = 0.9
"""GEARS carves validation out of train with the same procedure at 0.9 genes / 0.9 combos."""

_GEARS_SUBGROUPS = ("combo_seen0", "combo_seen1", "combo_seen2", "unseen_single")


@dataclass
class Split:
    """Which conditions train, validate and test a model.

    Attributes:
        scheme: `gears`, `doubles` or `custom`.
        seed: Seed of the random draws (None for `custom`).
        train, val, test: Canonical condition names, sorted; control is always in train.
        test_subgroups, val_subgroups: Named groups inside test/val (e.g. `combo_seen2`, `unseen_single`), so
            metrics can be reported per difficulty. `combo_seenK` means K genes of the combination were seen in
            training; `unseen_single` a single whose gene was not.
        params: The parameters that made the split (fractions, column name...), for the report.
        data_fingerprint: `PerturbationData.fingerprint` of the data the split was made on.
    """

    scheme: str
    seed: int | None
    train: list[str]
    val: list[str]
    test: list[str]
    test_subgroups: dict[str, list[str]]
    val_subgroups: dict[str, list[str]]
    params: dict = field(default_factory=dict)
    data_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise SplitError(f"unknown split scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        for name in _LIST_FIELDS:
            setattr(self, name, _sorted_names(getattr(self, name), name))
        for name in _SUBGROUP_FIELDS:
            setattr(self, name, _sorted_subgroups(getattr(self, name), name))
        if CONTROL not in self.train:
            self.train = sorted([*self.train, CONTROL])
        self._check_roles_disjoint()
        self._check_subgroups_inside(self.test_subgroups, self.test, "test")
        self._check_subgroups_inside(self.val_subgroups, self.val, "val")

    def _check_roles_disjoint(self) -> None:
        seen: dict[str, str] = {}
        for role in ROLES:
            for name in getattr(self, role):
                if name in seen:
                    raise SplitError(
                        f"condition {name!r} is in both {seen[name]} and {role}; each condition needs exactly one role"
                    )
                seen[name] = role

    @staticmethod
    def _check_subgroups_inside(subgroups: dict[str, list[str]], members: list[str], role: str) -> None:
        member_set = set(members)
        for group, names in subgroups.items():
            outside = [name for name in names if name not in member_set]
            if outside:
                raise SplitError(f"{role} subgroup {group!r} names conditions not in {role}: {', '.join(outside[:5])}")

    def assignments(self) -> dict[str, str]:
        """Canonical condition -> role, for every condition the split names."""
        return {name: role for role in ROLES for name in getattr(self, role)}

    def role_of(self, condition: str) -> str | None:
        """Role of a condition (any spelling the default syntax reads: `B+A`, `A+ctrl`), None if absent."""
        try:
            name = ConditionSyntax().canonical(condition)
        except ConditionError as error:
            raise SplitError(f"cannot look up the role of {condition!r}: {error}") from None
        return self.assignments().get(name)

    def check_matches(self, data: PerturbationData) -> None:
        """Check the split belongs to `data`.

        Raises:
            SplitError: when the split names conditions the data does not have (wrong file or filter).

        Warns when the data's fingerprint differs from the one recorded (same conditions, other values) and
        when the data has conditions the split does not assign (they will take part in nothing), except those
        the split dropped on purpose (`params["dropped_conditions"]`, named when it was made).
        """
        present = set(data.condition_names)
        absent = sorted(name for name in self.assignments() if name not in present)
        if absent:
            raise SplitError(
                f"the split names {len(absent)} condition(s) absent from the data (e.g. {', '.join(absent[:5])}); "
                "make the split on this data (make_split) or load the data it was made on"
            )
        if self.data_fingerprint is not None and self.data_fingerprint != data.fingerprint:
            warnings.warn(
                f"the split was made on data with fingerprint {self.data_fingerprint}, this data has "
                f"{data.fingerprint}: same conditions, but values or genes differ",
                UserWarning,
                stacklevel=2,
            )
        assigned = self.assignments()
        dropped = set(self.params.get("dropped_conditions", ()))
        unassigned = [name for name in data.condition_names if name not in assigned and name not in dropped]
        if unassigned:
            warnings.warn(
                f"{len(unassigned)} condition(s) of the data are in no role of the split and will be ignored: "
                + ", ".join(unassigned[:10]),
                UserWarning,
                stacklevel=2,
            )

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": _FORMAT_VERSION, **asdict(self)}

    def save(self, path: str | Path) -> None:
        """Write the split as indented JSON with sorted keys and lists, so diffs between splits are readable."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Split:
        """Read a split written by `save`.

        Raises:
            SplitError: for a missing, unreadable, incomplete or inconsistent file.
        """
        path = Path(path)
        if not path.is_file():
            raise SplitError(f"{path}: no such split file; create one with make_split(...).save(path)")
        try:
            content = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SplitError(
                f"{path} is not valid JSON ({error}); recreate it with make_split(...).save(path)"
            ) from None
        if not isinstance(content, dict) or content.get("format") != _FORMAT:
            raise SplitError(f"{path} is not a perturbedvae split file (no \"format\": \"{_FORMAT}\")")
        if content.get("version") != _FORMAT_VERSION:
            raise SplitError(
                f"{path}: split format version {content.get('version')!r}; this version reads {_FORMAT_VERSION}"
            )
        missing = [key for key in _REQUIRED_KEYS if key not in content]
        if missing:
            raise SplitError(f"{path} lacks key(s) {', '.join(missing)}; recreate it with make_split(...).save(path)")
        if not isinstance(content["params"], dict):
            raise SplitError(f"{path}: 'params' must be an object")
        seed = content["seed"]
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise SplitError(f"{path}: 'seed' must be an integer or null, got {seed!r}")
        fields = {key: content[key] for key in _REQUIRED_KEYS}
        try:
            return cls(**fields, data_fingerprint=content.get("data_fingerprint"))
        except SplitError as error:
            raise SplitError(f"{path}: {error}") from None


def _sorted_names(names: object, what: str) -> list[str]:
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise SplitError(f"{what} must be a list of condition names")
    for name in names:
        if canonical_name(genes_of(name)) != name:
            raise SplitError(
                f"{what} holds {name!r}, which is not a canonical condition name (genes sorted, joined by '+', "
                f"control as {CONTROL!r}); write {canonical_name(genes_of(name))!r}"
            )
    if len(set(names)) != len(names):
        raise SplitError(f"{what} names a condition more than once")
    return sorted(names)


def _sorted_subgroups(subgroups: object, what: str) -> dict[str, list[str]]:
    if not isinstance(subgroups, dict) or not all(isinstance(key, str) for key in subgroups):
        raise SplitError(f"{what} must map subgroup names to lists of conditions")
    return {key: _sorted_names(subgroups[key], f"{what}[{key!r}]") for key in sorted(subgroups)}


def _check_fraction(value: float, name: str, *, allow_zero: bool = True) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not (0 <= value <= 1) or (value == 0 and not allow_zero):
        bounds = "[0, 1]" if allow_zero else "(0, 1]"
        raise SplitError(f"{name} must be a number in {bounds}, got {value!r}")


def _check_seed(seed: object) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise SplitError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _combo_seen_label(n_seen: int) -> str:
    return f"combo_seen{n_seen}"


def _subgroups_by_seen_singles(conditions: Iterable[str], train: Iterable[str]) -> dict[str, list[str]]:
    """Group held-out conditions by how many of their genes have a single perturbation in train.

    This is what an additive model can use: a combination is predictable from singles only for its seen genes.
    """
    seen_genes = {genes_of(name)[0] for name in train if len(genes_of(name)) == 1}
    groups: dict[str, list[str]] = {}
    for name in conditions:
        genes = genes_of(name)
        label = "unseen_single" if len(genes) == 1 else _combo_seen_label(sum(gene in seen_genes for gene in genes))
        groups.setdefault(label, []).append(name)
    return groups


# --- gears -------------------------------------------------------------------------------------------------


def gears_spelling(raw: str, syntax: ConditionSyntax) -> str | None:
    """GEARS' spelling of a raw condition string; None for control.

    GEARS sorts combination strings, so `B+A` must stay `B+A`; singles become `A+ctrl` unless written
    `A+ctrl`/`ctrl+A` already (GEARS recognises a single by the `ctrl` in it).
    """
    tokens = [token.strip() for token in raw.strip().split(syntax.delimiter)]
    genes = [token for token in tokens if not syntax.is_control_label(token)]
    if not genes:
        return None
    if len(genes) > 1:
        return "+".join(genes)
    single = f"{genes[0]}+{_GEARS_CONTROL}"
    written = raw.strip()
    return written if written in (single, f"{_GEARS_CONTROL}+{genes[0]}") else single


def _gears_genes(spelling: str) -> list[str]:
    return [token for token in spelling.split("+") if token != _GEARS_CONTROL]


def _gears_round(
    perts: Sequence[str], train_gene_set_size: float, combo_seen2_train_frac: float, seed: int
) -> tuple[list[str], dict[str, list[str]]]:
    """One round of GEARS' simulation split over GEARS spellings: returns (train, held-out subgroups).

    The draws follow GEARS exactly: a fresh legacy RandomState(seed) picks the train genes from the sorted
    unique genes, and another fresh RandomState(seed) picks the train combinations from the sorted spellings
    of combinations whose genes are all train genes. Combinations of three or more genes (GEARS itself does
    not handle them) join that pool when all their genes are train genes, otherwise `combo_seenK`.
    """
    genes_by_pert = {pert: _gears_genes(pert) for pert in perts}
    all_genes = np.unique([gene for genes in genes_by_pert.values() for gene in genes])
    train_genes = set(
        np.random.RandomState(seed).choice(all_genes, int(len(all_genes) * train_gene_set_size), replace=False).tolist()
    )
    train: list[str] = []
    held_out: dict[str, list[str]] = {label: [] for label in _GEARS_SUBGROUPS}
    fully_seen_combos = []
    for pert, genes in genes_by_pert.items():
        n_seen = sum(gene in train_genes for gene in genes)
        if len(genes) == 1:
            (train if n_seen else held_out["unseen_single"]).append(pert)
        elif n_seen == len(genes):
            fully_seen_combos.append(pert)
        else:
            held_out.setdefault(_combo_seen_label(n_seen), []).append(pert)
    pool = np.unique(fully_seen_combos)
    drawn = np.random.RandomState(seed).choice(pool, int(len(pool) * combo_seen2_train_frac), replace=False).tolist()
    train.extend(drawn)
    held_out["combo_seen2"].extend(sorted(set(pool.tolist()) - set(drawn)))
    return train, held_out


def gears_simulation_split(
    conditions: Sequence[str],
    seed: int = 1,
    train_gene_set_size: float = 0.75,
    combo_seen2_train_frac: float = 0.75,
    syntax: ConditionSyntax = ConditionSyntax(),
) -> Split:
    """GEARS' simulation split (`DataSplitter(split_type='simulation').split_data`), same result for same input.

    A seeded `train_gene_set_size` share of the genes are train genes. Test: singles of the other genes
    (`unseen_single`), combinations with one or no train gene (`combo_seen1`, `combo_seen0`) and the
    `1 - combo_seen2_train_frac` share of the combinations of two train genes (`combo_seen2`). Validation:
    the same procedure inside train at 0.9/0.9. Control is always in train.

    Args:
        conditions: Condition strings as written in the data (spelling matters: GEARS sorts combination
            strings before drawing). Pass the first raw spelling of each condition; later spellings of an
            already seen condition are ignored.
        seed: Seed of GEARS' numpy draws.
        syntax: How `conditions` are spelled.

    Returns:
        A Split with canonical names.
    """
    seed = _check_seed(seed)
    _check_fraction(train_gene_set_size, "train_gene_set_size")
    _check_fraction(combo_seen2_train_frac, "combo_seen2_train_frac")
    canonical_of: dict[str, str] = {}
    seen_names: set[str] = set()
    for raw in conditions:
        try:
            name = syntax.canonical(raw)
        except ConditionError as error:
            raise SplitError(f"cannot split: {error}") from None
        spelling = gears_spelling(raw, syntax)
        if spelling is not None and name not in seen_names:
            canonical_of[spelling] = name
            seen_names.add(name)
    if not canonical_of:
        raise SplitError("cannot split: the conditions hold no perturbation besides control")
    train, test_groups = _gears_round(list(canonical_of), train_gene_set_size, combo_seen2_train_frac, seed)
    train, val_groups = _gears_round(train, _GEARS_VALIDATION_FRACTION, _GEARS_VALIDATION_FRACTION, seed)

    def to_canonical(spellings: Iterable[str]) -> list[str]:
        return [canonical_of[spelling] for spelling in spellings]

    test_subgroups = {label: to_canonical(names) for label, names in test_groups.items()}
    val_subgroups = {label: to_canonical(names) for label, names in val_groups.items()}
    return Split(
        scheme="gears",
        seed=seed,
        train=[CONTROL, *to_canonical(train)],
        val=[name for names in val_subgroups.values() for name in names],
        test=[name for names in test_subgroups.values() for name in names],
        test_subgroups=test_subgroups,
        val_subgroups=val_subgroups,
        params={
            "train_gene_set_size": train_gene_set_size,
            "combo_seen2_train_frac": combo_seen2_train_frac,
            "validation_train_gene_set_size": _GEARS_VALIDATION_FRACTION,
            "validation_combo_seen2_train_frac": _GEARS_VALIDATION_FRACTION,
        },
    )


def gears_split(
    data: PerturbationData,
    seed: int = 1,
    train_gene_set_size: float = 0.75,
    combo_seen2_train_frac: float = 0.75,
    drop_unmeasured: bool = False,
) -> Split:
    """`gears_simulation_split` of the data's conditions, optionally of only those whose genes it measures.

    GEARS drops the perturbations of genes outside its gene graph before it splits. `drop_unmeasured` does
    the same for the genes data-derived (co-expression) features can describe: a condition with a gene the
    data does not measure takes part in no role, a warning names it, and the split records it under
    `params["dropped_conditions"]`. The draws are GEARS' own on the remaining conditions.

    Raises:
        SplitError: for a bad parameter, or when no perturbation remains.
    """
    if not isinstance(drop_unmeasured, bool):
        raise SplitError(f"drop_unmeasured must be true or false, got {drop_unmeasured!r}")
    measured = set(data.genes)
    dropped = [name for name in data.condition_names
               if drop_unmeasured and name != CONTROL and not set(genes_of(name)) <= measured]
    dropped_set = set(dropped)
    if dropped:
        warnings.warn(
            f"split gears (drop_unmeasured): {len(dropped)} condition(s) perturb a gene the data does not measure, "
            f"so no data-derived feature describes it, and take part in no role: {', '.join(dropped)}",
            UserWarning,
            stacklevel=3,
        )
    kept = [name for name in data.condition_names if name not in dropped_set]
    split = gears_simulation_split([data.raw_spelling[name] for name in kept], seed, train_gene_set_size,
                                   combo_seen2_train_frac, syntax=data.syntax)
    split.data_fingerprint = data.fingerprint
    if drop_unmeasured:
        split.params.update(drop_unmeasured=True, dropped_conditions=dropped)
    return split


# --- doubles -----------------------------------------------------------------------------------------------


def _held_out_count(fraction: float, available: int, *, minimum: int) -> int:
    """Round `fraction * available` half up, with a floor of `minimum` (never more than available)."""
    return min(available, max(minimum, int(fraction * available + 0.5)))


def doubles_split(
    data_or_conditions: PerturbationData | Sequence[str],
    seed: int = 1,
    test_fraction: float = 0.25,
    val_fraction: float = 0.25,
    unseen_combos: str = "test",
    syntax: ConditionSyntax = ConditionSyntax(),
) -> Split:
    """Hold out combinations whose genes were all perturbed alone (SAMS-VAE's Norman OOD protocol).

    Every single is in train. Among combinations (two or more genes) whose every gene also has a single in the
    data, a seeded `test_fraction` (rounded half up, at least 1) goes to test as `combo_seen2` (`combo_seenK`
    for K genes), then a seeded `val_fraction` of the rest (at least 1 when 2 or more remain, always leaving
    one in train) goes to validation; the others train. Draws use numpy's legacy RandomState, whose stream
    numpy keeps stable across versions, over sorted canonical names.

    Combinations with a gene that has no single cannot be predicted additively. With `unseen_combos="test"`
    (default) they go to test under `combo_seen1`/`combo_seen0`, so users see how the model does on them;
    with `"train"` they are training data.

    Args:
        data_or_conditions: The data, or condition strings spelled per `syntax`.

    Raises:
        SplitError: when no combination has all its singles in the data, or for a bad parameter.
    """
    seed = _check_seed(seed)
    _check_fraction(test_fraction, "test_fraction", allow_zero=False)
    _check_fraction(val_fraction, "val_fraction")
    if unseen_combos not in UNSEEN_COMBO_CHOICES:
        raise SplitError(f"unseen_combos must be one of {', '.join(UNSEEN_COMBO_CHOICES)}, got {unseen_combos!r}")
    names, fingerprint = _canonical_conditions(data_or_conditions, syntax)
    singles = {name for name in names if len(genes_of(name)) == 1}
    combos = sorted(name for name in names if len(genes_of(name)) > 1)
    single_genes = {genes_of(name)[0] for name in singles}
    predictable = [name for name in combos if all(gene in single_genes for gene in genes_of(name))]
    if not predictable:
        raise SplitError(
            f"no combination has all its genes perturbed alone in the data ({len(combos)} combination(s), "
            f"{len(singles)} single(s)); the doubles split needs some. Use scheme 'gears' or 'custom' instead"
        )
    unpredictable = sorted(set(combos) - set(predictable))
    rng = np.random.RandomState(seed)
    test = rng.choice(predictable, _held_out_count(test_fraction, len(predictable), minimum=1), replace=False).tolist()
    remaining = sorted(set(predictable) - set(test))
    n_val = _held_out_count(val_fraction, len(remaining), minimum=1) if val_fraction > 0 and len(remaining) >= 2 else 0
    val = rng.choice(remaining, min(n_val, len(remaining) - 1), replace=False).tolist() if n_val else []
    train = sorted(set(remaining) - set(val)) + sorted(singles)
    if unseen_combos == "test":
        test += unpredictable
    else:
        train += unpredictable
    test_subgroups = _subgroups_by_seen_singles(test, train)
    return Split(
        scheme="doubles",
        seed=seed,
        train=[CONTROL, *train],
        val=val,
        test=test,
        test_subgroups=test_subgroups,
        val_subgroups=_subgroups_by_seen_singles(val, train),
        params={"test_fraction": test_fraction, "val_fraction": val_fraction, "unseen_combos": unseen_combos},
        data_fingerprint=fingerprint,
    )


def _canonical_conditions(
    data_or_conditions: PerturbationData | Sequence[str], syntax: ConditionSyntax
) -> tuple[list[str], str | None]:
    """Unique canonical perturbation names (control dropped) and the data fingerprint when data was given."""
    if isinstance(data_or_conditions, PerturbationData):
        names, fingerprint = data_or_conditions.condition_names, data_or_conditions.fingerprint
    else:
        try:
            names = [syntax.canonical(text) for text in data_or_conditions]
        except ConditionError as error:
            raise SplitError(f"cannot split: {error}") from None
        fingerprint = None
    return sorted(set(names) - {CONTROL}), fingerprint


# --- unseen singles ----------------------------------------------------------------------------------------


def unseen_singles_split(
    data: PerturbationData, seed: int = 1, test_fraction: float = 0.25, val_fraction: float = 0.0, measured_only: bool = False
) -> Split:
    """Hold out whole genes: every condition of a held-out gene leaves training (GEARS' `unseen_single`).

    Candidates are the genes with a single-gene condition; with `measured_only`, only those the data measures,
    the genes data-derived (co-expression) features describe. A seeded `test_fraction` of the candidates
    (rounded half up, at least 1) are test genes, then a seeded `val_fraction` of the rest validation genes
    (always leaving one candidate to train). Test holds every condition with a test gene (`unseen_single` for
    its single, `combo_seenK` for a combination with K genes seen alone in training), validation every other
    condition with a validation gene; everything else trains. Draws use numpy's legacy RandomState over sorted
    names, like the other schemes.

    Raises:
        SplitError: for a bad parameter, or fewer than two candidate genes.
    """
    seed = _check_seed(seed)
    _check_fraction(test_fraction, "test_fraction", allow_zero=False)
    _check_fraction(val_fraction, "val_fraction")
    if not isinstance(measured_only, bool):
        raise SplitError(f"measured_only must be true or false, got {measured_only!r}")
    names, fingerprint = _canonical_conditions(data, ConditionSyntax())
    measured = set(data.genes)
    candidates = [name for name in names if len(genes_of(name)) == 1 and (not measured_only or name in measured)]
    if len(candidates) < 2:
        which = "measured genes with a single-gene condition" if measured_only else "genes with a single-gene condition"
        raise SplitError(f"unseen_singles needs at least two {which}, found {len(candidates)}"
                         + ("; set measured_only false" if measured_only else ""))
    rng = np.random.RandomState(seed)
    test_genes = set(rng.choice(candidates, _held_out_count(test_fraction, len(candidates), minimum=1), replace=False).tolist())
    remaining = sorted(set(candidates) - test_genes)
    n_val = min(_held_out_count(val_fraction, len(remaining), minimum=1), len(remaining) - 1) if val_fraction > 0 else 0
    val_genes = set(rng.choice(remaining, n_val, replace=False).tolist()) if n_val > 0 else set()
    test = [name for name in names if test_genes & set(genes_of(name))]
    val = [name for name in names if val_genes & set(genes_of(name)) and name not in test]
    train = sorted(set(names) - set(test) - set(val))
    return Split(
        scheme="unseen_singles",
        seed=seed,
        train=[CONTROL, *train],
        val=val,
        test=test,
        test_subgroups=_subgroups_by_seen_singles(test, train),
        val_subgroups=_subgroups_by_seen_singles(val, train),
        params={"test_fraction": test_fraction, "val_fraction": val_fraction, "measured_only": measured_only},
        data_fingerprint=fingerprint,
    )


# --- custom ------------------------------------------------------------------------------------------------


def custom_split(data: PerturbationData, column: str) -> Split:
    """The user's own split from an obs column of `train`/`val`/`test` labels (case and spaces ignored).

    All cells of a condition must share one role. Control cells' labels are ignored and control goes to
    train: files often spread control cells over every role, and every role needs them as the baseline.
    Subgroups group held-out conditions by how many of their genes have a single in train.

    Raises:
        SplitError: for a missing column, an unknown or missing label, or a condition with several roles.
    """
    obs = data.adata.obs
    if column not in obs:
        raise SplitError(f"obs has no split column {column!r}; available: {', '.join(map(str, obs.columns))}")
    labels = obs[column]
    is_control = data.conditions == CONTROL
    missing = labels.isna().to_numpy() & ~is_control
    if missing.any():
        raise SplitError(
            f"{int(missing.sum())} perturbed cells have no value in obs[{column!r}]; label each train, val or test"
        )
    roles = labels.astype(str).str.strip().str.lower().to_numpy()
    unknown = sorted(set(roles[~is_control]) - set(ROLES))
    if unknown:
        raise SplitError(f"obs[{column!r}] has value(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(ROLES)}")
    role_sets: dict[str, set[str]] = {}
    for condition, role in zip(data.conditions[~is_control], roles[~is_control]):
        role_sets.setdefault(condition, set()).add(role)
    mixed = sorted(name for name, found in role_sets.items() if len(found) > 1)
    if mixed:
        raise SplitError(
            f"obs[{column!r}] gives {len(mixed)} condition(s) cells in several roles (e.g. {', '.join(mixed[:5])}); "
            "a split assigns whole conditions, so give all cells of a condition one role"
        )
    by_role = {role: sorted(name for name, found in role_sets.items() if role in found) for role in ROLES}
    return Split(
        scheme="custom",
        seed=None,
        train=[CONTROL, *by_role["train"]],
        val=by_role["val"],
        test=by_role["test"],
        test_subgroups=_subgroups_by_seen_singles(by_role["test"], by_role["train"]),
        val_subgroups=_subgroups_by_seen_singles(by_role["val"], by_role["train"]),
        params={"column": column},
        data_fingerprint=data.fingerprint,
    )


# --- benchmark folds ---------------------------------------------------------------------------------------


def benchmark_combinations(data_or_conditions: PerturbationData | Sequence[str], syntax: ConditionSyntax = ConditionSyntax()) -> list[str]:
    """Combinations whose every gene has a single in the data, sorted: the ones benchmark folds hold out."""
    names, _ = _canonical_conditions(data_or_conditions, syntax)
    single_genes = {genes_of(name)[0] for name in names if len(genes_of(name)) == 1}
    return [name for name in names if len(genes_of(name)) > 1 and all(gene in single_genes for gene in genes_of(name))]


def n_benchmark_folds(data: PerturbationData, protocol: str, n_folds: int = 5) -> int:
    """How many folds a benchmark protocol has on `data`."""
    if protocol == "singles_only":
        return 1
    combinations = _checked_benchmark_combinations(data)
    return len(combinations) if protocol == "lodo" else min(_checked_fold_count(n_folds), len(combinations))


def lodo_split(data: PerturbationData, fold: int) -> Split:
    """Leave one combination out: fold `fold` tests the fold-th benchmark combination; all else trains."""
    combinations = _checked_benchmark_combinations(data)
    _check_fold(fold, len(combinations))
    return _fold_split(data, "lodo", [combinations[fold]], {"fold": fold})


def kfold_split(data: PerturbationData, fold: int, n_folds: int = 5, seed: int = 1) -> Split:
    """Fold `fold` of `n_folds` seeded folds of the benchmark combinations (sizes differ by at most 1)."""
    combinations = _checked_benchmark_combinations(data)
    n_folds = min(_checked_fold_count(n_folds), len(combinations))
    _check_fold(fold, n_folds)
    order = np.random.RandomState(_check_seed(seed)).permutation(len(combinations))
    held_out = [combinations[index] for index in np.array_split(order, n_folds)[fold]]
    return _fold_split(data, "kfold", held_out, {"fold": fold, "n_folds": n_folds}, seed)


def singles_only_split(data: PerturbationData) -> Split:
    """Train on control and singles; test every benchmark combination (other combinations take no part)."""
    combinations = _checked_benchmark_combinations(data)
    singles = [name for name in data.condition_names if len(genes_of(name)) == 1]
    return Split(
        scheme="singles_only",
        seed=None,
        train=[CONTROL, *singles],
        val=[],
        test=combinations,
        test_subgroups=_subgroups_by_seen_singles(combinations, singles),
        val_subgroups={},
        params={},
        data_fingerprint=data.fingerprint,
    )


def _fold_split(data: PerturbationData, scheme: str, held_out: list[str], params: dict, seed: int | None = None) -> Split:
    train = [name for name in data.condition_names if name not in set(held_out)]
    return Split(
        scheme=scheme,
        seed=seed,
        train=train,
        val=[],
        test=held_out,
        test_subgroups=_subgroups_by_seen_singles(held_out, train),
        val_subgroups={},
        params=params,
        data_fingerprint=data.fingerprint,
    )


def _checked_benchmark_combinations(data: PerturbationData) -> list[str]:
    combinations = benchmark_combinations(data)
    if not combinations:
        raise SplitError(
            "no combination has all its genes perturbed alone in the data; the benchmark protocols hold out such "
            "combinations (use scheme gears, doubles or custom for other screens)"
        )
    return combinations


def _checked_fold_count(n_folds: object) -> int:
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise SplitError(f"n_folds must be an integer of at least 2, got {n_folds!r}")
    return n_folds


def _check_fold(fold: object, n_folds: int) -> None:
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < n_folds:
        raise SplitError(f"fold must be an integer in [0, {n_folds - 1}] ({n_folds} folds), got {fold!r}")


# --- entry point -------------------------------------------------------------------------------------------

_PARAMETERS = {
    "gears": ("train_gene_set_size", "combo_seen2_train_frac", "drop_unmeasured"),
    "doubles": ("test_fraction", "val_fraction", "unseen_combos"),
    "custom": ("column",),
    "lodo": ("fold",),
    "kfold": ("fold", "n_folds"),
    "singles_only": (),
    "unseen_singles": ("test_fraction", "val_fraction", "measured_only"),
    "transfer": ("target", "test_fraction"),
    "cells": ("test_fraction",),
}


def make_split(data: PerturbationData, scheme: str, seed: int = 1, **params) -> Split:
    """Make a split of `data` by scheme name (the CLI's entry point); the data fingerprint is recorded.

    Raises:
        SplitError: for an unknown scheme or a parameter the scheme does not take.
    """
    if scheme not in SCHEMES:
        raise SplitError(f"unknown split scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    unexpected = sorted(set(params) - set(_PARAMETERS[scheme]))
    if unexpected:
        raise SplitError(
            f"split scheme {scheme!r} takes no parameter(s) {', '.join(unexpected)}; "
            f"it takes: {', '.join(_PARAMETERS[scheme])}"
        )
    if scheme in ("transfer", "cells"):
        held_out = "conditions in one covariate level" if scheme == "transfer" else "a fraction of every condition's cells"
        raise SplitError(f"scheme {scheme} holds out {held_out}, not whole conditions: run it with "
                         f"perturbedvae {scheme} --config CONFIG")
    if scheme == "gears":
        return gears_split(data, seed, **params)
    if scheme == "doubles":
        return doubles_split(data, seed, **params)
    if scheme in ("lodo", "kfold") and "fold" not in params:
        raise SplitError(f"split scheme {scheme!r} needs fold=<index of the held-out fold>")
    if scheme == "lodo":
        return lodo_split(data, params["fold"])
    if scheme == "kfold":
        return kfold_split(data, params["fold"], params.get("n_folds", 5), seed)
    if scheme == "singles_only":
        return singles_only_split(data)
    if scheme == "unseen_singles":
        return unseen_singles_split(data, seed, **params)
    if "column" not in params:
        raise SplitError("split scheme 'custom' needs column=<obs column with train/val/test labels>")
    return custom_split(data, params["column"])
