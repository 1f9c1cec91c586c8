"""Seconds per training epoch of the Fashion-MNIST presets, beside the reference code.

Runs ``mondeq train --preset P --epochs 1`` for real (the full 60,000-sample epoch, α tuning
included, evaluation timed apart) and writes ``bench/results/train_speed-<device>.json``, each
row with the machine probe of its run (rows of presets not run this time are kept).

    .venv/bin/python bench/train_speed.py [--presets fmnist-fc,fmnist-conv] [--device cpu]

Reference (the paper's code on current PyTorch, this 2-core machine, from the training
issue): FC 87 about 6 s per epoch; single conv 32 channels about 2.9 s per step, roughly
22 minutes per epoch.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from model_core.runtime import tune_allocator
from mondeq_cli.benchmark import machine_probe
from training import TrainOptions, train

REFERENCE_S_PER_EPOCH = {"fmnist-fc": 6.0, "fmnist-conv": 22 * 60.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="fmnist-fc,fmnist-conv")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    allocator_tuned = tune_allocator()  # as the `mondeq` entry points do
    rows = []
    probe_before = machine_probe(args.device)
    for name in args.presets.split(","):
        with tempfile.TemporaryDirectory() as out:
            m = train(TrainOptions(preset=name, out=out, epochs=1, device=args.device))
            history = torch.load(Path(out) / "last.pt", weights_only=True)["metadata"]
            row = history["train"]["progress"]["history"][-1]
        rows.append(
            {
                "preset": name,
                "device": args.device,
                "s_per_epoch": row["epoch_time_s"],
                "eval_s": row["eval_time_s"],
                "steps": row["steps"],
                "s_per_step": row["epoch_time_s"] / row["steps"],
                "fwd_iterations": row["train_fwd_iterations"],
                "bwd_iterations": row["train_bwd_iterations"],
                "test_accuracy_after_1_epoch": m["test_accuracy"],
                "reference_s_per_epoch": REFERENCE_S_PER_EPOCH.get(name),
                "allocator_tuned": allocator_tuned,
            }
        )
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )  # fmt: skip
    print(f"\nmachine: {machine}, torch {torch.__version__}\n")
    print("| preset | s/epoch | s/step | fwd it | bwd it | acc after 1 epoch | reference s/epoch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = r["reference_s_per_epoch"]
        print(
            f"| {r['preset']} | {r['s_per_epoch']:.1f} | {r['s_per_step']:.3f} | "
            f"{r['fwd_iterations']:.1f} | {r['bwd_iterations']:.1f} | "
            f"{100 * r['test_accuracy_after_1_epoch']:.2f}% | {ref:.0f} |"
        )
    dest = Path(__file__).parent / "results" / f"train_speed-{args.device.split(':')[0]}.json"
    dest.parent.mkdir(exist_ok=True)
    probe = {"before": probe_before, "after": machine_probe(args.device)}
    print(f"machine probe (GEMM GFLOP/s, copy GB/s), before and after: {probe}")
    for r in rows:
        r["probe"] = probe  # rows of earlier runs keep theirs
    # Presets not run this time keep their rows from earlier runs.
    kept = []
    if dest.is_file():
        ran = {r["preset"] for r in rows}
        earlier = json.loads(dest.read_text())
        kept = [r for r in earlier.get("rows", []) if r["preset"] not in ran]
        for r in kept:
            r.setdefault("probe", earlier.get("probe"))  # files from before per-row probes
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine, "rows": kept + rows}, indent=2) + "\n")
    tmp.replace(dest)
    print(f"\nwrote {dest}")


if __name__ == "__main__":
    main()
