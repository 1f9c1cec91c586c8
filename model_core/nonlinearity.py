"""The nonlinearity σ, as a proximal operator (docs/math.md §1; paper, Appendix C.2).

Both are prox operators of indicators of convex sets, so the splitting methods apply:

* :class:`ReLU`: the prox of the indicator of ``{z ≥ 0}``.
* :class:`BorderReLU`: the prox of the indicator of ``{z ≥ 0, z = 0 on a one-pixel border}``.
  Padded convolutional models use it so that circular convolutions never wrap real pixels
  around the image edge.

Their derivatives ``J = σ'(v)`` are 0/1 masks, which the backward solvers rely on.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Nonlinearity(nn.Module):
    """σ: a proximal operator applied elementwise to ``(B, *z_shape)`` tensors."""

    def forward(self, v: Tensor) -> Tensor:
        """``σ(v)``, shaped like ``v``: the prox of ``f`` (§1), so ``σ(v) = argmin_z f(z) +
        ½‖z − v‖²``; differentiable when ``v`` requires grad."""
        raise NotImplementedError

    def derivative(self, v: Tensor) -> Tensor:
        """``J = σ'(v)`` as a 0/1 tensor shaped like ``v``."""
        raise NotImplementedError


class ReLU(Nonlinearity):
    """``σ(v) = max(v, 0)``."""

    def forward(self, v: Tensor) -> Tensor:
        return torch.relu(v)

    def derivative(self, v: Tensor) -> Tensor:
        return (v > 0).to(v.dtype)


class BorderReLU(Nonlinearity):
    """``σ(v) = max(v, 0)`` inside, 0 on the masked-out border.

    Args:
        mask: 0/1 tensor of shape ``z_shape`` (or broadcastable to it), 0 on the border.
    """

    def __init__(self, mask: Tensor):
        super().__init__()
        # Buffers, so they follow .to(device) but are rebuilt from the config, not stored.
        self.register_buffer("mask", mask, persistent=False)
        # σ as one clamp to [0, cap], cap = +inf inside and 0 on the border: a single pass
        # over v where mask-multiply-then-clamp takes two (the solver applies σ every step).
        cap = torch.where(mask > 0, torch.tensor(float("inf")), torch.tensor(0.0))
        self.register_buffer("cap", cap, persistent=False)
        self.register_buffer("floor", torch.zeros_like(mask), persistent=False)

    def forward(self, v: Tensor) -> Tensor:
        if v.requires_grad:  # the autograd application keeps the plain form and its gradient
            return torch.mul(v, self.mask.to(v.dtype)).clamp_min_(0.0)
        return torch.clamp(v, min=self.floor.to(v.dtype), max=self.cap.to(v.dtype))

    def derivative(self, v: Tensor) -> Tensor:
        return (v > 0).to(v.dtype) * self.mask.to(v.dtype)


def border_mask(size: int, width: int = 1) -> Tensor:
    """``(size, size)`` float mask, 1 inside and 0 on a border ``width`` pixels wide."""
    mask = torch.zeros(size, size)
    mask[width : size - width, width : size - width] = 1.0
    return mask
