"""The equilibrium layer: forward solve without autograd, implicit backward (docs/math.md §3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor, nn

from .nonlinearity import Nonlinearity
from .operators import MonotoneOperator
from .solvers import (
    SYNC_EVERY,
    PeacemanRachford,
    SolveStats,
    SplittingMethod,
    get_solver,
    solve_backward,
    solve_forward,
)

# The solvers compute with α and 1/α in the weights' dtype: float32 holds both for any α in
# this range with room to spare, while α = 1e-40 or 1e300 fails inside the first iteration.
ALPHA_RANGE = (1e-30, 1e30)
# An iteration count is an int64 tensor; no solve comes near this many iterations.
MAX_ITER = 2**31 - 1


@dataclass(frozen=True)
class SolverSettings:
    """Solver defaults; forward and backward come in pairs (``backward_*`` ``None`` = same).

    ``SolverSettings()`` is the paper's setup (PR, α 1, tol 1e-2, 300 iterations) and the one
    home of these defaults.

    Attributes:
        method: a registered solver name (:data:`~model_core.solvers.SOLVERS`).
        alpha: step size α in :data:`ALPHA_RANGE` (PR: any α > 0 in exact arithmetic; FB:
            ``α ≤ 2m/‖I − W‖²``); ``None``: the method's
            :meth:`~model_core.solvers.SplittingMethod.safe_alpha` (FB: half that bound).
        tol: bound on each sample's true fixed-point residual (§2; a sample is converged
            when it holds). The paper trains with 1e-2, on the relative change instead.
        max_iter: iteration cap, 1 to :data:`MAX_ITER` (the paper uses 300).

    Raises:
        ValueError: an unknown method, α outside :data:`ALPHA_RANGE`, tol not > 0 or
            max_iter outside [1, MAX_ITER], forward or backward.
    """

    method: str = PeacemanRachford.name
    alpha: float | None = PeacemanRachford.default_alpha
    tol: float = 1e-2
    max_iter: int = 300
    backward_method: str | None = None
    backward_alpha: float | None = None
    backward_tol: float | None = None
    backward_max_iter: int | None = None

    def __post_init__(self):
        get_solver(self.method)  # raises ValueError naming the valid solvers
        if self.backward_method is not None:
            get_solver(self.backward_method)
        lo, hi = ALPHA_RANGE
        for prefix, alpha, tol, max_iter in (
            ("", self.alpha, self.tol, self.max_iter),
            ("backward_", self.backward_alpha, self.backward_tol, self.backward_max_iter),
        ):
            if alpha is not None and not lo <= alpha <= hi:
                raise ValueError(f"solver {prefix}alpha must be in [{lo:g}, {hi:g}], got {alpha}")
            if tol is not None and not tol > 0:
                raise ValueError(f"solver {prefix}tol must be > 0, got {tol}")
            if max_iter is not None and not 1 <= int(max_iter) <= MAX_ITER:
                raise ValueError(
                    f"solver {prefix}max_iter must be in [1, {MAX_ITER}], got {max_iter}"
                )

    @classmethod
    def from_dict(cls, d: dict | None) -> SolverSettings:
        """Settings from a checkpoint's or a config's ``"solver"`` dict (``None`` or
        missing keys: the defaults).

        Raises:
            ValueError: an unknown key, or a value the class refuses.
        """
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown solver settings {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        """Every field as plain data (``None`` for a ``backward_*`` that follows forward)."""
        return asdict(self)

    def replace(self, **changes) -> SolverSettings:
        """These settings with ``changes`` (field names); ``ValueError`` naming a bad one."""
        return self.from_dict({**self.to_dict(), **changes})

    @property
    def solver(self) -> type[SplittingMethod]:
        """The class of :attr:`method`, whose attributes say what it needs and allows."""
        return get_solver(self.method)

    def backward(self) -> SolverSettings:
        """The settings the backward pass uses."""
        method = self.backward_method or self.method
        alpha = self.backward_alpha
        if alpha is None and method == self.method:
            alpha = self.alpha
        return replace(
            self,
            method=method,
            alpha=alpha,
            tol=self.backward_tol if self.backward_tol is not None else self.tol,
            max_iter=self.backward_max_iter or self.max_iter,
        )


class EquilibriumLayer(nn.Module):
    """``x ↦ z*`` with ``z* = σ(W z* + U x + b)``.

    ``forward`` trains: the solve runs without autograd; the layer is then applied once
    more with autograd, ``ẑ = σ(W z* + U x + b)``, and the gradient reaching ``ẑ`` is
    replaced by the implicit one (Theorem 2), found by the backward solver. Memory is O(1)
    in the number of iterations.

    After each call, ``last_forward_stats`` and ``last_backward_stats`` hold the
    :class:`SolveStats` of the latest solves.
    """

    def __init__(self, op: MonotoneOperator, nonlin: Nonlinearity, settings: SolverSettings):
        super().__init__()
        self.op = op
        self.nonlin = nonlin
        self.settings = settings
        self.last_forward_stats: SolveStats | None = None
        self.last_backward_stats: SolveStats | None = None
        self._safe_alphas: dict[str, tuple[tuple, float]] = {}

    def resolve_alpha(self, method: str, alpha: float | None) -> float:
        """The α to use: explicit, else the settings' for their method, else the method's
        :meth:`~model_core.solvers.SplittingMethod.safe_alpha` for the current weights."""
        if alpha is not None:
            return float(alpha)
        if method == self.settings.method and self.settings.alpha is not None:
            return float(self.settings.alpha)
        solver = get_solver(method)
        if solver.default_alpha is not None:
            return solver.safe_alpha(self.op)
        # Derived from the weights (FB: a power iteration): once per weights.
        key = self.op._weights_key()
        held = self._safe_alphas.get(method)
        if held is None or held[0] != key:
            held = self._safe_alphas[method] = (key, solver.safe_alpha(self.op))
        return held[1]

    def solve(
        self,
        x: Tensor,
        *,
        method: str | None = None,
        alpha: float | None = None,
        tol: float | None = None,
        max_iter: int | None = None,
        between: Callable[[], None] | None = None,
        accept: Callable[[dict[str, Tensor]], Tensor] | None = None,
        check_every: int = 1,
        loop: str | None = None,
        sync_every: int = SYNC_EVERY,
        certify: Callable[[dict[str, Tensor]], Tensor] | None = None,
    ) -> tuple[Tensor, SolveStats, Tensor]:
        """Solve without autograd. ``x`` → ``(z, stats, pre)``: the returned point ``z``
        of ``(B, *z_shape)`` and ``pre = W z + U x + b`` there (free for every method).

        ``between``, ``accept``, ``check_every``, ``loop``, ``sync_every`` and ``certify``
        go to :func:`~model_core.solvers.solve_forward` (a scheduler's hook; another
        stopping rule; the loop, by default the device's; a second test of the rule), with
        the injection's rounding scale
        (:meth:`~model_core.operators.MonotoneOperator.injection_scale`): ``stats.pre_scale``
        is that of ``pre``."""
        method = method or self.settings.method
        with torch.no_grad():
            z, stats, pre = solve_forward(
                self.op,
                self.nonlin,
                self.op.bias(x),
                method=method,
                alpha=self.resolve_alpha(method, alpha),
                tol=self.settings.tol if tol is None else tol,
                max_iter=self.settings.max_iter if max_iter is None else max_iter,
                preactivation=True,
                between=between,
                accept=accept,
                check_every=check_every,
                loop=loop,
                sync_every=sync_every,
                bias_scale=self.op.injection_scale(x),
                certify=certify,
                image=x,
            )
        self.last_forward_stats = stats
        return z, stats, pre

    def forward(self, x: Tensor) -> Tensor:
        """``(B, ...)`` input → ``(B, *z_shape)`` equilibrium, differentiable implicitly."""
        if not torch.is_grad_enabled():
            return self.nonlin(self.solve(x)[2])  # ẑ = σ(W z + U x + b), as with autograd
        s = self.settings
        bias = self.op.bias(x)
        # A training step: its rounding terms may take the cheaper bound on ‖W‖ (the weights
        # change after the step, and the tight one would be paid at every step).
        with self.op.weights_in_training():
            z, stats, pre = solve_forward(
                self.op,
                self.nonlin,
                bias.detach(),
                method=s.method,
                alpha=self.resolve_alpha(s.method, s.alpha),
                tol=s.tol,
                max_iter=s.max_iter,
                preactivation=True,
                bias_scale=self.op.injection_scale(x.detach()),
                image=x.detach(),
            )
        # ẑ = σ(W z* + U x + b) with autograd; W z* is known from the solve.
        pre = self.op.multiply_known(z, pre - bias.detach()) + bias
        z_hat = self.nonlin(pre)
        self.last_forward_stats = stats
        if not z_hat.requires_grad:
            return z_hat
        return _ImplicitBackward.apply(z_hat, self, self.nonlin.derivative(pre.detach()))


class _ImplicitBackward(torch.autograd.Function):
    """Identity forward; backward maps ``g`` to ``g + Wᵀũ`` with ``ũ = J(g + Wᵀũ)`` (§3)."""

    @staticmethod
    def forward(ctx, z_hat: Tensor, layer: EquilibriumLayer, jac: Tensor) -> Tensor:
        ctx.layer = layer
        ctx.save_for_backward(jac)
        return z_hat.view_as(z_hat)  # a view, not a copy of the batch

    @staticmethod
    def backward(ctx, grad: Tensor):
        (jac,) = ctx.saved_tensors
        layer: EquilibriumLayer = ctx.layer
        s = layer.settings.backward()
        with layer.op.weights_in_training():  # as the forward (EquilibriumLayer.forward)
            out, stats = solve_backward(
                layer.op,
                jac,
                grad.contiguous(),
                method=s.method,
                alpha=layer.resolve_alpha(s.method, s.alpha),
                tol=s.tol,
                max_iter=s.max_iter,
            )
        layer.last_backward_stats = stats
        return out, None, None
