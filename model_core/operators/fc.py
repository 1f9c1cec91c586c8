"""Fully connected monotone operator (docs/math.md §1; paper §3, Proposition 1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import MonotoneOperator, spectral_norm_above

# Widest hidden layer whose weight_norm is exact inside a training step too: two float64
# SVDs of 256 × 256 take about 20 ms on 2 cores (1024: about 0.8 s), and their O(n³)
# outgrows a step's O(n²) products above it.
EXACT_NORM_MAX = 256


class FCOperator(MonotoneOperator):
    """Dense ``W = (1 − m) I − AᵀA + B − Bᵀ`` with injection ``U x + b``.

    Parameter names follow the paper's reference code (``U``, ``A``, ``B`` as
    ``nn.Linear``), so its state dicts map one to one.

    Args:
        in_features: input dimension ``D`` (inputs are flattened).
        hidden: hidden width ``n``; ``z_shape = (n,)``.
        m: monotonicity parameter.
    """

    weight_caches = ("_k_cache",)

    def __init__(self, in_features: int, hidden: int, m: float = 1.0):
        super().__init__(m)
        self.U = nn.Linear(in_features, hidden)
        self.A = nn.Linear(hidden, hidden, bias=False)
        self.B = nn.Linear(hidden, hidden, bias=False)
        self.z_shape = (hidden,)
        self._k_cache: dict[tuple, Tensor] = {}

    def bias(self, x: Tensor) -> Tensor:
        """``U x + b``: ``(B, C, H, W)`` (or ``(B, D)``) input, flattened, to ``(B, n)``."""
        return self.U(x.flatten(1))

    def injection_scale(self, x: Tensor) -> Tensor:
        """``(B,)`` ``‖|U||x| + |b|‖`` (the base class): one more product, with ``|U|``."""
        with torch.no_grad():
            u = self.U
            scale = nn.functional.linear(x.flatten(1).abs(), u.weight.abs(), u.bias.abs())
            return torch.linalg.vector_norm(scale, dim=1)

    def k_matrix(self) -> Tensor:
        """``I − W = m I + AᵀA − B + Bᵀ``, ``(n, n)``."""
        a, b = self.A.weight, self.B.weight
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return self.m * eye + a.T @ a - b + b.T

    def _k(self, z: Tensor, transpose: bool) -> Tensor:
        # Rows are samples: (K z)ᵀ = zᵀ Kᵀ.
        k = self._k_matrix_cached()
        return z @ (k if transpose else k.T)

    def _k_matrix_cached(self) -> Tensor:
        """:meth:`k_matrix`, kept per weights when autograd is off: forward–backward, the
        error bound's ``W r`` and every label check multiply by ``W`` (a single-image
        fmnist-fc ``infer`` spent 44 of its ~2,000 µs rebuilding it)."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self.k_matrix()
        key = self._weights_key()
        hit = self._k_cache.get(key)
        if hit is None:
            with torch.no_grad():
                hit = self.k_matrix()
            self._k_cache.clear()  # one set of weights at a time: older ones are dead
            self._k_cache[key] = hit
        return hit

    def _prepare(self, alpha: float) -> Tensor:
        k = self.k_matrix()
        eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
        return torch.linalg.inv(eye + alpha * k)

    def _apply_inverse(self, data: Tensor, z: Tensor, transpose: bool) -> Tensor:
        return z @ (data if transpose else data.T)

    def _injection_norm(self) -> float:
        return spectral_norm_above(self.U.weight)

    def _weight_norm(self, tight: bool) -> float:
        """Exact (to float64's rounding, then raised past it): both ``n × n`` matrices formed
        in float64, where the products of float32 weights are exact, and their SVDs. Inside
        a training step with ``n`` above :data:`EXACT_NORM_MAX` (an SVD a step would cost
        more than the step), ``max(m, |1 − m|) + ‖A‖² + 2‖B‖`` with each ``‖X‖₂ ≤
        √(‖X‖₁ ‖X‖_∞)``: ``O(n²)``, looser."""
        a, b = self.A.weight.detach().double(), self.B.weight.detach().double()
        n = a.shape[0]
        if not tight and n > EXACT_NORM_MAX:

            def above(x: Tensor) -> float:
                one = x.abs().sum(dim=0).max() * x.abs().sum(dim=1).max()
                return one.sqrt().item() * (1.0 + 1e-12)

            return max(self.m, abs(1.0 - self.m)) + above(a) ** 2 + 2.0 * above(b)
        eye = torch.eye(n, dtype=a.dtype, device=a.device)
        k = self.m * eye + a.T @ a - b + b.T  # I − W
        return max(spectral_norm_above(k), spectral_norm_above(eye - k))
