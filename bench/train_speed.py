"""Seconds per training epoch of the Fashion-MNIST presets; train steps beside the reference.

Runs ``mondeq train --preset P --epochs 1`` for real (the full 60,000-sample epoch, α tuning
included, evaluation timed apart) and writes ``bench/results/train_speed-<device>.json``, each
row with the machine probe of its run (rows of presets not run this time are kept).

    .venv/bin/python bench/train_speed.py [--presets fmnist-fc,fmnist-conv] [--device cpu]
        [--reference-dir DIR [--repeats 7]]

With --reference-dir (a checkout of https://github.com/locuslab/monotone_op_net, the paper's
code; never copied into this project), each preset's network and the reference's of the same
architecture and solver then take train steps (forward, backward, Adam step) on the same
first training batch, alternating in this process (mondeq_cli.benchmark.alternate), and the
row adds both medians and the ratio ours/reference of that run. Without it there is no
ratio: a figure quoted from another run is never divided by.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from model_core import build_model
from model_core.files import atomic_write
from model_core.runtime import tune_allocator
from mondeq_cli.benchmark import (
    MIN_SIDE_BY_SIDE_REPEATS,
    NO_REFERENCE_NOTE,
    alternate,
    machine_probe,
    pick_device,
    train_step,
)
from mondeq_cli.reference import ReferenceCode, build_reference_model, load_reference
from training import TrainOptions, train
from training.data import load_dataset
from training.presets import get_preset


def side_by_side_steps(preset: str, ref: ReferenceCode, repeats: int, device: str) -> dict:
    """Train-step seconds of ``preset``'s network and the reference's of the same config,
    alternating (ref, ours, …), on the first training batch of the preset's size."""
    p, dev = get_preset(preset), pick_device(device)
    data = load_dataset(p.dataset)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in data.channel_stats())
    x = ((data.train_x[: p.batch_size].float() / 255 - mean) / std).to(dev)
    y = data.train_y[: p.batch_size].to(dev)
    config = p.model_config(data.shape, len(data.class_names))
    torch.manual_seed(0)
    ours = build_model(config).to(dev).train()
    s = config["solver"]
    kw = {"alpha": s.get("alpha") or 1.0, "tol": s["tol"], "max_iter": s["max_iter"]}
    torch.manual_seed(0)
    theirs = build_reference_model(ref, config, **kw).to(dev).train()
    step, restore = train_step(ours, x, y)
    ref_step, ref_restore = train_step(theirs, x, y)
    step(), ref_step()  # warm-up
    ref_t, our_t = alternate([ref_step, step], repeats, dev, setups=[ref_restore, restore])
    fwd, bwd = ours.deq.last_forward_stats, ours.deq.last_backward_stats
    ours_s, ref_s = statistics.median(our_t), statistics.median(ref_t)
    return {
        "batch": p.batch_size,
        "repeats": repeats,
        "s_per_step": ours_s,
        "ref_s_per_step": ref_s,
        "step_ratio": ours_s / ref_s,
        "fwd_iterations": fwd.iterations.double().mean().item(),
        "bwd_iterations": bwd.iterations.double().mean().item(),
        "ref_fwd_iterations": theirs.mon.stats.fwd_iters.val,
        "ref_bwd_iterations": theirs.mon.stats.bkwd_iters.val,
        "reference_sha256": ref.sha256,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="fmnist-fc,fmnist-conv")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reference-dir", metavar="DIR", help="a checkout of the paper's code")
    ap.add_argument("--repeats", type=int, default=MIN_SIDE_BY_SIDE_REPEATS,
                    help="side-by-side train steps per side, median")  # fmt: skip
    args = ap.parse_args()
    reference = None
    if args.reference_dir is not None:
        if args.repeats < MIN_SIDE_BY_SIDE_REPEATS:
            ap.error(f"--reference-dir needs --repeats >= {MIN_SIDE_BY_SIDE_REPEATS}")
        try:
            reference = load_reference(args.reference_dir)
        except ValueError as e:
            ap.error(str(e))
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
                "allocator_tuned": allocator_tuned,
            }
        )
        if reference is not None:
            rows[-1]["side_by_side"] = side_by_side_steps(
                name, reference, args.repeats, args.device
            )
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )  # fmt: skip
    print(f"\nmachine: {machine}, torch {torch.__version__}\n")
    print("| preset | s/epoch | s/step | fwd it | bwd it | acc after 1 epoch |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['s_per_epoch']:.1f} | {r['s_per_step']:.3f} | "
            f"{r['fwd_iterations']:.1f} | {r['bwd_iterations']:.1f} | "
            f"{100 * r['test_accuracy_after_1_epoch']:.2f}% |"
        )
    if reference is None:
        print(f"\n{NO_REFERENCE_NOTE}")
    else:
        print("\nTrain steps side by side (same batch, alternating, median):\n")
        print("| preset | batch | s/step ours | s/step ref | ours/ref | fwd/bwd it ours | ref |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            b = r["side_by_side"]
            print(
                f"| {r['preset']} | {b['batch']} | {b['s_per_step']:.3f} | "
                f"{b['ref_s_per_step']:.3f} | {b['step_ratio']:.2f}× | "
                f"{b['fwd_iterations']:.1f} / {b['bwd_iterations']:.1f} | "
                f"{b['ref_fwd_iterations']} / {b['ref_bwd_iterations']} |"
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
            # a figure quoted from an issue, which older files carried: never a divisor
            r.pop("reference_s_per_epoch", None)
    atomic_write(
        dest, (json.dumps({"machine": machine, "rows": kept + rows}, indent=2) + "\n").encode()
    )
    print(f"\nwrote {dest}")


if __name__ == "__main__":
    main()
