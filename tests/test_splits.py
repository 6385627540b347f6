"""Splits: the doubles and custom schemes, the JSON file, and the checks that keep a split tied to its data."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from perturbedvae.data.conditions import CONTROL, genes_of
from perturbedvae.data.loading import load_dataset
from perturbedvae.data.splits import Split, custom_split, doubles_split, gears_simulation_split, make_split
from perturbedvae.errors import SplitError
from tests.conftest import make_toy_adata

NORMAN_PREDICTABLE_DOUBLES = {"KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+MAP2K6", "MAP2K3+SLC38A2", "MAPK1+TGFBR2"}


def all_roles(split: Split) -> list[str]:
    return split.train + split.val + split.test


def synthetic_conditions(n_genes: int = 12) -> list[str]:
    """Every single of G0..G{n-1} and every double among them, plus doubles with a gene never seen alone."""
    genes = [f"G{index}" for index in range(n_genes)]
    doubles = [f"{a}+{b}" for i, a in enumerate(genes) for b in genes[i + 1 :]]
    return ["control", *genes, *doubles, "G0+X1", "X1+X2"]


# --- doubles ----------------------------------------------------------------------------------------------


def test_norman_doubles_hold_out_only_predictable_doubles(norman_data):
    split = make_split(norman_data, "doubles", seed=1)
    assert sorted(all_roles(split)) == sorted(norman_data.condition_names)
    assert set(split.test_subgroups["combo_seen2"]) | set(split.val) <= NORMAN_PREDICTABLE_DOUBLES
    held_out_seen2 = split.test_subgroups["combo_seen2"] + split.val_subgroups["combo_seen2"]
    for name in held_out_seen2:
        assert all(split.role_of(gene) == "train" for gene in genes_of(name))
    singles = [name for name in norman_data.condition_names if len(genes_of(name)) == 1]
    assert all(split.role_of(name) == "train" for name in singles)
    assert split.role_of(CONTROL) == "train"
    # 5 predictable doubles: 25% rounds to 1 test, 25% of the 4 left to 1 validation, 3 train.
    assert (len(split.test_subgroups["combo_seen2"]), len(split.val)) == (1, 1)
    assert len(NORMAN_PREDICTABLE_DOUBLES & set(split.train)) == 3


def test_norman_unpredictable_doubles_go_to_test_by_default_or_train_on_request(norman_data):
    unpredictable = {name for name in norman_data.condition_names if len(genes_of(name)) == 2} - NORMAN_PREDICTABLE_DOUBLES
    default = make_split(norman_data, "doubles", seed=3)
    labelled = set(default.test_subgroups.get("combo_seen1", [])) | set(default.test_subgroups.get("combo_seen0", []))
    assert labelled == unpredictable
    single_genes = {name for name in norman_data.condition_names if len(genes_of(name)) == 1}
    for name in default.test_subgroups["combo_seen1"]:
        assert sum(gene in single_genes for gene in genes_of(name)) == 1
    as_train = make_split(norman_data, "doubles", seed=3, unseen_combos="train")
    assert unpredictable <= set(as_train.train)
    assert set(as_train.test_subgroups) == {"combo_seen2"}
    assert as_train.test_subgroups["combo_seen2"] == default.test_subgroups["combo_seen2"]


def test_doubles_are_reproducible_and_seed_dependent():
    conditions = synthetic_conditions()
    first, again = doubles_split(conditions, seed=5), doubles_split(conditions, seed=5)
    assert first == again
    test_sets = {tuple(doubles_split(conditions, seed=seed).test) for seed in range(5)}
    assert len(test_sets) == 5


def test_doubles_fractions_and_subgroups():
    conditions = synthetic_conditions()  # 66 predictable doubles
    split = doubles_split(conditions, seed=0, test_fraction=0.25, val_fraction=0.25)
    assert len(split.test_subgroups["combo_seen2"]) == 17  # 16.5 rounds half up
    assert len(split.val) == 12  # 25% of the 49 left, rounded
    assert split.test_subgroups["combo_seen1"] == ["G0+X1"]
    assert split.test_subgroups["combo_seen0"] == ["X1+X2"]
    assert split.params == {"test_fraction": 0.25, "val_fraction": 0.25, "unseen_combos": "test"}
    no_val = doubles_split(conditions, seed=0, val_fraction=0.0)
    assert no_val.val == [] and no_val.val_subgroups == {}


def test_doubles_keep_one_double_in_train_and_one_in_validation_when_few():
    conditions = ["control", "A", "B", "C", "A+B", "A+C", "B+C"]
    split = doubles_split(conditions, seed=0, test_fraction=0.1, val_fraction=0.9)
    assert (len(split.test), len(split.val)) == (1, 1)
    assert len([name for name in split.train if "+" in name]) == 1


def test_doubles_without_predictable_combination_is_an_error():
    with pytest.raises(SplitError, match="no combination has all its genes perturbed alone"):
        doubles_split(["control", "A", "B+C", "A+D"])


@pytest.mark.parametrize(
    "params, message",
    [({"test_fraction": 0.0}, "test_fraction"), ({"val_fraction": 1.5}, "val_fraction"), ({"unseen_combos": "drop"}, "unseen_combos")],
)
def test_doubles_bad_parameters(params, message):
    with pytest.raises(SplitError, match=message):
        doubles_split(synthetic_conditions(4), **params)


# --- custom -----------------------------------------------------------------------------------------------


def toy_with_roles(roles_by_condition: dict[str, str], control_role: str = "test"):
    adata = make_toy_adata(conditions=["control", *roles_by_condition], cells_per_condition=4)
    roles = {**roles_by_condition, "control": control_role}
    adata.obs["my_split"] = adata.obs["condition"].map(roles)
    return adata


def test_custom_split_reads_roles_per_condition_and_keeps_control_in_train():
    roles = {"G0": "train", "G1": "Train ", "G2": "val", "G0+G1": "test", "G1+G3": "TEST", "G3": "train"}
    data = load_dataset(toy_with_roles(roles), min_cells=1)
    split = make_split(data, "custom", column="my_split")
    assert split.train == sorted(["control", "G0", "G1", "G3"])
    assert (split.val, split.test) == (["G2"], ["G0+G1", "G1+G3"])
    assert split.test_subgroups == {"combo_seen2": ["G0+G1", "G1+G3"]}
    assert split.val_subgroups == {"unseen_single": ["G2"]}
    assert split.seed is None and split.params == {"column": "my_split"}


def test_custom_split_errors():
    data = load_dataset(toy_with_roles({"G0": "train", "G1": "val", "G0+G1": "holdout"}), min_cells=1)
    with pytest.raises(SplitError, match="available: .*my_split"):
        custom_split(data, "nope")
    with pytest.raises(SplitError, match="'holdout'"):
        custom_split(data, "my_split")
    mixed = toy_with_roles({"G0": "train", "G1": "val"})
    mixed.obs.loc[mixed.obs.index[mixed.obs["condition"] == "G1"][0], "my_split"] = "train"
    with pytest.raises(SplitError, match="several roles .*G1"):
        custom_split(load_dataset(mixed, min_cells=1), "my_split")
    unlabeled = toy_with_roles({"G0": "train", "G1": "val"})
    unlabeled.obs.loc[unlabeled.obs.index[unlabeled.obs["condition"] == "G0"], "my_split"] = np.nan
    with pytest.raises(SplitError, match="no value"):
        custom_split(load_dataset(unlabeled, min_cells=1), "my_split")
    with pytest.raises(SplitError, match="needs column"):
        make_split(data, "custom")


# --- file, lookup, data checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["gears", "doubles"])
def test_json_round_trip_is_exact_and_readable(norman_data, tmp_path, scheme):
    split = make_split(norman_data, scheme, seed=2)
    path = tmp_path / "split.json"
    split.save(path)
    assert Split.load(path) == split
    content = json.loads(path.read_text())
    for role in ("train", "val", "test"):
        assert content[role] == sorted(content[role])
    assert content["data_fingerprint"] == norman_data.fingerprint
    assert path.read_text().count("\n") > len(norman_data.condition_names)  # one name per line


def test_custom_split_round_trip(tmp_path):
    split = custom_split(load_dataset(toy_with_roles({"G0": "train", "G1": "val", "G0+G1": "test"}), min_cells=1), "my_split")
    split.save(tmp_path / "custom.json")
    assert Split.load(tmp_path / "custom.json") == split


def saved_content(tmp_path) -> dict:
    split = doubles_split(synthetic_conditions(4), seed=0)
    split.save(tmp_path / "split.json")
    return json.loads((tmp_path / "split.json").read_text())


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda content: "{not json", "not valid JSON"),
        (lambda content: json.dumps([1, 2]), "not a perturbedvae split file"),
        (lambda content: json.dumps({**content, "scheme": "random"}), "unknown split scheme 'random'"),
        (lambda content: json.dumps({k: v for k, v in content.items() if k != "test"}), "lacks key"),
        (lambda content: json.dumps({**content, "val": [*content["val"], content["test"][0]]}), "in both val and test"),
        (lambda content: json.dumps({**content, "test": ["G1+G0"]}), "not a canonical condition name"),
        (lambda content: json.dumps({**content, "seed": "one"}), "'seed' must be an integer"),
        (lambda content: json.dumps({**content, "test_subgroups": {"combo_seen2": ["G0"]}}), "not in test"),
    ],
)
def test_load_rejects_corrupt_files(tmp_path, corrupt, message):
    content = saved_content(tmp_path)
    (tmp_path / "bad.json").write_text(corrupt(content))
    with pytest.raises(SplitError, match=message):
        Split.load(tmp_path / "bad.json")


def test_load_missing_file(tmp_path):
    with pytest.raises(SplitError, match="no such split file"):
        Split.load(tmp_path / "absent.json")


def test_role_of_reads_any_spelling():
    split = doubles_split(["control", "A", "B", "C", "A+B", "A+C", "B+C", "D+A"], seed=0, val_fraction=0.0)
    assert split.role_of("A+ctrl") == "train"
    assert split.role_of("ctrl") == "train"
    held_out = split.test_subgroups["combo_seen2"][0]
    assert split.role_of("+".join(reversed(genes_of(held_out)))) == "test"
    assert split.role_of("A+D") == "test"
    assert split.role_of("Z") is None
    with pytest.raises(SplitError, match="cannot look up"):
        split.role_of("A++B")


def test_check_matches(norman_data):
    split = make_split(norman_data, "gears", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split.check_matches(norman_data)
    toy = load_dataset(make_toy_adata())
    with pytest.raises(SplitError, match="absent from the data"):
        split.check_matches(toy)


def test_check_matches_warns_on_changed_values_and_unassigned_conditions():
    adata = make_toy_adata()
    data = load_dataset(adata)
    split = make_split(data, "doubles", seed=0)
    changed = adata.copy()
    changed.X = changed.X + 1.0
    with pytest.warns(UserWarning, match="fingerprint"):
        split.check_matches(load_dataset(changed))
    partial = Split("custom", None, ["control", "G0"], [], ["G0+G1"], {}, {})
    with pytest.warns(UserWarning, match="in no role"):
        partial.check_matches(data)


def test_make_split_rejects_unknown_scheme_and_parameters(norman_data):
    with pytest.raises(SplitError, match="choose one of gears, doubles, custom"):
        make_split(norman_data, "random")
    with pytest.raises(SplitError, match="takes: train_gene_set_size, combo_seen2_train_frac, drop_unmeasured"):
        make_split(norman_data, "gears", test_fraction=0.2)
    with pytest.raises(SplitError, match="drop_unmeasured must be true or false, got 'yes'"):
        make_split(norman_data, "gears", drop_unmeasured="yes")


def test_gears_split_validates_inputs():
    with pytest.raises(SplitError, match="train_gene_set_size"):
        gears_simulation_split(["A", "B"], train_gene_set_size=1.5)
    with pytest.raises(SplitError, match="no perturbation besides control"):
        gears_simulation_split(["ctrl"])
    with pytest.raises(SplitError, match="seed"):
        gears_simulation_split(["A", "B"], seed=-1)


NORMAN_BENCHMARK_DOUBLES = ["KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+MAP2K6", "MAP2K3+SLC38A2", "MAPK1+TGFBR2"]


def test_lodo_holds_out_each_benchmark_combination_once(norman_data):
    from perturbedvae.data.splits import benchmark_combinations, n_benchmark_folds

    assert benchmark_combinations(norman_data) == NORMAN_BENCHMARK_DOUBLES
    assert n_benchmark_folds(norman_data, "lodo") == 5
    folds = [make_split(norman_data, "lodo", fold=fold) for fold in range(5)]
    assert [split.test for split in folds] == [[name] for name in NORMAN_BENCHMARK_DOUBLES]
    for split in folds:
        assert split.val == [] and split.test_subgroups == {"combo_seen2": split.test}
        assert sorted(split.train + split.test) == sorted(norman_data.condition_names)  # everything else trains
    with pytest.raises(SplitError, match=r"fold must be an integer in \[0, 4\]"):
        make_split(norman_data, "lodo", fold=5)
    with pytest.raises(SplitError, match="needs fold"):
        make_split(norman_data, "lodo")


def test_kfold_partitions_the_benchmark_combinations(norman_data):
    folds = [make_split(norman_data, "kfold", seed=2, fold=fold, n_folds=2) for fold in range(2)]
    held = [name for split in folds for name in split.test]
    assert sorted(held) == NORMAN_BENCHMARK_DOUBLES and sorted(len(split.test) for split in folds) == [2, 3]
    assert folds[0].test == make_split(norman_data, "kfold", seed=2, fold=0, n_folds=2).test  # seeded


def test_singles_only_trains_on_singles_and_tests_every_benchmark_combination(norman_data):
    split = make_split(norman_data, "singles_only")
    assert split.test == NORMAN_BENCHMARK_DOUBLES
    assert all(len(name.split("+")) == 1 for name in split.train)
    assert sorted(split.train) == sorted(name for name in norman_data.condition_names if "+" not in name)  # control + 18 singles
