"""Test-set evaluation: accuracy, solver statistics, error bounds, proven labels, Lipschitz
bound, certified accuracy; under one stopping rule or several side by side."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model_core import MonDEQClassifier
from model_core.models import STOP_RULES

from .distributed import Dist

DEFAULT_RADII = (0.05, 0.1, 0.25, 0.5)

_ROWS = ("correct", "loss", "it", "res", "conv", "rad", "bound", "logit_bound", "proven", "ms")


@dataclass(frozen=True)
class StopRule:
    """A stopping rule of :meth:`MonDEQClassifier.infer <model_core.MonDEQClassifier.infer>`
    (docs/math.md §9): ``"tol"`` (residual ≤ tol), ``"label"`` (label proven) or
    ``"logits"`` (every logit within ``logit_tol`` of the exact equilibrium's), checked every
    ``check_every`` iterations (label and logits only).

    Raises:
        ValueError: an unknown ``stop``, ``logit_tol`` missing or not a finite number > 0
            with ``"logits"`` or given with another rule, ``check_every`` not an integer
            >= 1 (as ``infer`` would, but before any solve).
    """

    stop: str = "tol"
    logit_tol: float | None = None
    check_every: int = 1

    def __post_init__(self) -> None:
        if self.stop not in STOP_RULES:
            raise ValueError(f"stop must be one of {', '.join(STOP_RULES)}, got {self.stop!r}")
        if self.stop != "logits" and self.logit_tol is not None:
            raise ValueError(f"logit_tol applies to stop='logits' only, not stop={self.stop!r}")
        tol = self.logit_tol
        if self.stop == "logits" and not (
            isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0
        ):
            raise ValueError(f"stop='logits' needs a finite logit_tol > 0, got {tol!r}")
        if (
            isinstance(self.check_every, bool)
            or not isinstance(self.check_every, int)
            or (self.check_every < 1)
        ):
            raise ValueError(f"check_every must be an integer >= 1, got {self.check_every!r}")

    def kwargs(self) -> dict:
        """``infer``'s keyword arguments for this rule."""
        return {"stop": self.stop, "logit_tol": self.logit_tol, "check_every": self.check_every}

    def describe(self) -> str:
        """``tol``, ``label``, ``label, every 2``, ``logits ≤ 0.1``."""
        name = self.stop if self.logit_tol is None else f"logits ≤ {self.logit_tol:g}"
        every = f", every {self.check_every}" if self.check_every != 1 else ""
        return name + every


@torch.no_grad()
def evaluate(
    model: MonDEQClassifier,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 500,
    radii: tuple[float, ...] = DEFAULT_RADII,
    dist: Dist | None = None,
    progress: bool = False,
    rule: StopRule | None = None,
) -> dict:
    """Classify uint8 images ``x (N, C, H, W)`` against labels ``y (N,)``.

    Images are normalised by the model's input spec (:meth:`InputSpec.normalize
    <model_core.config.InputSpec.normalize>`) on the model's device, ``batch_size`` at a time,
    and solved with the model's solver settings under ``rule`` (default: the tol rule).

    Under DDP each rank takes the samples ``rank::world`` and the per-sample results are
    gathered, so every rank returns the same numbers.

    Returns:
        ``samples``, ``stop``, ``logit_tol``, ``check_every``, ``accuracy``, ``loss``,
        ``iterations_{mean,p50,p90,p99,max}``, ``residual_mean``, ``converged_share`` (true
        fixed-point residual ≤ tol, whatever stopped the sample), ``proven_share`` (label
        provably the exact equilibrium's, docs/math.md §9), ``error_bound_{mean,p99}`` (the
        bound on ``‖ẑ − z*‖``, §9 eq. 15, in the units of ``z``), ``logit_error_bound_max``
        (the largest bound on ``|l_i − l*_i|`` over samples and classes, §9 eq. 16, in
        logit units), ``lipschitz``, ``certified`` (radius → certified accuracy: correct,
        and a certified ℓ2 radius ≥ r, §7, §9: a radius only where the label is proven,
        shrunk by the error bound, so it holds for the exact equilibrium however early the
        sample stopped), ``solve_s`` (wall seconds in the solves) and ``batch_ms_p50``
        (median wall milliseconds per batch).

    Raises:
        ValueError: an empty set.
    """
    rules = [rule or StopRule()]
    kwargs = {"batch_size": batch_size, "radii": radii, "dist": dist, "progress": progress}
    return compare_stops(model, x, y, rules, **kwargs)[0]


@torch.no_grad()
def compare_stops(
    model: MonDEQClassifier,
    x: Tensor,
    y: Tensor,
    rules: list[StopRule],
    *,
    batch_size: int = 500,
    radii: tuple[float, ...] = DEFAULT_RADII,
    dist: Dist | None = None,
    progress: bool = False,
) -> list[dict]:
    """:func:`evaluate` under each of ``rules`` on the same images: one dict per rule, in order.

    Each batch is solved under every rule before the next batch, the rules' order rotating
    from batch to batch, so that a machine whose speed drifts (shared VMs: up to 2× within
    minutes) slows every rule alike and the times compare.

    Raises:
        ValueError: an empty set or no rules, before any solve.
    """
    if not rules:
        raise ValueError("no stopping rules to evaluate")
    if len(x) == 0:
        raise ValueError("evaluation set is empty")
    device = next(model.parameters()).device
    dist = dist or Dist(device=device)
    index = torch.arange(dist.rank, len(x), dist.world)
    rows = [{k: [] for k in _ROWS} for _ in rules]
    batches = range(0, len(index), batch_size)
    if progress and dist.is_main:
        from tqdm import tqdm

        batches = tqdm(batches, desc="eval", leave=False, dynamic_ncols=True)
    for b, start in enumerate(batches):
        idx = index[start : start + batch_size]
        target = y[idx].to(device)
        xb = model.input_spec.normalize(x[idx].to(device, non_blocking=True))
        for k in range(len(rules)):
            i = (b + k) % len(rules)
            _sync(device)
            t0 = time.perf_counter()
            r = model.infer(xb, **rules[i].kwargs())
            _sync(device)
            ms = (time.perf_counter() - t0) * 1e3
            out = rows[i]
            out["correct"].append((r.labels == target).cpu())
            out["loss"].append(F.cross_entropy(r.logits, target, reduction="none").cpu())
            out["it"].append(r.stats.iterations.cpu())
            out["res"].append(r.stats.residual.cpu())
            out["conv"].append(r.stats.converged.cpu())
            out["rad"].append(r.certified_radius.cpu())
            out["bound"].append(r.error_bound.cpu())
            out["logit_bound"].append(r.logit_error_bound.amax(dim=1).cpu())
            out["proven"].append(r.label_proven.cpu())
            out["ms"].append(torch.tensor([ms], dtype=torch.float64))
    lip = model.lipschitz_bound()
    return [_summary(rule, rows[i], dist, radii, lip) for i, rule in enumerate(rules)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(rule: StopRule, rows: dict, dist: Dist, radii: tuple[float, ...], lip: float) -> dict:
    cat = {k: dist.gather_cat(torch.cat(v) if v else torch.empty(0)) for k, v in rows.items()}
    correct, it = cat["correct"].double(), cat["it"].double()
    n = len(correct)
    if n == 0:
        raise ValueError("evaluation set is empty")
    res = cat["res"][~cat["res"].isnan()].double()
    bound = cat["bound"].double()
    ms = cat["ms"]
    return {
        "samples": n,
        "stop": rule.stop,
        "logit_tol": rule.logit_tol,
        "check_every": rule.check_every,
        "accuracy": correct.mean().item(),
        "loss": cat["loss"].double().mean().item(),
        "iterations_mean": it.mean().item(),
        "iterations_p50": it.quantile(0.5).item(),
        "iterations_p90": it.quantile(0.9).item(),
        "iterations_p99": it.quantile(0.99).item(),
        "iterations_max": int(it.max().item()),
        "residual_mean": res.mean().item() if len(res) else float("nan"),
        "converged_share": cat["conv"].double().mean().item(),
        "proven_share": cat["proven"].double().mean().item(),
        # inf where a solve blew up: the mean says so rather than hiding it
        "error_bound_mean": bound.mean().item(),
        "error_bound_p99": bound.quantile(0.99).item(),
        "logit_error_bound_max": cat["logit_bound"].double().max().item(),
        "lipschitz": lip,
        "certified": {
            # NaN (no radius: label not proven) compares False
            f"{r:g}": ((cat["rad"] >= r) & cat["correct"]).double().mean().item()
            for r in radii
        },
        "solve_s": ms.sum().item() / 1e3,
        "batch_ms_p50": ms.median().item(),
    }


def format_report(name: str, m: dict) -> str:
    """Human-readable lines for ``mondeq eval``."""
    lines = [
        f"{name}: {m['samples']:,} test samples, stopping rule: {_rule(m).describe()}",
        f"  accuracy          {100 * m['accuracy']:.2f}%",
        f"  iterations        mean {m['iterations_mean']:.2f}, p50 {m['iterations_p50']:.0f}, "
        f"p90 {m['iterations_p90']:.0f}, p99 {m['iterations_p99']:.0f}, "
        f"max {m['iterations_max']}",
        f"  residual (mean)   {m['residual_mean']:.3g}",
        f"  converged         {100 * m['converged_share']:.2f}%",
        f"  label proven      {100 * m['proven_share']:.2f}%",
        f"  error bound       mean {m['error_bound_mean']:.3g}, p99 {m['error_bound_p99']:.3g} "
        "(‖ẑ − z*‖)",
        f"  logit error       max {m['logit_error_bound_max']:.3g} (|l − l*|)",
        f"  solve time        {m['solve_s']:.2f} s, {m['batch_ms_p50']:.0f} ms per batch (p50)",
        f"  Lipschitz bound   {m['lipschitz']:.4g}",
        "  certified accuracy (ℓ2 radius):",
    ]
    lines += [f"    ε = {r:<6} {100 * a:.2f}%" for r, a in m["certified"].items()]
    return "\n".join(lines)


def format_comparison(name: str, rows: list[dict]) -> str:
    """The table of ``mondeq eval --compare-stops``: one line per stopping rule."""
    head = ("stop rule", "iters mean", "p50", "p90", "max", "proven", "accuracy",
            "ms/batch p50", "solve s")  # fmt: skip
    cells = [
        (
            _rule(m).describe(),
            f"{m['iterations_mean']:.2f}",
            f"{m['iterations_p50']:.0f}",
            f"{m['iterations_p90']:.0f}",
            f"{m['iterations_max']}",
            f"{100 * m['proven_share']:.2f}%",
            f"{100 * m['accuracy']:.2f}%",
            f"{m['batch_ms_p50']:.0f}",
            f"{m['solve_s']:.2f}",
        )
        for m in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

    def line(values) -> str:
        first, *rest = values
        right = [v.rjust(w) for v, w in zip(rest, widths[1:], strict=True)]
        return "  ".join([first.ljust(widths[0]), *right])

    n = rows[0]["samples"]
    return "\n".join([f"{name}: {n:,} test samples under each stopping rule", line(head),
                      *map(line, cells)])  # fmt: skip


def _rule(m: dict) -> StopRule:
    return StopRule(m["stop"], m["logit_tol"], m["check_every"])
