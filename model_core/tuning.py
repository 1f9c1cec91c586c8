"""Step-size search (math notes §6).

PR converges for every α > 0, but how fast depends on α, and not monotonically (paper,
Fig. 3). :func:`tune_alpha` searches ``log α`` on a calibration batch: a coarse grid, then a
golden-section refinement around the best grid point. Each α needs its own resolvent; they
are built aside (``cache=False``), so a search never evicts the one in use.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .models import MonDEQClassifier
from .solvers import solve_forward

_GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass
class AlphaTuning:
    """Result of :func:`tune_alpha`.

    Attributes:
        alpha: the best α found.
        method: the solver tuned.
        objective: ``"iterations"`` (mean forward iterations) or ``"time"`` (seconds).
        curve: every α tried, sorted by α: dicts with ``alpha``, ``iterations_mean``,
            ``iterations_max``, ``converged_share``, ``residual_mean`` and ``time_s``
            (solve time including the resolvent build).
        baseline: the same row for the α the model held before the search.
    """

    alpha: float
    method: str
    objective: str
    curve: list[dict] = field(default_factory=list)
    baseline: dict | None = None

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "method": self.method,
            "objective": self.objective,
            "curve": self.curve,
            "baseline": self.baseline,
        }


@torch.no_grad()
def evaluate_alpha(
    model: MonDEQClassifier,
    x: Tensor,
    alpha: float,
    *,
    method: str = "peaceman_rachford",
    tol: float | None = None,
    max_iter: int | None = None,
) -> dict:
    """Solve the batch ``x`` once at ``alpha`` and return its row of the curve."""
    deq = model.deq
    t0 = time.perf_counter()
    resolvent = deq.op.resolvent(alpha, cache=False) if method == "peaceman_rachford" else None
    _, stats = solve_forward(
        deq.op,
        deq.nonlin,
        deq.op.bias(x),
        method=method,
        alpha=alpha,
        tol=deq.settings.tol if tol is None else tol,
        max_iter=deq.settings.max_iter if max_iter is None else max_iter,
        resolvent=resolvent,
    )
    s = stats.summary()
    return {
        "alpha": float(alpha),
        "iterations_mean": s["iterations_mean"],
        "iterations_max": s["iterations_max"],
        "converged_share": s["converged_share"],
        "residual_mean": s["residual_mean"],
        "time_s": time.perf_counter() - t0,
    }


@torch.no_grad()
def tune_alpha(
    model: MonDEQClassifier,
    x: Tensor,
    *,
    method: str = "peaceman_rachford",
    objective: str = "iterations",
    log10_range: tuple[float, float] = (-2.0, 2.0),
    grid: int = 9,
    refine: int = 4,
    tol: float | None = None,
    max_iter: int | None = None,
) -> AlphaTuning:
    """Search ``log α`` for the fewest iterations (or least time) on a calibration batch.

    The model is not changed: apply the result with
    ``model.set_solver(alpha=result.alpha)``.

    Args:
        model: the classifier.
        x: normalised calibration batch ``(B, C, H, W)`` on any device.
        method: solver to tune (``"peaceman_rachford"``; FB's α is bounded by its step rule).
        objective: ``"iterations"`` (mean per sample; ties, which are common, broken by the
            maximum iterations, then the mean residual: never by the clock, so that two
            runs on the same batch agree) or ``"time"``.
        log10_range: the coarse grid's span in ``log10 α``.
        grid: coarse grid points.
        refine: golden-section evaluations around the best grid point.
        tol, max_iter: override the model's stopping rule during the search.

    Returns:
        :class:`AlphaTuning` with the best α and the iterations-vs-α curve.
    """
    if objective not in ("iterations", "time"):
        raise ValueError(f"objective must be 'iterations' or 'time', got {objective!r}")
    if grid < 2:
        raise ValueError("grid needs at least 2 points")
    p = next(model.parameters())
    x = x.to(device=p.device, dtype=p.dtype)
    rows: dict[float, dict] = {}

    def cost(log_a: float) -> tuple[float, ...]:
        a = round(10.0**log_a, 6)
        if a not in rows:
            rows[a] = evaluate_alpha(model, x, a, method=method, tol=tol, max_iter=max_iter)
        r = rows[a]
        # Unconverged samples count at max_iter already; penalise them further so that a
        # fast-but-failing α never wins.
        penalty = (1.0 - r["converged_share"]) * 1e6
        if objective == "iterations":
            residual = r["residual_mean"]
            return (
                r["iterations_mean"] + penalty,
                r["iterations_max"],
                residual if math.isfinite(residual) else math.inf,
                a,
            )
        return (r["time_s"] + penalty, r["iterations_mean"])

    lo, hi = log10_range
    step = (hi - lo) / (grid - 1)
    points = [lo + i * step for i in range(grid)]
    best = min(points, key=cost)
    # Golden-section search on [best - step, best + step].
    a, b = best - step, best + step
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    for _ in range(max(0, refine) // 2):
        if cost(c) <= cost(d):
            b, d = d, c
            c = b - _GOLDEN * (b - a)
        else:
            a, c = c, d
            d = a + _GOLDEN * (b - a)
    best_alpha = min(rows, key=lambda al: cost(math.log10(al)))
    baseline = None
    current = model.deq.settings.alpha
    if current is not None and model.deq.settings.method == method:
        baseline = evaluate_alpha(model, x, current, method=method, tol=tol, max_iter=max_iter)
    return AlphaTuning(
        alpha=best_alpha,
        method=method,
        objective=objective,
        curve=[rows[k] for k in sorted(rows)],
        baseline=baseline,
    )
