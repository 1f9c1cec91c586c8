"""Solver speed of the paper's CIFAR models: the same measurement as `mondeq bench`.

    .venv/bin/python bench/solver_speed.py [--models cifar-conv,cifar-multitier] [--device cpu]
        [--reference-dir DIR]

Prints the Markdown table of docs/performance.md (Solver speed) and writes the raw rows, with
the machine probe before and after, to bench/results/solver_speed-<device>.json.

With --reference-dir (a checkout of https://github.com/locuslab/monotone_op_net, the paper's
code; never copied into this project), the reference's networks of the same architectures are
timed alternating with ours in this one process (mondeq_cli.benchmark.alternate), and the rows,
with both sides' times, iterations and residuals and the ratios ours/reference of this run, go
to bench/results/reference_speed-<device>.json instead, with the SHA-256 of the reference's
files. Without it there is no ratio: a figure quoted from another run is never divided by.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from model_core.files import atomic_write
from model_core.runtime import tune_allocator
from mondeq_cli.benchmark import (
    DEFAULT_MODELS,
    MIN_SIDE_BY_SIDE_REPEATS,
    NO_REFERENCE_NOTE,
    format_probe,
    format_table,
    machine_probe,
    run_benchmark,
)
from mondeq_cli.reference import load_reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", "--batch", type=int, default=64, help="samples per batch")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats, median (default 15)")
    p.add_argument("--reference-dir", metavar="DIR", help="a checkout of the paper's code")
    args = p.parse_args()
    reference = None
    if args.reference_dir is not None:
        if args.repeats < MIN_SIDE_BY_SIDE_REPEATS:
            p.error(f"--reference-dir needs --repeats >= {MIN_SIDE_BY_SIDE_REPEATS}")
        try:
            reference = load_reference(args.reference_dir)
        except ValueError as e:
            p.error(str(e))
    allocator_tuned = tune_allocator()  # as the `mondeq` entry points do
    probe_before = machine_probe(args.device)
    rows = run_benchmark(
        [m for m in args.models.split(",") if m],
        device=args.device,
        batch_size=args.batch_size,
        repeats=args.repeats,
        reference=reference,
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
    stem = "solver_speed"
    if reference is not None:
        stem = "reference_speed"
        meta["reference"] = {
            "code": "https://github.com/locuslab/monotone_op_net",
            "sha256": reference.sha256,
            "order": "alternating per call: ref, ours, ref, ours, ...",
            "shims": "mondeq_cli.reference (torch.rfft/irfft, relu keeping its input)",
        }
    dest = out / f"{stem}-{dev}.json"
    atomic_write(dest, (json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n").encode())
    print(format_table(rows))
    print("\n" + format_probe(meta["probe_before"], meta["probe_after"]))
    if reference is None:
        print(NO_REFERENCE_NOTE)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
