"""Solver speed of the paper's CIFAR models: the same measurement as `mondeq bench`.

    .venv/bin/python bench/solver_speed.py [--models cifar-conv,cifar-multitier] [--device cpu]

Prints the Markdown table that goes into the README and writes the raw rows to
bench/results/solver_speed-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from model_core.benchmark import DEFAULT_MODELS, format_table, run_benchmark


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rows = run_benchmark(
        [m for m in args.models.split(",") if m],
        device=args.device,
        batch=args.batch,
        repeats=args.repeats,
    )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    dev = rows[0]["device"].replace(" ", "_") if rows else "none"
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    (out / f"solver_speed-{dev}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2)
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
