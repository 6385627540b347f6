"""Training speed of the PerturbedVAE head beside scvi-tools' SCVI on the same count file (issue 14).

    python scripts/bench_speed.py --repeats 3 --modes memory backed --precisions no bf16 --out runs/bench_speed

Writes one synthetic screen of raw counts (`perturbedvae.data.synthetic_h5ad`, default 20,000 cells x
2,000 genes) and trains on it, in a fresh process per run, alternately: SCVI and PerturbedVAE with the same
sizes (negative-binomial likelihood, hidden 256, latent 32, one layer, batch 512, `--epochs` epochs),
in memory and backed. Alternating runs share whatever else the machine is doing at the time.

Speed is counted over the training epochs only (no validation, no setup) as cells per second and as
cells per CPU-second of the training process (all its threads): CPU time barely moves when other jobs
share the cores, wall time does. For PerturbedVAE the matmul FLOPs of one training step (forward and
backward, `torch.utils.flop_counter`) times its cells per CPU-second is compared with the fp32 matmul
FLOP per CPU-second this machine reaches in a microbenchmark at the same thread count.

`--compile` adds the head with `train.compile: true` (torch.compile through Accelerate), timed over its
epochs after the first, which compiles (`--epochs` 2 or more).

SCVI needs scvi-tools (`pip install perturbedvae[bench]`, best in a separate environment); without it the
SCVI rows are skipped with a message. Writes `results.json` and `results.md` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "scale_synthetic.yaml"
SIZES = {"n_hidden": 256, "n_latent": 32, "n_layers": 1, "batch_size": 512}
"""Architecture and batch of both tools (the head's side comes from `configs/scale_synthetic.yaml`, checked)."""
COMPILED = "perturbedvae-compiled"
"""The head with `train.compile: true`, timed over its epochs after the first (which compiles)."""
MATMUL_SHAPES = ((512, 2000, 256), (2048, 2048, 2048))
"""(m, k, n) of the microbenchmark: the step's largest product at the default sizes, and a large square one."""


# --- child processes: one measurement each ------------------------------------------------------------------


def train_perturbedvae(data: Path, backed: bool, epochs: int, precision: str, run_dir: Path, compiled: bool = False) -> dict:
    """Train the head for `epochs` (no validation) and report its training throughput and step FLOPs.

    `compiled` (`train.compile`): the first epoch holds the compilation, so throughput counts the later
    epochs and the first epoch's excess over their median is reported as `compile_seconds`.
    """
    from perturbedvae.train.config import load_config
    from perturbedvae.train.representation import head_of
    from perturbedvae.train.runs import build_datamodule, load_data, load_or_make_split, new_module
    from perturbedvae.train.trainer import Trainer, TrainingArguments

    overrides = [f"data.path={data}", f"data.backed={str(backed).lower()}", f"train.epochs={epochs}",
                 f"train.mixed_precision='{precision}'", f"output.run_dir={run_dir}", "output.overwrite=true",
                 f"train.compile={str(compiled).lower()}"]
    config = load_config(CONFIG, overrides)
    _check_sizes(config)
    data_ = load_data(config.data)
    datamodule = build_datamodule(config, data_, load_or_make_split(config.split, data_))
    module = new_module(config, datamodule)
    trainer = Trainer(module, TrainingArguments.for_head(config.train, head_of(module)), datamodule, run_dir)
    info = trainer.fit().run_info
    seconds, cpu_seconds = info["train_seconds_per_epoch"], info["train_cpu_seconds_per_epoch"]
    cells_per_epoch = info["train_cells_per_second"] * info["train_seconds"] / len(seconds)
    result = {"threads": info["torch_threads"], "flops_per_cell": step_flops(config, datamodule) / SIZES["batch_size"]}
    if compiled:
        result["compile_seconds"] = seconds[0] - statistics.median(seconds[1:])
        seconds, cpu_seconds = seconds[1:], cpu_seconds[1:]
    return {"cells": cells_per_epoch * len(seconds), "seconds": sum(seconds), "cpu_seconds": sum(cpu_seconds), **result}


def _check_sizes(config) -> None:
    actual = {key: config.model[key] for key in ("n_hidden", "n_latent", "n_layers")} | {"batch_size": config.train.batch_size}
    if actual != SIZES or config.model["likelihood"] != "nb":
        raise SystemExit(f"{CONFIG} no longer has the benchmark's sizes {SIZES} with an nb likelihood: {actual}")


def step_flops(config, datamodule) -> float:
    """Matmul FLOPs of one full training step (forward + backward) on a batch of `SIZES['batch_size']` cells."""
    from torch.utils.flop_counter import FlopCounterMode

    from perturbedvae.model import LossWeights, PerturbedVAEModule
    from perturbedvae.train.datamodule import INDEX_KEY

    module = PerturbedVAEModule(config.model_config(
        n_input=datamodule.representation.dim, n_genes=len(datamodule.data.genes),
        n_perturbations=len(datamodule.perturbation_genes)))
    batch = next(iter(datamodule.train_loader(SIZES["batch_size"], seed=0)))
    batch.pop(INDEX_KEY)
    with FlopCounterMode(display=False) as counter:
        module(batch, LossWeights()).loss.backward()
    return float(counter.get_total_flops())


def train_scvi(data: Path, backed: bool, epochs: int) -> dict:
    """Train SCVI for `epochs` on every cell; CPU and wall time of its training epochs only (a Lightning callback)."""
    try:
        import anndata
        import lightning.pytorch as pl
        import scvi
        import torch
    except ImportError as error:
        return {"skipped": f"scvi-tools is not importable ({error}); pip install 'perturbedvae[bench]' to compare"}

    class EpochClock(pl.Callback):
        """Sums CPU and wall seconds between the start and the end of each training epoch."""

        cpu_seconds = seconds = 0.0

        def on_train_epoch_start(self, trainer, module) -> None:
            self._cpu, self._wall = time.process_time(), time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            self.cpu_seconds += time.process_time() - self._cpu
            self.seconds += time.perf_counter() - self._wall

    adata = anndata.read_h5ad(data, backed="r" if backed else None)
    clock = EpochClock()
    try:
        scvi.model.SCVI.setup_anndata(adata)
        model = scvi.model.SCVI(adata, n_hidden=SIZES["n_hidden"], n_latent=SIZES["n_latent"],
                                n_layers=SIZES["n_layers"], gene_likelihood="nb")
        model.train(max_epochs=epochs, batch_size=SIZES["batch_size"], accelerator="cpu", devices=1, train_size=1.0,
                    enable_progress_bar=False, logger=False, callbacks=[clock])
    except Exception as error:  # noqa: BLE001 - scvi-tools raises many types for a file it cannot train on
        return {"skipped": f"SCVI could not train on this file {'backed' if backed else 'in memory'}: "
                           f"{type(error).__name__}: {str(error)[:200]}"}
    return {"cells": float(epochs * adata.n_obs), "seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds,
            "threads": torch.get_num_threads(), "version": scvi.__version__}


def matmul_throughput(min_cpu_seconds: float = 2.0) -> dict:
    """fp32 matmul FLOP per CPU-second and per second for each of `MATMUL_SHAPES`, at this process's threads."""
    import torch

    results = {}
    for m, k, n in MATMUL_SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # first call allocates and picks kernels
        calls, cpu_start, wall_start = 0, time.process_time(), time.perf_counter()
        while time.process_time() - cpu_start < min_cpu_seconds:
            a @ b
            calls += 1
        flops = 2.0 * m * k * n * calls
        results[f"{m}x{k}x{n}"] = {"flops_per_cpu_second": flops / (time.process_time() - cpu_start),
                                   "flops_per_second": flops / (time.perf_counter() - wall_start)}
    return {"shapes": results, "threads": torch.get_num_threads()}


def run_child(args: argparse.Namespace) -> dict:
    if args.child == "matmul":
        return matmul_throughput()
    backed = args.mode == "backed"
    if args.child == "scvi":
        return train_scvi(args.file, backed, args.epochs)
    return train_perturbedvae(args.file, backed, args.epochs, args.precision, args.out / "run", args.child == COMPILED)


# --- parent: alternate runs, summarise ------------------------------------------------------------------------


def measure(args: argparse.Namespace, child: str, mode: str = "memory", precision: str = "no", python: str | None = None) -> dict:
    """One child process; its last stdout line is its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    command = [python or sys.executable, __file__, "--child", child, "--mode", mode, "--precision", precision,
               "--file", str(args.file), "--epochs", str(args.epochs), "--out", str(args.out)]
    finished = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"{child} ({mode}, {precision}) failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """Medians over repeats of cells/s and cells per CPU-second (a skipped tool keeps its reason)."""
    if any("skipped" in run for run in runs):
        return {"skipped": runs[0]["skipped"]}
    per_second = [run["cells"] / run["seconds"] for run in runs]
    per_cpu_second = [run["cells"] / run["cpu_seconds"] for run in runs]
    summary = {"cells_per_second": statistics.median(per_second), "cells_per_cpu_second": statistics.median(per_cpu_second),
               "runs": runs}
    if "flops_per_cell" in runs[0]:
        summary["flops_per_cpu_second"] = summary["cells_per_cpu_second"] * runs[0]["flops_per_cell"]
    if "compile_seconds" in runs[0]:
        summary["compile_seconds"] = statistics.median(run["compile_seconds"] for run in runs)
    return summary


def markdown_table(results: dict) -> str:
    peak = results["matmul_peak_flops_per_cpu_second"]
    lines = [
        "| data | tool | precision | cells/s | cells/CPU-s | vs SCVI (cells/CPU-s) | step GFLOP/CPU-s | of matmul peak |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['mode']} | {row['tool']} | {row['precision']} | skipped: {row['skipped'][:80]} | | | | |")
            continue
        ratio = f"{row['vs_scvi']:.2f}×" if row.get("vs_scvi") else "–"
        flops = row.get("flops_per_cpu_second")
        flop_text = f"{flops / 1e9:.1f} | {flops / peak:.0%}" if flops else "– | –"
        tool = row["tool"] + (f" (first epoch +{row['compile_seconds']:.0f} s compiling)" if "compile_seconds" in row else "")
        lines.append(f"| {row['mode']} | {tool} | {row['precision']} | {row['cells_per_second']:,.0f} | "
                     f"{row['cells_per_cpu_second']:,.0f} | {ratio} | {flop_text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool, alternating")
    parser.add_argument("--modes", nargs="+", choices=("memory", "backed"), default=["memory", "backed"])
    parser.add_argument("--precisions", nargs="+", choices=("no", "bf16"), default=["no"],
                        help="PerturbedVAE's train.mixed_precision (SCVI always runs fp32)")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads of every run")
    parser.add_argument("--scvi-python", default=sys.executable, help="python of an environment with scvi-tools")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_speed"))
    parser.add_argument("--file", type=Path, help="count file to reuse (written when missing)")
    parser.add_argument("--compile", action="store_true", help="also time the head with train.compile (torch.compile)")
    parser.add_argument("--child", choices=("perturbedvae", COMPILED, "scvi", "matmul"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("memory", "backed"), default="memory", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="no", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile and args.epochs < 2:
        parser.error("--compile needs --epochs 2 or more: the first epoch compiles")
    if args.child:
        print(json.dumps(run_child(args)))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    args.file = args.file or args.out / f"screen_{args.cells}x{args.genes}.h5ad"
    if not args.file.exists():
        from perturbedvae.data.synthetic_h5ad import ScreenSpec, write_synthetic_screen

        write_synthetic_screen(args.file, ScreenSpec(n_cells=args.cells, n_genes=args.genes), progress=False)
    load_before = os.getloadavg()
    matmul = measure(args, "matmul")
    rows = []
    for mode in args.modes:
        runs: dict[tuple[str, str], list[dict]] = {}
        for repeat in range(args.repeats):
            heads = ["perturbedvae", *([COMPILED] if args.compile else [])]
            for tool, precision in [("scvi", "no"), *[(head, precision) for head in heads for precision in args.precisions]]:
                result = measure(args, tool, mode, precision, args.scvi_python if tool == "scvi" else None)
                runs.setdefault((tool, precision), []).append(result)
                print(f"{mode:<7} {tool:<13} {precision:<5} repeat {repeat + 1}: {json.dumps(result)}", flush=True)
        scvi = summarize(runs[("scvi", "no")])
        for (tool, precision), tool_runs in runs.items():
            row = {"mode": mode, "tool": tool, "precision": precision, **summarize(tool_runs)}
            if tool != "scvi" and "skipped" not in scvi and "skipped" not in row:
                row["vs_scvi"] = row["cells_per_cpu_second"] / scvi["cells_per_cpu_second"]
            rows.append(row)
    peak = max(shape["flops_per_cpu_second"] for shape in matmul["shapes"].values())
    results = {"rows": rows, "matmul": matmul, "matmul_peak_flops_per_cpu_second": peak,
               "machine": {"cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
                           "load_average_before": load_before, "load_average_after": os.getloadavg()},
               "settings": {"cells": args.cells, "genes": args.genes, "epochs": args.epochs, "repeats": args.repeats,
                            "threads": args.threads, **SIZES}}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown_table(results)
    (args.out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
