import json

import numpy as np
import pandas as pd
import pytest

from perturbedvae.cli import main
from perturbedvae.evaluate.baselines import additive


@pytest.fixture(scope="module")
def norman_split(tmp_path_factory, norman_path):
    out = tmp_path_factory.mktemp("split") / "split.json"
    assert main([
        "split", str(norman_path), "--obs-filter", "dataset=norman19", "--scheme", "doubles", "--seed", "1", "--out", str(out)
    ]) == 0
    return out


def test_split_is_written_and_reproducible(norman_split, tmp_path, norman_path):
    again = tmp_path / "new_folder" / "again.json"  # the README's command writes into a folder not yet made
    assert main(["split", "norman2019_subset", "--scheme", "doubles", "--seed", "1", "--out", str(again)]) == 0
    first, second = json.loads(norman_split.read_text()), json.loads(again.read_text())
    assert first["test"] == second["test"] and first["test_subgroups"]["combo_seen2"]


def test_baselines_command_writes_every_baseline(norman_split, tmp_path, capsys):
    out = tmp_path / "baselines"
    assert main(["baselines", "norman2019_subset", "--split", str(norman_split), "--out", str(out)]) == 0
    tidy = pd.read_csv(out / "metrics.csv")
    assert set(tidy["model"]) == {"no_change", "train_mean", "additive", "linear", "dominance", "saturating_additive"}
    assert {"pearson_delta_de", "mse_de", "rank", "energy_distance"} <= set(tidy["metric"])
    assert "| combo_seen2 | additive |" in capsys.readouterr().out
    results = json.loads((out / "metrics.json").read_text())
    assert set(results) >= {"additive", "linear"}


def test_evaluate_scores_a_prediction_file_beside_baselines(norman_split, norman_data, tmp_path):
    from perturbedvae.data.splits import Split

    split = Split.load(norman_split)
    predictions = additive(norman_data, split.train, split.test)
    path = tmp_path / "predictions" / "pred.h5ad"
    predictions.write_h5ad(path)
    out = tmp_path / "eval"
    assert main([
        "evaluate", "--predictions", str(path), "--data", "norman2019_subset", "--split", str(norman_split),
        "--out", str(out), "--name", "mine",
    ]) == 0
    tidy = pd.read_csv(out / "metrics.csv")
    mine = tidy[(tidy.model == "mine") & (tidy.metric == "mse_de")].set_index("condition")["value"]
    theirs = tidy[(tidy.model == "additive") & (tidy.metric == "mse_de")].set_index("condition")["value"]
    pd.testing.assert_series_equal(mine.sort_index(), theirs.sort_index(), check_names=False)


def test_user_errors_exit_2_with_one_line(tmp_path, capsys, toy_adata, norman_split):
    path = tmp_path / "toy.h5ad"
    toy_adata.write_h5ad(path)
    assert main(["split", str(path), "--condition-key", "missing", "--scheme", "doubles", "--out", str(tmp_path / "s.json")]) == 2
    assert "obs has no column 'missing'" in capsys.readouterr().err
    bad = tmp_path / "pred.h5ad"
    toy_adata.write_h5ad(bad)
    assert main(["evaluate", "--predictions", str(bad), "--data", "norman2019_subset", "--split", str(norman_split),
                 "--out", str(tmp_path / "e")]) == 2
    assert "genes" in capsys.readouterr().err


@pytest.mark.slow
def test_train_then_predict_from_the_command_line(tmp_path, capsys):
    from tests.conftest import REPO

    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "configs" / "synthetic_tiny.yaml"), f"output.run_dir={run_dir}",
                 "train.epochs=1"]) == 0
    test = json.loads((run_dir / "split.json").read_text())["test"]
    out = tmp_path / "pred.h5ad"
    assert main(["predict", str(run_dir), "--conditions", ",".join(test[:2]), "--out", str(out)]) == 0
    import anndata as ad

    assert ad.read_h5ad(out).n_obs == 2
    sampled = [tmp_path / f"sampled{seed}.h5ad" for seed in (0, 0, 1)]
    for path, seed in zip(sampled, (0, 0, 1)):
        assert main(["predict", str(run_dir), "--conditions", f"control,{test[0]}", "--out", str(path),
                     "--sample-seed", str(seed)]) == 0
    first, again, other = (ad.read_h5ad(path) for path in sampled)
    assert set(first.obs["condition"]) == {"control", test[0]} and first.n_obs > 2  # one row per sampled cell
    np.testing.assert_array_equal(first.X, again.X)
    assert not np.array_equal(first.X, other.X)
    assert main(["predict", str(run_dir), "--conditions", "NOTAGENE", "--out", str(tmp_path / "x.h5ad")]) == 2
    assert "unknown gene" in capsys.readouterr().err


def test_counts_flags_reach_the_loader(tmp_path, capsys):
    from perturbedvae.cli import _load_data, build_parser
    from tests.conftest import make_toy_adata

    path = tmp_path / "shallow.h5ad"
    adata = make_toy_adata(counts=True)
    adata.X = np.minimum(adata.X, 19)
    adata.write_h5ad(path)
    split = ["split", str(path), "--scheme", "doubles", "--out", str(tmp_path / "s.json")]
    assert not _load_data(build_parser().parse_args([*split, "--log-normalized"])).is_counts
    assert _load_data(build_parser().parse_args([*split, "--counts"])).is_counts
    with pytest.raises(SystemExit):
        build_parser().parse_args([*split, "--counts", "--log-normalized"])
    capsys.readouterr()
    make_toy_adata().write_h5ad(path)
    assert main([*split, "--counts"]) == 2
    assert "X holds non-integer values" in capsys.readouterr().err


@pytest.mark.parametrize(("checkpoint_every", "saved", "expected"), [
    (2, True, "interrupted; continue with: perturbedvae train --config {config} output.run_dir={run} --resume"),
    (2, False, "interrupted before the first checkpoint (train.checkpoint_every 2); start over with: "
               "perturbedvae train --config {config} output.run_dir={run} output.overwrite=true"),
    (0, False, "interrupted; no checkpoint was saved (train.checkpoint_every is 0), so the run cannot be resumed"),
])
def test_ctrl_c_during_train_says_how_to_continue(tmp_path, capsys, monkeypatch, checkpoint_every, saved, expected):
    from perturbedvae.api import fitting
    from tests.conftest import REPO

    config, run = REPO / "configs" / "synthetic_tiny.yaml", tmp_path / "run"

    def interrupted_training(*args, **kwargs):
        if saved:
            (run / "checkpoints" / "epoch_0002").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(fitting, "train_from_config", interrupted_training)
    argv = ["train", "--config", str(config), f"output.run_dir={run}"]
    overrides = [] if checkpoint_every == 2 else [f"train.checkpoint_every={checkpoint_every}"]
    assert main([*argv, *overrides]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == [f"perturbedvae train: {expected.format(config=config, run=run)}"]


def test_n_top_genes_reaches_the_loader(norman_path):
    from perturbedvae.cli import _load_data, build_parser

    args = build_parser().parse_args(["split", str(norman_path), "--obs-filter", "dataset=norman19", "--scheme", "doubles",
                                      "--out", "unused.json", "--n-top-genes", "100"])
    data = _load_data(args)
    assert 100 <= len(data.genes) < 500 and set(data.perturbed_genes) & set(data.genes)


def test_quiet_silences_progress_and_verbose_shows_details(tmp_path, capsys):
    """`-q` hides the encoder's coverage (INFO), `-v` adds what was read (DEBUG); stdout keeps the command's answer."""
    from tests.conftest import make_toy_adata

    data = tmp_path / "toy.h5ad"
    make_toy_adata(cells_per_condition=10).write_h5ad(data)
    card = tmp_path / "pca.yaml"
    card.write_text("kind: expression\nrepresentation: pca\nn_components: 4\n")
    outputs = {}
    for switches in ([], ["-q"], ["-v"]):
        out = tmp_path / f"cache{''.join(switches)}"
        assert main([*switches, "embed", str(data), "--adapter", str(card), "--out", str(out)]) == 0
        outputs[tuple(switches)] = capsys.readouterr()
    coverage, read = "vocabulary covers 30/30 genes", f"read {data}: 60 cells x 30 genes, 6 conditions"
    default, quiet, verbose = outputs[()], outputs[("-q",)], outputs[("-v",)]
    assert coverage in default.err and read not in default.err
    assert coverage not in quiet.err and read not in quiet.err
    assert coverage in verbose.err and read in verbose.err
    assert all("embeddings cached in" in captured.out for captured in (default, quiet, verbose))
    with pytest.raises(SystemExit):  # the switches are global: before the subcommand
        main(["embed", "-q", str(data), "--adapter", str(card), "--out", str(tmp_path / "late")])
