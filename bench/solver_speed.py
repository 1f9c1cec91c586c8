"""Solver speed of the paper's CIFAR models: the same measurement as `mondeq bench`.

    .venv/bin/python bench/solver_speed.py [--models cifar-conv,cifar-multitier] [--device cpu]

Prints the Markdown table of docs/performance.md (Solver speed) and writes the raw rows to
bench/results/solver_speed-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from model_core.runtime import tune_allocator
from mondeq_cli.benchmark import DEFAULT_MODELS, format_table, machine_probe, run_benchmark


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", "--batch", type=int, default=64, help="samples per batch")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats, median (default 15)")
    args = p.parse_args()
    allocator_tuned = tune_allocator()  # as the `mondeq` entry points do
    probe_before = machine_probe(args.device)
    rows = run_benchmark(
        [m for m in args.models.split(",") if m],
        device=args.device,
        batch_size=args.batch_size,
        repeats=args.repeats,
    )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    dev = rows[0]["device"].replace(" ", "_") if rows else "none"
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "allocator_tuned": allocator_tuned,  # model_core.runtime; MONDEQ_TUNE_MALLOC=0: off
        # this VM's speed drifts: GEMM GFLOP/s and copy GB/s right before and after
        "probe_before": probe_before,
        "probe_after": machine_probe(args.device),
    }
    (out / f"solver_speed-{dev}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2)
    )
    print(format_table(rows))
    b, a = meta["probe_before"], meta["probe_after"]
    print(
        f"\nmachine probe: GEMM {b['gemm_gflops']:.0f} → {a['gemm_gflops']:.0f} GFLOP/s, "
        f"copy {b['copy_gbps']:.1f} → {a['copy_gbps']:.1f} GB/s (before → after)"
    )


if __name__ == "__main__":
    main()
