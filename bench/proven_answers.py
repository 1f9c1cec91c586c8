"""Proven answers: iterations, time and proven share of each stopping rule (docs/math.md §9).

    .venv/bin/python bench/proven_answers.py [--models fmnist-fc,fmnist-conv] [--samples 1000]
        [--batch-size 64] [--repeats 15,3] [--logit-tols 0.5,0.1] [--alpha served] [--device cpu]

On the default models (models/NAME/1/model.pt) and the first ``--samples`` Fashion-MNIST test
images, at the α the server serves (``model_core.tune_alpha`` on the checkpoint's first 64
calibration images, as the server does at load), batches of ``--batch-size``:

* ``tol``: the residual rule at tol 1e-2 (today's default);
* ``label`` with ``check_every`` 1, 2 and 3: stop when the label is proven;
* ``logits`` at each ``--logit-tols`` value: stop when every logit is within it of the exact
  equilibrium's.

Per rule: iterations per sample (mean, median, p90, max), milliseconds per batch (the mean
over the batches of one pass, median over ``--repeats`` passes: 15 of fmnist-fc, 3 of
fmnist-conv by default), the proven share, and the
share of labels equal to a tol-1e-5 solve's (converged, every label checked). Within a pass
each batch is solved under every rule before the next batch, the rules' order rotating, so
that the machine's drift (up to 2× within minutes on shared VMs) slows every rule alike.

Prints a Markdown table with the machine probe (GEMM GFLOP/s, copy GB/s) and the load
average before and after, and writes bench/results/proven_answers-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from model_core import load_checkpoint, tune_alpha
from model_core.runtime import tune_allocator
from mondeq_cli.args import positive_float, positive_int
from mondeq_cli.benchmark import machine_probe, pick_device, timed
from training.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-2  # the tol rule's tolerance (the default models' own)
REFERENCE_TOL = 1e-5  # the reference solve: its labels are the exact equilibrium's
REFERENCE_MAX_ITER = 3000
CALIBRATION_SIZE = 64  # rows of the server's α search (service settings: calibration_size)


def rules(logit_tols: list[float]) -> list[dict]:
    """The rules compared, as ``infer`` keyword arguments plus a display name."""
    out = [{"name": f"tol {TOL:g}", "stop": "tol", "tol": TOL}]
    out += [{"name": f"label, every {k}", "stop": "label", "check_every": k} for k in (1, 2, 3)]
    out += [{"name": f"logits ≤ {t:g}", "stop": "logits", "logit_tol": t} for t in logit_tols]
    return out


def served_alpha(model, choice: str) -> tuple[float, float | None]:
    """(α, seconds the search took): ``served`` (the server's load-time search),
    ``checkpoint`` (the checkpoint's own α) or a number."""
    if choice == "checkpoint":
        return model.solver_settings.alpha, None
    if choice != "served":
        return float(choice), None
    calibration = model.input_spec.normalize(model.calibration[:CALIBRATION_SIZE])
    t0 = time.perf_counter()
    result = tune_alpha(model, calibration, method=model.solver_settings.method)
    return result.alpha, time.perf_counter() - t0


def quantile(t: torch.Tensor, q: float) -> float:
    return t.double().quantile(q).item()


@torch.no_grad()
def bench_model(name: str, x: torch.Tensor, y: torch.Tensor, args, device, repeats: int) -> dict:
    """Every rule on ``x`` (uint8 ``(N, 1, 28, 28)``) for model ``name``; one dict."""
    model = load_checkpoint(ROOT / "models" / name / "1" / "model.pt", map_location=device)
    model.eval()
    alpha, tune_s = served_alpha(model, args.alpha)
    model.set_solver(alpha=alpha)
    xs = model.input_spec.normalize(x.to(device))
    y = y.to(device)
    batches = [xs[i : i + args.batch_size] for i in range(0, len(xs), args.batch_size)]

    ref = [model.infer(b, tol=REFERENCE_TOL, max_iter=REFERENCE_MAX_ITER) for b in batches]
    ref_labels = torch.cat([r.labels for r in ref])
    ref_converged = torch.cat([r.stats.converged for r in ref])
    ref_iters = torch.cat([r.stats.iterations for r in ref]).double()

    todo = rules(args.logit_tols)
    per_rule = [{"results": [None] * len(batches), "pass_s": []} for _ in todo]
    for _ in range(repeats):
        spent = [0.0] * len(todo)
        for b, batch in enumerate(batches):
            for k in range(len(todo)):
                i = (b + k) % len(todo)
                kw = {key: v for key, v in todo[i].items() if key != "name"}
                seconds, r = timed(lambda kw=kw, batch=batch: model.infer(batch, **kw), device)
                spent[i] += seconds
                per_rule[i]["results"][b] = r
        for i, s in enumerate(spent):
            per_rule[i]["pass_s"].append(s)

    rows = []
    for rule, got in zip(todo, per_rule, strict=True):
        res = got["results"]
        iters = torch.cat([r.stats.iterations for r in res]).double()
        labels = torch.cat([r.labels for r in res])
        proven = torch.cat([r.label_proven for r in res])
        bound = torch.cat([r.error_bound for r in res]).double()
        logit_bound = torch.cat([r.logit_error_bound.amax(dim=1) for r in res]).double()
        ms_per_batch = [1e3 * s / len(batches) for s in got["pass_s"]]
        rows.append(
            {
                "model": name,
                "rule": rule["name"],
                "stop": rule["stop"],
                "check_every": rule.get("check_every", 1),
                "logit_tol": rule.get("logit_tol"),
                "iterations_mean": iters.mean().item(),
                "iterations_p50": quantile(iters, 0.5),
                "iterations_p90": quantile(iters, 0.9),
                "iterations_max": int(iters.max().item()),
                "ms_per_batch": statistics.median(ms_per_batch),
                "ms_per_batch_passes": ms_per_batch,
                "proven_share": proven.double().mean().item(),
                "unproven": int((~proven).sum().item()),
                "labels_equal_reference_share": (labels == ref_labels).double().mean().item(),
                # rigour check: a proven label is always the reference's
                "proven_labels_equal_reference": bool((labels == ref_labels)[proven].all()),
                "accuracy": (labels == y).double().mean().item(),
                "converged_share": torch.cat([r.stats.converged for r in res])
                .double()
                .mean()
                .item(),
                "error_bound_mean": bound.mean().item(),
                "logit_error_bound_max": logit_bound.max().item(),
            }
        )
    return {
        "model": name,
        "alpha": alpha,
        "alpha_source": args.alpha,
        "alpha_search_s": tune_s,
        "samples": len(xs),
        "batches": len(batches),
        "passes": repeats,
        "reference": {
            "tol": REFERENCE_TOL,
            "max_iter": REFERENCE_MAX_ITER,
            "converged_share": ref_converged.double().mean().item(),
            "iterations_mean": ref_iters.mean().item(),
            "accuracy": (ref_labels == y).double().mean().item(),
        },
        "rules": rows,
    }


def format_table(results: list[dict]) -> str:
    cols = [
        ("rule", "rule", "{}"),
        ("iterations_mean", "iters mean", "{:.2f}"),
        ("iterations_p50", "p50", "{:.0f}"),
        ("iterations_p90", "p90", "{:.0f}"),
        ("iterations_max", "max", "{}"),
        ("ms_per_batch", "ms/batch", "{:.0f}"),
        ("proven_share", "proven", "{:.1%}"),
        ("labels_equal_reference_share", "labels = tol 1e-5", "{:.1%}"),
    ]
    lines = []
    for res in results:
        lines.append(
            f"\n{res['model']}: {res['samples']:,} test images in {res['batches']} batches, "
            f"α {res['alpha']:g} ({res['alpha_source']})"
        )
        lines.append("| " + " | ".join(c[1] for c in cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        for r in res["rules"]:
            lines.append("| " + " | ".join(fmt.format(r[k]) for k, _, fmt in cols) + " |")
    return "\n".join(lines).lstrip("\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="fmnist-fc,fmnist-conv")
    p.add_argument("--samples", type=positive_int, default=1000, help="first N test images")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    p.add_argument("--repeats", default="15,3",
                   help="timed passes (median): one count, or one per model")  # fmt: skip
    p.add_argument("--logit-tols", default="0.5,0.1", help="logit_tol values of stop=logits")
    p.add_argument("--alpha", default="served", help="served (default), checkpoint or a number")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: see above)")
    args = p.parse_args()
    args.logit_tols = [positive_float(t) for t in args.logit_tols.split(",") if t]
    models = [m for m in args.models.split(",") if m]
    repeats = [positive_int(r) for r in args.repeats.split(",") if r]
    if len(repeats) not in (1, len(models)):
        p.error(f"--repeats: give one count or one per model ({len(models)})")
    repeats = repeats * len(models) if len(repeats) == 1 else repeats
    if args.alpha not in ("served", "checkpoint"):
        positive_float(args.alpha)
    device = pick_device(args.device)
    allocator_tuned = tune_allocator()
    data = load_dataset("fashion-mnist")
    x, y = data.test_x[: args.samples], data.test_y[: args.samples]
    load_before = os.getloadavg()
    probe_before = machine_probe(args.device)
    results = []
    for name, n in zip(models, repeats, strict=True):
        print(f"benchmarking {name} ({n} passes) ...", file=sys.stderr, flush=True)
        results.append(bench_model(name, x, y, args, device, n))
    meta = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "allocator_tuned": allocator_tuned,
        "batch_size": args.batch_size,
        "repeats": dict(zip(models, repeats, strict=True)),
        # other processes share this machine: its 1/5/15-minute load averages around the run
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "probe_before": probe_before,
        "probe_after": machine_probe(args.device),
    }
    dev = "cpu" if device.type == "cpu" else "cuda"
    out = args.out or ROOT / "bench" / "results" / f"proven_answers-{dev}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(format_table(results))
    b, a = meta["probe_before"], meta["probe_after"]
    lb, la = meta["load_average_before"], meta["load_average_after"]
    print(
        f"\nmachine probe: GEMM {b['gemm_gflops']:.0f} → {a['gemm_gflops']:.0f} GFLOP/s, "
        f"copy {b['copy_gbps']:.1f} → {a['copy_gbps']:.1f} GB/s; load average (1 min) "
        f"{lb[0]:.1f} → {la[0]:.1f} on {meta['cpus']} CPUs (before → after)"
    )


if __name__ == "__main__":
    main()
