"""What the float64 certificate during the solve buys: iterations and time, A/B in one run.

A float32 sample whose own test stalls at its rounding floor (docs/math.md §2, "Certified
again in float64") is certified in float64 at iterations 8, 16, 32, … and stops once that
meets its rule. This bench solves the same Fashion-MNIST test images on both default models
(models/NAME/1, α as stored) under rules that float32 alone cannot always meet, with the
certificate during the solve ("during") and with it only at the answer ("at the end", as
before it existed: such rows run to ``max_iter``), alternating the two arms in one process
(``--repeats`` pairs, the arm that runs first alternating too). Iterations are
deterministic; times are the median of the pairs, with a machine probe before and after.

    .venv/bin/python bench/float64_certificate.py [--images 64] [--repeats 3] [--out FILE]

Writes ``bench/results/float64_certificate-cpu.json`` by default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_core import load_checkpoint  # noqa: E402
from model_core.files import atomic_write  # noqa: E402
from mondeq_cli.args import positive_int  # noqa: E402
from mondeq_cli.benchmark import machine_probe, timed  # noqa: E402
from training.data import load_dataset  # noqa: E402

RULES = [
    {"name": "tol 1e-4", "stop": "tol", "tol": 1e-4},
    {"name": "label", "stop": "label"},
    {"name": "logits ≤ 0.1", "stop": "logits", "logit_tol": 0.1},
]


def solve(model, x, rule: dict, during: bool):
    """``infer`` under ``rule``; without the certificate during the solve if not ``during``
    (the classifier's hook withheld, so only the answer's certificate runs)."""
    kwargs = {k: v for k, v in rule.items() if k != "name"}
    if during:
        return model.infer(x, **kwargs)
    model._certifier = lambda *args: None  # an instance attribute, removed below
    try:
        return model.infer(x, **kwargs)
    finally:
        del model._certifier


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=positive_int, default=64)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/float64_certificate-cpu.json")
    args = p.parse_args(argv)
    data = load_dataset("fashion-mnist")
    probe_before = machine_probe("cpu")
    rows = []
    print(f"probe: {probe_before}")
    print("| model | rule | arm | iterations mean | max | proven | converged | ms (median) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name in ("fmnist-fc", "fmnist-conv"):
        model = load_checkpoint(ROOT / "models" / name / "1" / "model.pt")
        x = model.input_spec.normalize(data.test_x[: args.images])
        model.infer(x)  # builds the caches (resolvent, spectra, the float64 copy's lazily)
        for rule in RULES:
            times = {True: [], False: []}
            results = {}
            for i in range(args.repeats):
                for during in (True, False) if i % 2 == 0 else (False, True):
                    seconds, r = timed(partial(solve, model, x, rule, during), x.device)
                    times[during].append(seconds)
                    results[during] = r
            for during in (True, False):
                r = results[during]
                row = {
                    "model": name,
                    "rule": rule["name"],
                    "arm": "during" if during else "at the end",
                    "iterations_mean": r.stats.iterations.double().mean().item(),
                    "iterations_max": int(r.stats.iterations.max()),
                    "proven": int(r.label_proven.sum()),
                    "converged": int(r.stats.converged.sum()),
                    "certified_in_float64": int(r.certified_in_float64.sum()),
                    "ms_median": 1e3 * statistics.median(times[during]),
                    "ms_all": [1e3 * t for t in times[during]],
                }
                rows.append(row)
                print(
                    f"| {name} | {row['rule']} | {row['arm']} | {row['iterations_mean']:.2f} | "
                    f"{row['iterations_max']} | {row['proven']} | {row['converged']} | "
                    f"{row['ms_median']:.0f} |"
                )
    probe_after = machine_probe("cpu")
    print(f"probe: {probe_after}")
    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "probe_before": probe_before,
        "probe_after": probe_after,
        "images": args.images,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, (json.dumps(out, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
