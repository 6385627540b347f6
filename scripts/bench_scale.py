"""How loading, DE, one training epoch and prediction grow with cells, on synthetic sparse counts.

    python scripts/bench_scale.py --cells 50000 200000 1000000 --genes 5000 --out runs/bench_scale

For each size, writes a synthetic screen of raw counts (`perturbedvae.data.synthetic_h5ad`) and runs
each stage in a fresh process, so the peak resident memory (RSS) measured is that stage's alone:

- load: backed loading (metadata, one checking pass) and the per-condition means (a second pass);
- de: backed loading and t-test DE genes of every condition (one pass of sufficient statistics);
- train: `perturbedvae train` for one epoch of the standalone head (`configs/scale_synthetic.yaml`),
  with validation, and test-set scoring; the epoch's own time gives cells/s;
- predict: reload the run and predict every perturbed condition from its control cells;
- load_in_memory (sizes up to `--in-memory-up-to`): the same load with the matrix read into memory,
  to show what backed mode saves.

Writes `results.json` and `results.md` (the README table) into `--out`. Stage processes use
`--threads` torch/BLAS threads (default: all cores). `--stages` runs some stages only, `--set` overrides
keys of the training config (an A/B of one setting, e.g. `--set train.shuffle_block=1`), and
`--keep-files` keeps each screen with its spec beside it, so a later run with the same spec reuses it
instead of writing 4 GiB again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "scale_synthetic.yaml"
STAGES = ("load", "de", "train", "predict")


def run_stage(stage: str, data: Path, out: Path, spec: dict, overrides: list[str] = ()) -> dict:
    """Body of one stage (runs in the child process); returns what it measured."""
    import numpy as np

    if stage == "write":
        from perturbedvae.data.synthetic_h5ad import ScreenSpec, write_synthetic_screen

        started = time.perf_counter()
        write_synthetic_screen(data, ScreenSpec(**spec), progress=False)
        return {"seconds": time.perf_counter() - started, "file_gib": data.stat().st_size / 2**30}

    from perturbedvae.data.de import compute_de_genes
    from perturbedvae.data.loading import load_dataset

    started = time.perf_counter()
    if stage in ("load", "load_in_memory", "de"):
        loaded = load_dataset(data, backed=stage != "load_in_memory")
        if stage == "de":
            before = time.perf_counter()
            compute_de_genes(loaded)
            return {"seconds": time.perf_counter() - before, "load_seconds": before - started}
        _ = loaded.mean_profiles  # computed on first access: the second pass this stage measures
        return {"seconds": time.perf_counter() - started, "nnz_fraction": _nnz_fraction(loaded)}
    run_dir = out / "run"
    if stage == "train":
        from perturbedvae.api.fitting import train_from_config
        from perturbedvae.train.config import load_config

        config = load_config(CONFIG, [f"data.path={data}", f"output.run_dir={run_dir}", "output.overwrite=true", *overrides])
        train_from_config(config)
        info = json.loads((run_dir / "run_info.json").read_text())
        return {"seconds": time.perf_counter() - started, "epoch_seconds": info["train_seconds"],
                "epoch_cells_per_second": info["train_cells_per_second"], "n_train_cells": info["n_train_cells"]}
    from perturbedvae.train.runs import load_run

    run = load_run(run_dir)
    conditions = [name for name in run.datamodule.data.condition_names if name != "control"]
    predictions = run.predict(conditions)
    assert np.isfinite(predictions.means.to_numpy()).all()
    return {"seconds": time.perf_counter() - started, "n_conditions": len(conditions)}


def _nnz_fraction(data) -> float:
    n_nonzero = sum(block.nnz for _, block in data.expression.chunks())
    return n_nonzero / (data.expression.shape[0] * data.expression.shape[1])


def measure(stage: str, data: Path, out: Path, threads: int, spec: dict, overrides: list[str] = ()) -> dict:
    """Run a stage in a child process; adds wall seconds and the child's peak RSS (MiB).

    Linux keeps a process's peak RSS across exec, so a child starts from its parent's size: this
    parent therefore never loads data or heavy libraries itself (it stays at ~20 MiB).
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    command = [sys.executable, __file__, "--stage", stage, "--file", str(data), "--out", str(out), "--spec", json.dumps(spec),
               "--set", *overrides]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    stdout = process.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"stage {stage} on {data} failed (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "wall_seconds": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| cells | genes | non-zeros | file | stage | wall (s) | stage (s) | cells/s | peak RSS (MiB) |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for size in results:
        nnz = "–" if size["nnz_fraction"] is None else f"{size['nnz_fraction']:.1%}"
        head = f"| {size['cells']:,} | {size['genes']:,} | {nnz} | {size['file_gib']:.2f} GiB"
        for stage, row in size["stages"].items():
            seconds = row.get("epoch_seconds", row["seconds"])
            rate = row.get("epoch_cells_per_second", size["cells"] / seconds if stage != "predict" else None)
            rate_text = f"{rate:,.0f}" if rate else "–"
            lines.append(f"{head} | {stage} | {row['wall_seconds']:.1f} | {seconds:.1f} | {rate_text} | {row['peak_rss_mib']:,.0f} |")
            head = "| | | |"
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--genes", type=int, default=5000)
    parser.add_argument("--perturbed-genes", type=int, default=50)
    parser.add_argument("--density", type=float, default=0.1, help="mean fraction of non-zero counts")
    parser.add_argument("--in-memory-up-to", type=int, default=200_000, help="also load in memory up to this many cells")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_scale"))
    parser.add_argument("--keep-files", action="store_true", help="keep the synthetic .h5ad files (and reuse them)")
    parser.add_argument("--stages", nargs="+", choices=(*STAGES, "load_in_memory"), help="run only these stages")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="training config overrides")
    parser.add_argument("--stage", choices=(*STAGES, "load_in_memory", "write"), help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.file, args.out, args.spec, args.set)))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for n_cells in args.cells:
        spec = {"n_cells": n_cells, "n_genes": args.genes, "n_perturbed_genes": args.perturbed_genes, "density": args.density}
        data = args.out / f"screen_{n_cells}.h5ad"
        spec_file = data.with_suffix(".spec.json")
        if data.exists() and spec_file.exists() and json.loads(spec_file.read_text()) == spec:
            written = {"seconds": None, "file_gib": data.stat().st_size / 2**30}
        else:
            written = measure("write", data, args.out, args.threads, spec)
            spec_file.write_text(json.dumps(spec))
        size = {"cells": n_cells, "genes": args.genes, "write_seconds": written["seconds"], "file_gib": written["file_gib"],
                "overrides": args.set, "stages": {}}
        stages = [*STAGES, "load_in_memory"] if n_cells <= args.in_memory_up_to else list(STAGES)
        for stage in [stage for stage in stages if args.stages is None or stage in args.stages]:
            size["stages"][stage] = measure(stage, data, args.out, args.threads, spec, args.set)
            print(f"{n_cells:>9,} cells  {stage:<15} {json.dumps(size['stages'][stage])}", flush=True)
        size["nnz_fraction"] = size["stages"]["load"]["nnz_fraction"] if "load" in size["stages"] else None
        results.append(size)
        if not args.keep_files:
            data.unlink()
            spec_file.unlink()
        (args.out / "results.json").write_text(json.dumps({"threads": args.threads, "sizes": results}, indent=2) + "\n")
        (args.out / "results.md").write_text(markdown_table(results))
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
