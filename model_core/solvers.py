"""Operator-splitting solvers: one iteration loop, one step per method (math notes §2 and §3).

Both problems are monotone inclusions ``0 ∈ F(x) + G(x)`` that share the linear operator
``I − W``:

* forward (Theorem 1):  ``F(z) = (I − W) z − (Ux + b)``, ``G = ∂f`` (so ``prox = σ``);
* backward (Theorem 2): ``F(ũ) = (I − Wᵀ) ũ``, ``G(ũ) = D ũ − g`` with ``D = J⁻¹ − I``.

A method (forward–backward or Peaceman–Rachford) only says how to take one step on either
problem. :func:`iterate` owns the loop: per-sample stopping on the relative change
``‖x⁺ − x‖ ≤ tol ‖x⁺‖``, the iteration counters, and the compaction of the working batch
so that converged samples stop costing work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .nonlinearity import Nonlinearity
from .operators import MonotoneOperator, Resolvent
from .operators.base import CPU_CHUNK_BYTES, chunk_rows

State = dict[str, Tensor]

# On the CPU the loop runs the batch in equal chunks of at most CPU_CHUNK_BYTES of iterate
# (operators.base gives the measurement; tests patch it here). GPUs get the whole batch.

# The loop rebuilds the working batch without its finished rows once at least this share of
# the rows it still carries are finished. Index-selecting the state costs about one elementwise
# pass; a step costs two FFTs and a batched matmul, so even small shares pay.
COMPACT_SHARE = 0.05


@dataclass
class SolveStats:
    """What one solve did, per sample, returned by every forward and backward solve.

    Attributes:
        iterations: ``(B,)`` int64, iterations run before the sample's stopping rule fired
            (``max_iter`` if it never did).
        residual: ``(B,)`` float, the true fixed-point residual at exit. Forward:
            ``‖z − σ(Wz + Ux + b)‖ / ‖z‖`` (§2). Backward: ``‖ũ − J(g + Wᵀũ)‖ / ‖ũ‖`` (§3).
            NaN where it was not computed.
        converged: ``(B,)`` bool, the stopping rule fired before ``max_iter``.
        alpha: step size α used.
        method: registered solver name.
        tol, max_iter: the stopping rule used.
        time_s: wall time of the solve, in seconds (the iteration loop only).
        direction: ``"forward"`` or ``"backward"``.
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    alpha: float
    method: str
    tol: float
    max_iter: int
    time_s: float
    direction: str = "forward"
    extra: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.iterations.shape[0])

    def summary(self) -> dict:
        """Batch aggregates as plain Python numbers (for logs and progress bars)."""
        it = self.iterations.double()
        res = self.residual[~self.residual.isnan()]
        return {
            "direction": self.direction,
            "method": self.method,
            "alpha": self.alpha,
            "iterations_mean": it.mean().item() if it.numel() else 0.0,
            "iterations_max": int(self.iterations.max().item()) if it.numel() else 0,
            "residual_mean": res.mean().item() if res.numel() else float("nan"),
            "converged_share": self.converged.double().mean().item() if it.numel() else 1.0,
            "time_s": self.time_s,
        }


def _row_norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


class _Rows(dict):
    """A state restricted to some rows, gathered only for the entries ``finish`` reads."""

    def __init__(self, state: State, index: Tensor):
        super().__init__()
        self._state, self._index = state, index

    def __missing__(self, key: str) -> Tensor:
        value = self[key] = self._state[key].index_select(0, self._index)
        return value


def _keep_x(state: State) -> dict[str, Tensor]:
    return {"x": state["x"]}


def iterate(
    step: Callable[[State], State],
    state: State,
    *,
    tol: float,
    max_iter: int,
    fallback: str | None = None,
    finish: Callable[[State], dict[str, Tensor]] | None = None,
    first: Callable[[State], State] | None = None,
    chunk_scale: float = 1.0,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Run ``state ← step(state)`` until every sample meets ``‖x⁺ − x‖ ≤ tol‖x⁺‖``.

    Args:
        step: one iteration of a splitting method. It receives and returns a dict of tensors
            whose first dimension is the working batch; the iterate the stopping rule
            watches is ``state["x"]``. Entries it does not change (the data of the problem)
            it passes through, so that compaction keeps them aligned with the iterates.
        state: the initial state, every tensor with leading dimension ``B``.
        tol: relative-change tolerance, applied per sample.
        max_iter: iteration cap.
        fallback: a state entry whose relative change decides for rows where ``x⁺ = 0``.
            Under PR, ``z = σ(u)`` can sit at 0 for several steps while ``u`` still moves,
            so ``0 ≤ tol·0`` would stop it early; the rule on ``u`` decides there. Without a
            fallback (FB), ``x⁺ = x = 0`` is an exact fixed point and counts as converged.
        finish: maps the state of the rows that just stopped to the per-row outputs
            (default: ``{"x": state["x"]}``); it runs once per row, on that row's last state.
        first: the first iteration from ``state``, where a method knows it in closed form
            (default: ``step``). It must return exactly what ``step`` would.
        chunk_scale: the operator's multiple of the CPU chunk budget
            (:attr:`MonotoneOperator.chunk_scale`).

    Returns:
        ``(outputs, iterations, converged)``: ``finish``'s outputs for every sample, and
        per-sample ``(B,)`` iteration counts and stopping flags.
    """
    finish = finish or _keep_x
    x0 = state["x"]
    batch = x0.shape[0]
    device = x0.device
    rows_per_chunk = chunk_rows(x0, int(CPU_CHUNK_BYTES * chunk_scale))
    if batch > rows_per_chunk:
        parts = [
            iterate(
                step,
                {k: v[i : i + rows_per_chunk] for k, v in state.items()},
                tol=tol,
                max_iter=max_iter,
                fallback=fallback,
                finish=finish,
                first=first,
                chunk_scale=chunk_scale,
            )
            for i in range(0, batch, rows_per_chunk)
        ]
        outputs = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
        return outputs, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    iterations = torch.full((batch,), max_iter, dtype=torch.int64, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    if batch == 0 or max_iter <= 0:
        return finish(state), iterations.zero_(), converged

    outputs: dict[str, Tensor] = {}

    def record(where: Tensor, mask: Tensor) -> None:
        if len(where) == batch:  # every sample at once (the common case): no gathers
            outputs.update(finish(state))  # (the rows are still in order: no compaction yet)
            return
        for name, value in finish(_Rows(state, mask.nonzero().squeeze(1))).items():
            if name not in outputs:
                outputs[name] = value.new_empty((batch, *value.shape[1:]))
            outputs[name][where] = value

    rows = torch.arange(batch, device=device)  # working row -> original sample
    live = torch.ones(batch, dtype=torch.bool, device=device)  # working rows not finished
    n_live = batch
    for k in range(1, max_iter + 1):
        prev, prev_fb = state["x"], state[fallback] if fallback else None
        state = first(state) if k == 1 and first is not None else step(state)
        x = state["x"]
        x_norm = _row_norms(x)
        done = _row_norms(x - prev) <= tol * x_norm
        if fallback is not None:
            zero = x_norm == 0
            if bool(zero.any()):
                f = state[fallback]
                done = torch.where(zero, _row_norms(f - prev_fb) <= tol * _row_norms(f), done)
        done &= live
        n_done = int(done.sum())  # the one host sync per iteration
        if n_done == 0:
            continue
        finished = rows[done]
        record(finished, done)
        iterations[finished] = k
        converged[finished] = True
        live &= ~done
        n_live -= n_done
        if n_live == 0:
            return outputs, iterations, converged
        if (len(rows) - n_live) >= COMPACT_SHARE * len(rows):
            keep = live.nonzero().squeeze(1)
            state = {name: t.index_select(0, keep) for name, t in state.items()}
            rows = rows.index_select(0, keep)
            live = torch.ones(len(rows), dtype=torch.bool, device=device)
    # Rows still live ran out of iterations: they keep their last state, unconverged.
    record(rows[live], live)
    return outputs, iterations, converged


class SplittingMethod:
    """One step of an operator-splitting method on the forward and the backward problem.

    Subclasses give :meth:`init_forward`/:meth:`step_forward` and
    :meth:`init_backward`/:meth:`step_backward`; :func:`iterate` runs them.
    """

    name: str = ""
    needs_resolvent: bool = False
    fallback: str | None = None  # see iterate()
    free_residual: bool = False  # finish_forward() gives the equilibrium and its residual
    free_transpose: bool = False  # finish_backward() gives ũ and Wᵀũ without a multiply

    def __init__(self, op: MonotoneOperator, alpha: float, resolvent: Resolvent | None = None):
        self.op = op
        self.alpha = float(alpha)
        if resolvent is not None and resolvent.alpha != self.alpha:
            raise ValueError(f"resolvent was built for alpha={resolvent.alpha}, not {alpha}")
        if self.needs_resolvent and resolvent is None:
            resolvent = op.resolvent(self.alpha)
        self.resolvent = resolvent

    def init_forward(self, bias: Tensor) -> State:
        raise NotImplementedError

    def step_forward(self, state: State, nonlin: Nonlinearity) -> State:
        raise NotImplementedError

    def init_backward(self, grad: Tensor, jac: Tensor) -> State:
        raise NotImplementedError

    def step_backward(self, state: State) -> State:
        raise NotImplementedError

    # Both problems start from zero, where a step can often be written down without applying
    # W or the resolvent (a zero in, a zero out). These return exactly what the step would.
    def first_forward(self, state: State, nonlin: Nonlinearity) -> State:
        """The first forward step from :meth:`init_forward`'s state."""
        return self.step_forward(state, nonlin)

    def first_backward(self, state: State) -> State:
        """The first backward step from :meth:`init_backward`'s state."""
        return self.step_backward(state)

    def finish_forward(
        self, state: State, nonlin: Nonlinearity, preactivation: bool = False
    ) -> dict[str, Tensor]:
        """``{"x": z*, "residual": ...}`` (and ``"pre"``, ``W z* + Ux + b``, if asked)
        from a final state, where ``free_residual``."""
        raise NotImplementedError

    def finish_backward(self, state: State) -> dict[str, Tensor]:
        """``{"x": ũ, "wtu": Wᵀũ}`` from a final state, where ``free_transpose``."""
        raise NotImplementedError


class ForwardBackward(SplittingMethod):
    """Forward–backward splitting (Algorithm 1). Needs ``α ≤ 2m / ‖I − W‖²``.

    forward:  ``z⁺ = σ((1 − α) z + α (W z + U x + b))``
    backward: ``ũ⁺ = J ((1 − α) ũ + α Wᵀ ũ + α g)``  (J is 0/1 for our ReLU-type σ)
    """

    name = "forward_backward"

    def init_forward(self, bias: Tensor) -> State:
        return {"x": torch.zeros_like(bias), "bias": bias}

    def step_forward(self, state: State, nonlin: Nonlinearity) -> State:
        z, bias, a = state["x"], state["bias"], self.alpha
        v = (1.0 - a) * z + a * (self.op.multiply(z) + bias)
        return {"x": nonlin(v), "bias": bias}

    def first_forward(self, state: State, nonlin: Nonlinearity) -> State:
        """From ``z = 0``: ``z⁺ = σ(α(Ux + b))``, no multiply."""
        return {"x": nonlin(self.alpha * state["bias"]), "bias": state["bias"]}

    def init_backward(self, grad: Tensor, jac: Tensor) -> State:
        return {"x": torch.zeros_like(grad), "grad": grad, "jac": jac}

    def step_backward(self, state: State) -> State:
        u, g, jac, a = state["x"], state["grad"], state["jac"], self.alpha
        y = (1.0 - a) * u + a * (self.op.multiply_transpose(u) + g)
        return {"x": jac * y, "grad": g, "jac": jac}

    def first_backward(self, state: State) -> State:
        """From ``ũ = 0``: ``ũ⁺ = J(αg)``, no multiply."""
        g, jac = state["grad"], state["jac"]
        return {"x": jac * (self.alpha * g), "grad": g, "jac": jac}


class PeacemanRachford(SplittingMethod):
    """Peaceman–Rachford splitting (Algorithm 2). Converges for any α > 0.

    With ``V = (I + α(I − W))⁻¹``, from ``z = u = 0``:

    forward:  ``u½ = 2z − u;  z½ = V(u½ + α(Ux + b));  u = 2z½ − u½;  z = σ(u)``
    backward: ``u½ = 2ũ − u;  z½ = Vᵀ u½;  u = 2z½ − u½;  ũ = J(u + α g)``
    """

    name = "peaceman_rachford"
    needs_resolvent = True
    fallback = "u"
    free_residual = True
    free_transpose = True

    def init_forward(self, bias: Tensor) -> State:
        zero = torch.zeros_like(bias)
        return {"x": zero, "u": zero, "bias": bias, "z_half": zero, "u_half": zero}

    def step_forward(self, state: State, nonlin: Nonlinearity) -> State:
        z, u, bias = state["x"], state["u"], state["bias"]
        u_half = torch.lerp(u, z, 2.0)  # 2z − u, in one pass
        z_half = self.resolvent.inverse(torch.add(u_half, bias, alpha=self.alpha))
        u = torch.lerp(u_half, z_half, 2.0)
        return {"x": nonlin(u), "u": u, "bias": bias, "z_half": z_half, "u_half": u_half}

    def finish_forward(
        self, state: State, nonlin: Nonlinearity, preactivation: bool = False
    ) -> dict[str, Tensor]:
        """Return ``z½`` with its exact residual, which costs no multiply (§2): from
        ``(I + α(I − W)) z½ = u½ + α(Ux + b)``, ``W z½ + Ux + b = ((1 + α) z½ − u½) / α``
        (one ``lerp`` pass: ``u½ + ((1 + α)/α)(z½ − u½)``)."""
        z_half, a = state["z_half"], self.alpha
        pre = torch.lerp(state["u_half"], z_half, (1.0 + a) / a)
        out = {"x": z_half, "residual": relative_residual(z_half, nonlin(pre))}
        if preactivation:
            out["pre"] = pre
        return out

    def init_backward(self, grad: Tensor, jac: Tensor) -> State:
        zero = torch.zeros_like(grad)
        # ũ = J(u + αg) = J u + αJg: the constant αJg once, then one fused pass a step.
        jg = torch.mul(jac, grad).mul_(self.alpha)
        return {"x": zero, "u": zero, "jg": jg, "jac": jac, "z_half": zero, "u_half": zero}

    def step_backward(self, state: State) -> State:
        x, u, jg, jac = state["x"], state["u"], state["jg"], state["jac"]
        u_half = torch.lerp(u, x, 2.0)
        z_half = self.resolvent.inverse_transpose(u_half)
        u = torch.lerp(u_half, z_half, 2.0)
        return {
            "x": torch.addcmul(jg, jac, u),
            "u": u,
            "jg": jg,
            "jac": jac,
            "z_half": z_half,
            "u_half": u_half,
        }

    def first_backward(self, state: State) -> State:
        """From ``ũ = u = 0``: ``u½ = 0``, ``z½ = Vᵀ0 = 0``, ``u = 0``, so ``ũ⁺ = αJg``.
        Saves one resolvent application (of about five) per backward solve."""
        return {**state, "x": state["jg"]}

    def finish_backward(self, state: State) -> dict[str, Tensor]:
        """Return ``z½`` and ``Wᵀz½`` without a multiply, as the forward does for its
        residual (§2, transposed): ``(I + α(I − Wᵀ)) z½ = u½`` gives
        ``Wᵀz½ = ((1 + α) z½ − u½) / α``; ``z½ → ũ*`` as PR converges."""
        z_half, a = state["z_half"], self.alpha
        return {"x": z_half, "wtu": torch.lerp(state["u_half"], z_half, (1.0 + a) / a)}


SOLVERS: dict[str, type[SplittingMethod]] = {
    ForwardBackward.name: ForwardBackward,
    PeacemanRachford.name: PeacemanRachford,
}


def get_solver(name: str) -> type[SplittingMethod]:
    """The solver class registered as ``name``; ``ValueError`` listing the valid names if none."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None


def _timed_sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def solve_forward(
    op: MonotoneOperator,
    nonlin: Nonlinearity,
    bias: Tensor,
    *,
    method: str,
    alpha: float,
    tol: float,
    max_iter: int,
    preactivation: bool = False,
    resolvent: Resolvent | None = None,
) -> tuple[Tensor, SolveStats] | tuple[Tensor, SolveStats, Tensor]:
    """Find ``z* = σ(W z* + bias)`` per sample (Theorem 1).

    Args:
        op: the monotone operator holding W.
        nonlin: σ, a proximal operator.
        bias: ``(B, *op.z_shape)``, the injection ``Ux + b``.
        method: a name in :data:`SOLVERS`.
        alpha: step size α > 0.
        tol: per-sample relative-change tolerance.
        max_iter: iteration cap.
        preactivation: also return ``W z + bias``, the argument of σ at the solution
            (training applies the layer once more through it). Free under PR (§2); one
            multiply under FB, which fills ``stats.residual`` too.
        resolvent: a resolvent built aside for this α (else the operator's cached one).

    Returns:
        ``(z, stats)`` with ``z`` shaped like ``bias``; ``(z, stats, W z + bias)`` with
        ``preactivation``.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    solver = get_solver(method)(op, alpha, resolvent)
    t0 = _timed_sync(bias.device)
    free = solver.free_residual
    outputs, iterations, converged = iterate(
        lambda s: solver.step_forward(s, nonlin),
        solver.init_forward(bias),
        tol=tol,
        max_iter=max_iter,
        fallback=solver.fallback,
        finish=(lambda s: solver.finish_forward(s, nonlin, preactivation)) if free else None,
        first=lambda s: solver.first_forward(s, nonlin),
        chunk_scale=op.chunk_scale,
    )
    z = outputs["x"]
    pre = outputs.get("pre")
    if free:
        residual = outputs["residual"]
    else:
        pre = op.multiply(z) + bias
        residual = relative_residual(z, nonlin(pre))
    elapsed = _timed_sync(bias.device) - t0
    stats = SolveStats(
        iterations=iterations,
        residual=residual,
        converged=converged,
        alpha=solver.alpha,
        method=solver.name,
        tol=tol,
        max_iter=max_iter,
        time_s=elapsed,
        direction="forward",
    )
    return (z, stats, pre) if preactivation else (z, stats)


def relative_residual(x: Tensor, fx: Tensor) -> Tensor:
    """``‖x − f(x)‖ / ‖x‖`` per sample (forward: ``f(z) = σ(Wz + Ux + b)``, §2).

    Where ``x = 0`` the denominator is ``‖f(x)‖`` instead: a zero that is its own image
    has residual 0, a zero that is not has residual 1.
    """
    x_norm, fx_norm = _row_norms(x), _row_norms(fx)
    denom = torch.where(x_norm > 0, x_norm, fx_norm).clamp_min(torch.finfo(x.dtype).tiny)
    return _row_norms(x - fx) / denom


@torch.no_grad()
def solve_backward(
    op: MonotoneOperator,
    jac: Tensor,
    grad: Tensor,
    *,
    method: str,
    alpha: float,
    tol: float,
    max_iter: int,
    resolvent: Resolvent | None = None,
) -> tuple[Tensor, SolveStats]:
    """Implicit backward pass (Theorems 2 and 3): the gradient w.r.t. the layer's input.

    Solves ``ũ = J (g + Wᵀ ũ)`` per sample and returns ``g + Wᵀ ũ``, the gradient to
    push through one autograd application of the layer.

    Args:
        op: the monotone operator holding W.
        jac: ``(B, *z_shape)``, ``J = σ'(W z* + U x + b)``, 0/1 valued.
        grad: ``(B, *z_shape)``, ``g = ∂ℓ/∂ẑ``.
        method, alpha, tol, max_iter, resolvent: as in :func:`solve_forward`.

    Returns:
        ``(g + Wᵀũ, stats)``.
    """
    solver = get_solver(method)(op, alpha, resolvent)
    t0 = _timed_sync(grad.device)
    free = solver.free_transpose
    outputs, iterations, converged = iterate(
        solver.step_backward,
        solver.init_backward(grad, jac),
        tol=tol,
        max_iter=max_iter,
        fallback=solver.fallback,
        finish=solver.finish_backward if free else None,
        first=solver.first_backward,
        chunk_scale=op.chunk_scale,
    )
    u = outputs["x"]
    wtu = outputs["wtu"] if free else op.multiply_transpose(u)
    out = grad + wtu
    elapsed = _timed_sync(grad.device) - t0
    residual = relative_residual(u, jac * out)
    stats = SolveStats(
        iterations=iterations,
        residual=residual,
        converged=converged,
        alpha=solver.alpha,
        method=solver.name,
        tol=tol,
        max_iter=max_iter,
        time_s=elapsed,
        direction="backward",
    )
    return out, stats
