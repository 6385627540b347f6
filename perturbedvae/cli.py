"""The `perturbedvae` command line.

Every subcommand is a thin layer over library functions: parse arguments, load inputs, call, write.
User mistakes arrive as `PerturbedVAEError` and are printed as one line without a traceback (exit 2).
What a command was asked for goes to stdout; progress and details go through `logging` to stderr, as much
as `-q` (warnings only), the default (progress) or `-v` (details too) asks, given before the subcommand.
Ctrl-C is one line too (exit 130, the shell's code for an interrupt), saying how to continue a training run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from perturbedvae.errors import ConfigError, PerturbedVAEError
from perturbedvae.processes import is_main_process
from perturbedvae.verbosity import set_verbosity
from perturbedvae.yaml_files import parse_value

VERBOSITY_SWITCHES = ("-q", "--quiet", "-v", "--verbose")


def _key_values(pairs: Sequence[str]) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected KEY=VALUE, got {pair!r}")
        result[key] = value
    return result


def _add_data_options(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    data_help = "an .h5ad file, or a named dataset (e.g. norman2019_subset)"
    if positional:
        parser.add_argument("data", help=data_help)
    else:
        parser.add_argument("--data", required=True, help=data_help)
    group = parser.add_argument_group("reading the data")
    group.add_argument("--condition-key", default=None, help="obs column with conditions (default: condition)")
    group.add_argument("--control-label", action="append", default=None, help="label of control cells (repeatable)")
    group.add_argument("--delimiter", default=None, help="separator of genes in a combination (default: +)")
    group.add_argument("--obs-filter", nargs="*", default=[], metavar="COLUMN=VALUE", help="keep only matching cells")
    group.add_argument("--gene-symbol-key", default=None, help="var column with gene symbols")
    group.add_argument("--min-cells", type=int, default=10, help="warn for conditions with fewer cells")
    group.add_argument("--n-top-genes", type=int, default=None,
                       help="keep this many highly variable genes, plus every measured perturbed gene")
    group.add_argument("--backed", action="store_true", default=None,
                       help="leave expression in the file and read it in chunks (screens larger than memory)")
    counts = group.add_mutually_exclusive_group()
    counts.add_argument("--counts", dest="counts", action="store_const", const=True, default=None,
                        help="X holds raw counts (error if not non-negative integers); default: detect")
    counts.add_argument("--log-normalized", dest="counts", action="store_const", const=False,
                        help="X is log-normalized even if integral; use no raw counts")


def _load_data(args: argparse.Namespace):
    from perturbedvae import datasets
    from perturbedvae.data.loading import load_dataset

    options = {
        "condition_key": args.condition_key,
        "control_labels": args.control_label,
        "delimiter": args.delimiter,
        "obs_filter": _key_values(args.obs_filter) or None,
        "gene_symbol_key": args.gene_symbol_key,
        "min_cells": args.min_cells,
        "n_top_genes": args.n_top_genes,
        "backed": args.backed,
        "counts": args.counts,
    }
    options = {key: value for key, value in options.items() if value is not None}
    if datasets.names_a_dataset(args.data):
        return datasets.load(args.data, **options)
    return load_dataset(args.data, **options)


def _cmd_split(args: argparse.Namespace) -> None:
    from perturbedvae.data.splits import make_split

    data = _load_data(args)
    params = _key_values(args.param)
    if args.column:
        params["column"] = args.column
    split = make_split(data, args.scheme, seed=args.seed, **{k: parse_value(v) for k, v in params.items()})
    split.save(args.out)
    sizes = ", ".join(f"{name}: {len(conds)}" for name, conds in split.test_subgroups.items())
    print(f"wrote {args.out}: {len(split.train)} train / {len(split.val)} val / {len(split.test)} test conditions ({sizes})")


def _evaluate_with_baselines(data, split, model_predictions, out: Path, de_method: str) -> None:
    from perturbedvae.evaluate.beside_baselines import evaluate_beside_baselines
    from perturbedvae.evaluate.evaluator import write_metrics
    from perturbedvae.evaluate.report import summary_markdown

    results, tidy = evaluate_beside_baselines(data, split, model_predictions, de_method)
    write_metrics(results, tidy, out)
    print(summary_markdown(tidy))
    print(f"\nwrote {out / 'metrics.json'} and {out / 'metrics.csv'}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from perturbedvae.data.splits import Split
    from perturbedvae.predictions import Predictions

    data = _load_data(args)
    split = Split.load(args.split)
    predictions = Predictions.read_h5ad(args.predictions, data.genes, data.syntax)
    _evaluate_with_baselines(data, split, {args.name: predictions}, Path(args.out), args.de_method)


def _cmd_baselines(args: argparse.Namespace) -> None:
    from perturbedvae.data.splits import Split

    data = _load_data(args)
    _evaluate_with_baselines(data, Split.load(args.split), {}, Path(args.out), args.de_method)


def _cmd_embed(args: argparse.Namespace) -> None:
    from perturbedvae.encoders.embed import run_embed

    entry = run_embed(
        _load_data(args), args.adapter, args.checkpoint, args.out, args.batch_size,
        min_gene_coverage=args.min_gene_coverage, min_perturbed_coverage=args.min_perturbed_coverage,
    )
    print(f"embeddings cached in {entry}")


def _cmd_simulate(args: argparse.Namespace) -> None:
    from perturbedvae.data.synthetic import simulate_to_file

    overrides = {key: parse_value(value) for key, value in _key_values(args.set).items()}
    path = simulate_to_file(args.out, overwrite=args.overwrite, **overrides)
    print(f"wrote {path}")


def _cmd_train(args: argparse.Namespace) -> None:
    from perturbedvae.api.fitting import train_from_config
    from perturbedvae.train.config import load_config

    run_dir = train_from_config(load_config(args.config, args.overrides), resume=args.resume)
    if is_main_process():
        print(f"run written to {run_dir}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from perturbedvae.api.model import PerturbedVAE

    conditions = [text.strip() for text in args.conditions.split(",")]
    predictions = PerturbedVAE.from_run(args.run_dir).predict(conditions, per_cell=args.per_cell, sample_seed=args.sample_seed)
    predictions.write_h5ad(args.out)
    row = "condition" if predictions.cells is None else ("sampled cell" if args.sample_seed is not None else "cell")
    print(f"wrote {args.out}: predictions for {len(predictions.conditions)} conditions (one row per {row})")


def _cmd_compare(args: argparse.Namespace) -> None:
    from perturbedvae.comparison import run_compare

    out = run_compare(args.config, args.overrides)
    if is_main_process():
        print(f"report written to {out / 'report.md'} and {out / 'report.html'}")


def _cmd_benchmark(args: argparse.Namespace) -> None:
    from perturbedvae.benchmark import run_benchmark

    result = run_benchmark(args.config, args.protocol, args.seeds, args.out, args.overrides, n_folds=args.n_folds,
                           n_bootstrap=args.bootstrap)
    if is_main_process():
        print((Path(args.out) / "benchmark.md").read_text())
        print(f"wrote {Path(args.out) / 'benchmark.md'}, benchmark.csv, verdicts.csv and benchmark.png ({len(result.tidy)} scores)")


def _print_run(run_dir: Path) -> None:
    """The headline table of a run that scored itself beside its baselines, and where it is."""
    import pandas as pd

    from perturbedvae.evaluate.report import summary_markdown

    print(summary_markdown(pd.read_csv(run_dir / "metrics.csv")))
    print(f"\nrun written to {run_dir}")


def _cmd_transfer(args: argparse.Namespace) -> None:
    from perturbedvae.transfer import run_transfer

    _print_run(run_transfer(args.config, args.overrides))


def _cmd_cells(args: argparse.Namespace) -> None:
    from perturbedvae.cell_split import run_cell_split

    _print_run(run_cell_split(args.config, args.overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perturbedvae", description=__doc__.splitlines()[0])
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const="quiet", default="normal",
                           help="show warnings and errors only, no progress")
    verbosity.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const="verbose",
                           help="also show details (what was read, ...)")
    commands = parser.add_subparsers(dest="command", required=True)

    split = commands.add_parser("split", help="make a train/val/test split and save it as JSON")
    _add_data_options(split)
    split.add_argument("--scheme", choices=["gears", "doubles", "custom", "lodo", "kfold", "singles_only", "unseen_singles"], required=True)
    split.add_argument("--seed", type=int, default=1)
    split.add_argument("--column", default=None, help="custom scheme: obs column with train/val/test")
    split.add_argument("--param", nargs="*", default=[], metavar="KEY=VALUE", help="scheme parameters")
    split.add_argument("--out", required=True)
    split.set_defaults(func=_cmd_split)

    evaluate = commands.add_parser("evaluate", help="score predictions on a split's test conditions, baselines beside")
    evaluate.add_argument("--predictions", required=True, help="PRED.h5ad: one row per condition or per cell")
    evaluate.add_argument("--name", default="model", help="name of the predictions in the tables")
    evaluate.add_argument("--split", required=True)
    evaluate.add_argument("--out", required=True)
    evaluate.add_argument("--de-method", default="t-test", choices=["t-test", "wilcoxon"])
    _add_data_options(evaluate, positional=False)
    evaluate.set_defaults(func=_cmd_evaluate)

    baselines = commands.add_parser("baselines", help="evaluate every baseline on a split")
    _add_data_options(baselines)
    baselines.add_argument("--split", required=True)
    baselines.add_argument("--out", required=True)
    baselines.add_argument("--de-method", default="t-test", choices=["t-test", "wilcoxon"])
    baselines.set_defaults(func=_cmd_baselines)

    train = commands.add_parser("train", help="train PerturbedVAE from a YAML config (also under accelerate launch)")
    train.add_argument("--config", required=True, help="YAML experiment config, e.g. configs/norman_subset.yaml")
    train.add_argument("--resume", action="store_true", help="continue output.run_dir from its last checkpoint")
    train.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="e.g. model.n_latent=16 train.epochs=3")
    train.set_defaults(func=_cmd_train)

    predict = commands.add_parser("predict", help="predict conditions with a trained run; writes AnnData")
    predict.add_argument("run_dir")
    predict.add_argument("--conditions", required=True, help='comma-separated, e.g. "KLF1+MAP2K6,MAPK1"')
    predict.add_argument("--out", required=True, help="PRED.h5ad")
    predict.add_argument("--per-cell", action="store_true", help="one row per predicted cell (expected expression)")
    predict.add_argument("--sample-seed", type=int, default=None,
                         help="one row per cell drawn from the model (latent and likelihood noise), seeded")
    predict.set_defaults(func=_cmd_predict)

    compare = commands.add_parser("compare", help="train variants over seeds beside the baselines; write a report with figures")
    compare.add_argument("--config", required=True, help="compare config, e.g. configs/compare_norman.yaml")
    compare.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="compare.seeds=[1] or any experiment key, e.g. train.epochs=3")
    compare.set_defaults(func=_cmd_compare)

    benchmark = commands.add_parser(
        "benchmark", help="cross-validated held-out combinations: every model beside every baseline, paired, with the noise floor"
    )
    benchmark.add_argument("--config", action="append", required=True, metavar="[NAME=]CONFIG",
                           help="experiment config of a model; repeat to benchmark several (name=path names each)")
    benchmark.add_argument("--protocol", choices=["lodo", "kfold", "singles_only"], default="lodo")
    benchmark.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    benchmark.add_argument("--n-folds", type=int, default=5, help="kfold: number of folds")
    benchmark.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the paired intervals")
    benchmark.add_argument("--out", default="runs/benchmark", help="report folder")
    benchmark.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="applied to every model, e.g. train.epochs=20")
    benchmark.set_defaults(func=_cmd_benchmark)

    transfer = commands.add_parser("transfer", help="predict perturbations in a covariate level where they were held out, beside baselines")
    transfer.add_argument("--config", required=True, help="experiment config with split.scheme transfer, e.g. configs/mcfaline_transfer.yaml")
    transfer.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="e.g. split.params.target=T98G")
    transfer.set_defaults(func=_cmd_transfer)

    cells = commands.add_parser("cells", help="per-cell split: train on part of every condition's cells, score the rest")
    cells.add_argument("--config", required=True, help="experiment config with split.scheme cells (split.params.test_fraction)")
    cells.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="e.g. split.params.test_fraction=0.2")
    cells.set_defaults(func=_cmd_cells)

    embed = commands.add_parser("embed", help="run a frozen encoder once and cache the cell embeddings (Arrow)")
    _add_data_options(embed)
    embed.add_argument("--adapter", required=True, help="adapter card, e.g. adapters/geneformer-v1.yaml")
    embed.add_argument("--checkpoint", default=None, help="encoder checkpoint directory")
    embed.add_argument("--out", required=True, help="cache directory (entries are keyed by data + encoder + card)")
    embed.add_argument("--batch-size", type=int, default=64)
    embed.add_argument("--min-gene-coverage", type=float, default=None, help="error below this fraction of genes covered")
    embed.add_argument("--min-perturbed-coverage", type=float, default=None, help="likewise for perturbed genes")
    embed.set_defaults(func=_cmd_embed)

    simulate = commands.add_parser("simulate", help="write a synthetic screen with known sparse effects (.h5ad)")
    simulate.add_argument("--out", required=True)
    simulate.add_argument("set", nargs="*", metavar="KEY=VALUE", help="SimulationConfig fields, e.g. n_perturbations=50")
    simulate.add_argument("--overwrite", action="store_true")
    simulate.set_defaults(func=_cmd_simulate)
    return parser


def _interrupted(args: argparse.Namespace) -> str:
    """What a Ctrl-C leaves behind: for `train`, the command that continues the run from its last checkpoint."""
    if args.command != "train":
        return "interrupted"
    from perturbedvae.train.checkpoints import checkpoint_dirs
    from perturbedvae.train.config import load_config

    try:
        config = load_config(args.config, args.overrides)
    except PerturbedVAEError:
        return "interrupted"
    command = ["perturbedvae", "train", "--config", args.config, *args.overrides]
    every = config.train.checkpoint_every
    if every == 0:
        return "interrupted; no checkpoint was saved (train.checkpoint_every is 0), so the run cannot be resumed"
    if not checkpoint_dirs(Path(config.output.run_dir)):
        return (f"interrupted before the first checkpoint (train.checkpoint_every {every}); start over with: "
                f"{shlex.join([*command, 'output.overwrite=true'])}")
    return f"interrupted; continue with: {shlex.join([*command, '--resume'])}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_verbosity(args.verbosity)
    try:
        args.func(args)
    except PerturbedVAEError as error:
        print(f"perturbedvae {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"perturbedvae {args.command}: {_interrupted(args)}", file=sys.stderr)
        return 130
    return 0


def run_command(command: str, argv: Sequence[str]) -> int:
    """`main` for a script that stands for one subcommand (`accelerate launch scripts/train.py -v --config ...`).

    Leading `-q`/`-v` switches stay before the subcommand, where `main` reads them.
    """
    argv = list(argv)
    switches = 0
    while switches < len(argv) and argv[switches] in VERBOSITY_SWITCHES:
        switches += 1
    return main([*argv[:switches], command, *argv[switches:]])


if __name__ == "__main__":
    raise SystemExit(main())
