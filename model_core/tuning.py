"""Step-size search (docs/math.md §6).

PR converges for every α > 0, but how fast depends on α, and not monotonically (paper,
Fig. 3). :func:`tune_alpha` searches ``log α`` on a calibration batch: a coarse grid, then a
golden-section refinement around the best grid point. Each α needs its own resolvent; they
are built aside (``cache=False``), so a search never evicts the one in use.

The forward and the backward problem (§3) share ``I − W`` but not their best α: on the
trained fmnist-conv model the forward is fastest near α = 0.44 and the backward near 0.6
(8.0 → 7.1 iterations). Training tunes both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import MonDEQClassifier
from .operators import Resolvent
from .solvers import PeacemanRachford, SolveStats, get_solver, solve_backward, solve_forward

_GOLDEN = (math.sqrt(5) - 1) / 2

Solve = Callable[[float, Resolvent | None], SolveStats]


@dataclass
class AlphaTuning:
    """Result of :func:`tune_alpha`.

    Attributes:
        alpha: the best α found.
        method: the solver tuned.
        objective: ``"iterations"`` (mean iterations) or ``"time"`` (seconds).
        curve: every α tried, sorted by α: dicts with ``alpha``, ``iterations_mean``,
            ``iterations_max``, ``converged_share``, ``residual_mean`` and ``time_s``
            (solve time including the resolvent build).
        baseline: the same row for the α the model held before the search.
        direction: ``"forward"`` or ``"backward"``, the problem tuned.
    """

    alpha: float
    method: str
    objective: str
    curve: list[dict] = field(default_factory=list)
    baseline: dict | None = None
    direction: str = "forward"

    def to_dict(self) -> dict:
        """The result as plain JSON-able data (every attribute)."""
        return {
            "alpha": self.alpha,
            "method": self.method,
            "objective": self.objective,
            "direction": self.direction,
            "curve": self.curve,
            "baseline": self.baseline,
        }


def _forward_problem(model: MonDEQClassifier, x: Tensor) -> tuple[Callable, tuple]:
    """The forward problem (§2) on ``x``: its solver function and data arguments."""
    return solve_forward, (model.op, model.deq.nonlin, model.op.bias(x))


def _backward_problem(
    model: MonDEQClassifier, x: Tensor, targets: Tensor
) -> tuple[Callable, tuple]:
    """The implicit backward problem (§3) of the cross-entropy loss on ``(x, targets)``:
    ``ũ = J(g + Wᵀũ)`` at the equilibrium the model's forward settings find."""
    deq, fwd = model.deq, model.solver_settings
    _, _, pre = solve_forward(
        deq.op,
        deq.nonlin,
        deq.op.bias(x),
        method=fwd.method,
        alpha=model.solver_alpha(),
        tol=fwd.tol,
        max_iter=fwd.max_iter,
        preactivation=True,
    )
    with torch.enable_grad():
        z_hat = deq.nonlin(pre).requires_grad_()
        loss = F.cross_entropy(model.head(model.features(z_hat)), targets.to(pre.device))
        (grad,) = torch.autograd.grad(loss, z_hat)
    return solve_backward, (deq.op, deq.nonlin.derivative(pre), grad)


def _evaluate(model: MonDEQClassifier, solve: Solve, alpha: float, method: str) -> dict:
    """Solve once at ``alpha`` and return its row of the curve."""
    t0 = time.perf_counter()
    resolvent = (
        model.op.resolvent(alpha, cache=False) if get_solver(method).needs_resolvent else None
    )
    s = solve(alpha, resolvent).summary()
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
    method: str = PeacemanRachford.name,
    objective: str = "iterations",
    log10_range: tuple[float, float] = (-2.0, 2.0),
    grid: int = 9,
    refine: int = 4,
    tol: float | None = None,
    max_iter: int | None = None,
    targets: Tensor | None = None,
) -> AlphaTuning:
    """Search ``log α`` for the fewest iterations (or least time) on a calibration batch.

    The model is not changed: apply the result with ``model.set_solver(alpha=result.alpha)``
    (forward) or ``model.set_solver(backward_alpha=result.alpha)`` (backward).

    Args:
        model: the classifier.
        x: normalised calibration batch ``(B, C, H, W)`` on any device.
        method: solver to tune (default PR; a method whose α is bounded by its convergence
            rule, such as FB, has ``tunable_alpha`` false and is not worth searching).
        objective: ``"iterations"`` (mean per sample; ties, which are common, broken by the
            maximum iterations, then the mean residual: never by the clock, so that two
            runs on the same batch agree) or ``"time"``.
        log10_range: the coarse grid's span in ``log10 α``.
        grid: coarse grid points.
        refine: golden-section evaluations around the best grid point.
        tol, max_iter: override the model's stopping rule during the search.
        targets: ``(B,)`` class labels of ``x``. Given, the search tunes the *backward*
            problem (§3) of the cross-entropy loss at the equilibrium the model's forward
            settings find, with the backward stopping rule; else the forward problem.

    Returns:
        :class:`AlphaTuning` with the best α and the iterations-vs-α curve.

    Raises:
        ValueError: an unknown ``objective``, ``grid < 2``, an unknown ``method`` or a bad
            ``tol`` / ``max_iter`` (:func:`~model_core.solvers.solve_forward`).
    """
    if objective not in ("iterations", "time"):
        raise ValueError(f"objective must be 'iterations' or 'time', got {objective!r}")
    if grid < 2:
        raise ValueError("grid needs at least 2 points")
    p = next(model.parameters())
    x = x.to(device=p.device, dtype=p.dtype)
    if targets is None:
        settings = model.solver_settings
        solve_problem, data = _forward_problem(model, x)
    else:
        settings = model.solver_settings.backward()
        solve_problem, data = _backward_problem(model, x, targets)
    stopping = {
        "tol": settings.tol if tol is None else tol,
        "max_iter": settings.max_iter if max_iter is None else max_iter,
    }

    def solve(alpha: float, resolvent: Resolvent | None) -> SolveStats:
        return solve_problem(*data, method=method, alpha=alpha, resolvent=resolvent, **stopping)[1]

    rows: dict[float, dict] = {}

    def cost(log_a: float) -> tuple[float, ...]:
        a = round(10.0**log_a, 6)
        if a not in rows:
            rows[a] = _evaluate(model, solve, a, method)
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
    if settings.alpha is not None and settings.method == method:
        hit = rows.get(round(settings.alpha, 6))  # a search centred on it has tried it
        baseline = hit if hit is not None else _evaluate(model, solve, settings.alpha, method)
    return AlphaTuning(
        alpha=best_alpha,
        method=method,
        objective=objective,
        curve=[rows[k] for k in sorted(rows)],
        baseline=baseline,
        direction="forward" if targets is None else "backward",
    )
