"""Pretrain a small Geneformer-format BERT on the shared real data and report held-out MLM accuracy.

    python scripts/pretrain_encoder.py --out runs/geneformer-tiny --threads 1
    python scripts/pretrain_encoder.py --out runs/my-encoder --data screen1.h5ad --data screen2.h5ad --condition-key target

(3 epochs, 1,017 steps: about 7 minutes on one CPU thread. On a 2-core machine shared with other jobs,
--threads 1 was ~40x faster per step than 2 oversubscribed threads.)

Data: any .h5ad files given with --data (log-normalized or counts; --condition-key names their condition
column). Without --data, the Norman 2019 part of ../shared/data/norman2019_subset.h5ad (log-normalized only: gene ranks are
recovered exactly by expm1, see perturbedvae/encoders/rank_value.py) and the Papalexi 2021 counts. The
output directory is a BERT `save_pretrained` checkpoint for `adapters/geneformer-v1.yaml`:

    load_encoder("adapters/geneformer-v1.yaml", "runs/geneformer-tiny")
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from perturbedvae.data.loading import load_dataset
from perturbedvae.encoders.pretrain import PretrainConfig, pretrain
from perturbedvae.encoders.registry import load_encoder
from perturbedvae.verbosity import set_verbosity

SHARED_DATA = Path("../shared/data")


def parse_args() -> argparse.Namespace:
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--data", type=Path, action="append", default=None, metavar="H5AD",
                        help="pretrain on this .h5ad (repeatable); default: the shared Norman and Papalexi files")
    parser.add_argument("--condition-key", default="condition", help="obs column with conditions in the --data files")
    parser.add_argument("--norman", type=Path, default=SHARED_DATA / "norman2019_subset.h5ad")
    parser.add_argument("--papalexi", type=Path, default=SHARED_DATA / "papalexi2021_lowmoi.h5ad")
    parser.add_argument("--card", type=Path, default=Path("adapters/geneformer-v1.yaml"))
    parser.add_argument("--vocab-dir", type=Path, default=None)
    parser.add_argument("--max-cells", type=int, default=None, help="use only the first N cells of each file (quick runs)")
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--layers", type=int, default=defaults.num_layers)
    parser.add_argument("--heads", type=int, default=defaults.num_heads)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args()


def measure_throughput(out: Path, card: Path, norman, vocab_dir: Path | None, batch_size: int = 64) -> dict[str, float]:
    """Cells per second embedding the first dataset's cells with the saved checkpoint through load_encoder."""
    encoder = load_encoder(card, out, vocab_dir=vocab_dir)
    started = time.perf_counter()
    inputs = encoder.prepare(norman.adata)
    prepared = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, norman.adata.n_obs, batch_size):
            encoder.embed({key: value[start : start + batch_size] for key, value in inputs.items()})
    done = time.perf_counter()
    return {
        "cells": norman.adata.n_obs,
        "tokenize_seconds": round(prepared - started, 3),
        "embed_seconds": round(done - prepared, 3),
        "cells_per_second": round(norman.adata.n_obs / (done - started), 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    args = parse_args()
    set_verbosity()  # the training steps' loss, as the CLI shows progress
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="unpickling")
    warnings.filterwarnings("ignore", message="no counts found")
    if args.data:
        datasets = [load_dataset(path, condition_key=args.condition_key) for path in args.data]
    else:
        datasets = [load_dataset(args.norman, obs_filter={"dataset": "norman19"}), load_dataset(args.papalexi, condition_key="target")]
    if args.max_cells:
        datasets = [load_dataset(data.adata[: args.max_cells], condition_key=data.condition_key) for data in datasets]
    config = PretrainConfig(
        hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads, intermediate_size=2 * args.hidden_size,
        max_length=args.max_length, batch_size=args.batch_size, learning_rate=args.lr, epochs=args.epochs,
        max_steps=args.max_steps, seed=args.seed,
    )
    report = pretrain(datasets, args.out, args.card, config, args.vocab_dir)
    throughput = measure_throughput(args.out, args.card, datasets[0], args.vocab_dir)
    summary = {**asdict(report), "embedding_throughput": throughput}
    (args.out / "pretrain_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if report.shortfall():
        print(f"warning: {report.shortfall()}", file=sys.stderr)


if __name__ == "__main__":
    main()
