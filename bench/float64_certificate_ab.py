"""The float64 certificate's cost, before and after a change: A/B in one process.

``MonDEQClassifier`` as of git revision ``--old`` (``model_core/models.py`` and
``bounds.py`` read with ``git show``, imported beside the working tree's) against the working
tree's, on the same model object (its class swapped between calls), alternating the arm that
runs first, ``--pairs`` pairs per case. Per case: the median wall time of ``infer`` per arm,
the median of the pairs' ratios (new / old), the time spent inside ``_float64_certificate``
and the rows it certified, and whether both arms gave the same iterations, flags and labels.
A machine probe runs before and after (this VM's speed drifts up to 2×).

Cases (docs/performance.md, "The float64 certificate of stalled rows"): the speed benchmark's
cifar-conv at batch 64 (PR, tol 1e-2, random weights and inputs, seed 0) and the first 64
Fashion-MNIST test images on both default models (models/NAME/1, α as stored) at tol 1e-4,
``stop="label"`` and ``stop="logits"`` with ``logit_tol`` 0.1.

    .venv/bin/python bench/float64_certificate_ab.py --old REV [--pairs 7] [--out FILE]

Writes ``bench/results/float64_certificate_ab-cpu.json`` by default.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model_core  # noqa: E402
import model_core.models as new_models  # noqa: E402
from model_core import load_checkpoint  # noqa: E402
from model_core.files import atomic_write  # noqa: E402
from model_core.runtime import tune_allocator  # noqa: E402
from mondeq_cli.args import positive_int  # noqa: E402
from mondeq_cli.benchmark import PAPER_MODELS, PAPER_SOLVER, machine_probe  # noqa: E402
from training.data import load_dataset  # noqa: E402

FMNIST_RULES = [
    {"name": "tol 1e-4", "tol": 1e-4},
    {"name": "label", "stop": "label"},
    {"name": "logits ≤ 0.1", "stop": "logits", "logit_tol": 0.1},
]


def old_classifier(rev: str) -> type:
    """``MonDEQClassifier`` of ``model_core/models.py`` at ``rev``, importing that
    revision's ``bounds.py`` and the working tree's other modules (its architectures are
    the working tree's registrations)."""
    folder = Path(tempfile.mkdtemp(prefix="f64ab-"))
    for name in ("models", "bounds"):
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:model_core/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        if name == "models":
            text = text.replace("from .bounds import", "from ._ab_old_bounds import")
            lines = text.splitlines(keepends=True)
            text = "".join(line for line in lines if not line.startswith("register_architecture("))
        (folder / f"{name}.py").write_text(text)
    loaded = {}
    for name in ("bounds", "models"):
        full = f"{model_core.__name__}._ab_old_{name}"
        spec = importlib.util.spec_from_file_location(full, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        loaded[name] = module
    return loaded["models"].MonDEQClassifier


class Arm:
    """One side: its class, and the time and rows of its ``_float64_certificate`` calls."""

    def __init__(self, name: str, cls: type):
        self.name, self.cls = name, cls
        self.cert_s, self.cert_rows = 0.0, 0
        inner = cls._float64_certificate

        def timed_certificate(model, x, z):
            t0 = time.perf_counter()
            out = inner(model, x, z)
            self.cert_s += time.perf_counter() - t0
            self.cert_rows += len(z)
            return out

        cls._float64_certificate = timed_certificate

    def infer(self, model, x, kwargs: dict):
        """``(seconds, certificate seconds, certified rows, result)`` of one call."""
        model.__class__ = self.cls
        self.cert_s, self.cert_rows = 0.0, 0
        try:
            t0 = time.perf_counter()
            result = model.infer(x, **kwargs)
            seconds = time.perf_counter() - t0
        finally:
            model.__class__ = new_models.MonDEQClassifier
        return seconds, self.cert_s, self.cert_rows, result


def case(name: str, rule: str, model, x, kwargs: dict, arms: dict[str, Arm], pairs: int) -> dict:
    for arm in arms.values():  # warm: caches, the float64 copy
        arm.infer(model, x, kwargs)
    runs: dict[str, list] = {"old": [], "new": []}
    for i in range(pairs):
        for side in ("old", "new") if i % 2 == 0 else ("new", "old"):
            runs[side].append(arms[side].infer(model, x, kwargs))
    old, new = runs["old"][-1][3], runs["new"][-1][3]
    same = (
        torch.equal(old.stats.iterations, new.stats.iterations)
        and torch.equal(old.stats.converged, new.stats.converged)
        and torch.equal(old.label_proven, new.label_proven)
        and torch.equal(old.certified_in_float64, new.certified_in_float64)
        and torch.equal(old.labels, new.labels)
    )
    moved = (new.error_bound.double() - old.error_bound.double()).abs() / old.error_bound.double()

    def median(side: str, field: int) -> float:
        return statistics.median(run[field] for run in runs[side])

    matched = list(zip(runs["old"], runs["new"], strict=True))

    return {
        "model": name,
        "rule": rule,
        "ms_old": 1e3 * median("old", 0),
        "ms_new": 1e3 * median("new", 0),
        "ratio_median": statistics.median(n[0] / o[0] for o, n in matched),
        "ratios": [round(n[0] / o[0], 3) for o, n in matched],
        "certificate_ms_old": 1e3 * median("old", 1),
        "certificate_ms_new": 1e3 * median("new", 1),
        "certificate_ratio_median": statistics.median(n[1] / o[1] for o, n in matched if o[1] > 0),
        "certified_rows_old": runs["old"][-1][2],
        "certified_rows_new": runs["new"][-1][2],
        "iterations_mean": new.stats.iterations.double().mean().item(),
        "proven": int(new.label_proven.sum()),
        "converged": int(new.stats.converged.sum()),
        "certified_in_float64": int(new.certified_in_float64.sum()),
        "same_answers": same,
        "error_bound_moved_max": float(moved.nan_to_num(0.0).max()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="git revision of the old MonDEQClassifier")
    p.add_argument("--pairs", type=positive_int, default=7)
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench/results/float64_certificate_ab-cpu.json"
    )
    args = p.parse_args(argv)
    tune_allocator()
    arms = {
        "old": Arm("old", old_classifier(args.old)),
        "new": Arm("new", new_models.MonDEQClassifier),
    }
    probe_before = machine_probe("cpu")
    print(f"probe: {probe_before}")
    print(
        "| model | rule | ms old | ms new | pair ratio (median) | certificate ms old → new "
        "| rows certified old → new | same answers |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    rows = []
    torch.manual_seed(0)
    cifar = new_models.build_model({**PAPER_MODELS["cifar-conv"], "solver": PAPER_SOLVER.to_dict()})
    cifar.eval()
    problems = [("cifar-conv", "tol 1e-2", cifar, torch.randn(64, 3, 32, 32), {})]
    data = load_dataset("fashion-mnist")
    for name in ("fmnist-fc", "fmnist-conv"):
        model = load_checkpoint(ROOT / "models" / name / "1" / "model.pt")
        x = model.input_spec.normalize(data.test_x[:64])
        for rule in FMNIST_RULES:
            kwargs = {k: v for k, v in rule.items() if k != "name"}
            problems.append((name, rule["name"], model, x, kwargs))
    for name, rule, model, x, kwargs in problems:
        row = case(name, rule, model, x, kwargs, arms, args.pairs)
        rows.append(row)
        print(
            f"| {name} | {rule} | {row['ms_old']:.0f} | {row['ms_new']:.0f} | "
            f"{row['ratio_median']:.3f} | {row['certificate_ms_old']:.1f} → "
            f"{row['certificate_ms_new']:.1f} | {row['certified_rows_old']} → "
            f"{row['certified_rows_new']} | {row['same_answers']} |",
            flush=True,
        )
    probe_after = machine_probe("cpu")
    print(f"probe: {probe_after}")
    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "old": args.old,
        "probe_before": probe_before,
        "probe_after": probe_after,
        "pairs": args.pairs,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, (json.dumps(out, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
