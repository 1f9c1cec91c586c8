"""Small problems with exact answers: dense matrices built independently of the FFT code.

Every operator's dense ``W`` here is assembled from direct (space-domain) circular
convolutions applied to basis vectors, so a mistake in the Fourier machinery cannot cancel
out of the comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model_core.operators import FCOperator, MultiTierOperator


def dense_of(fn, n_in: int, in_shape: tuple, dtype=torch.float64) -> Tensor:
    """Matrix of a linear map ``fn`` from ``(B, *in_shape)`` to ``(B, ...)``: column j = fn(e_j)."""
    eye = torch.eye(n_in, dtype=dtype).reshape(n_in, *in_shape)
    return fn(eye).reshape(n_in, -1).T


def circ_conv(x: Tensor, w: Tensor, stride: int = 1) -> Tensor:
    p = w.shape[-1] // 2
    return F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), w, stride=stride)


def dense_w_fc(op: FCOperator) -> Tensor:
    a, b = op.A.weight, op.B.weight
    n = a.shape[0]
    return (1 - op.m) * torch.eye(n, dtype=a.dtype) - a.T @ a + b - b.T


def dense_w_multitier(op: MultiTierOperator) -> Tensor:
    """``W = (1 − m) I − L + B − Bᵀ`` (docs/math.md §5) from space-domain convolutions."""
    a_w, b_w, s_w = op.weights()
    ch, sz = op.channels, op.sizes
    mats_a = [
        dense_of(lambda x, w=w: circ_conv(x, w), c * s * s, (c, s, s))
        for w, c, s in zip(a_w, ch, sz, strict=True)
    ]
    mats_b = [
        dense_of(lambda x, w=w: circ_conv(x, w), c * s * s, (c, s, s))
        for w, c, s in zip(b_w, ch, sz, strict=True)
    ]
    mats_s = [
        dense_of(
            lambda x, w=w: circ_conv(x, w, stride=2), ch[i] * sz[i] ** 2, (ch[i], sz[i], sz[i])
        )
        for i, w in enumerate(s_w)
    ]
    mats_p = [
        dense_of(
            lambda x: F.pad(x, (0, 1, 0, 1)),
            ch[i + 1] * (sz[i] // 2) ** 2,
            (ch[i + 1], sz[i] // 2, sz[i] // 2),
        )
        for i in range(len(ch) - 1)
    ]
    sizes = [c * s * s for c, s in zip(ch, sz, strict=True)]
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    L = torch.zeros(total, total, dtype=torch.float64)
    Bm = torch.zeros(total, total, dtype=torch.float64)
    for i in range(len(ch)):
        sl = slice(offs[i], offs[i] + sizes[i])
        L[sl, sl] = mats_a[i].T @ mats_a[i]
        if i < len(ch) - 1:
            L[sl, sl] += mats_s[i].T @ mats_s[i]
            nxt = slice(offs[i + 1], offs[i + 1] + sizes[i + 1])
            L[nxt, sl] = 2 * mats_a[i + 1].T @ mats_p[i] @ mats_s[i]
        Bm[sl, sl] = mats_b[i]
    return (1 - op.m) * torch.eye(total, dtype=torch.float64) - L + Bm - Bm.T


def randomize_(op: MultiTierOperator, seed: int = 0) -> MultiTierOperator:
    """Non-trivial scales, so that g, gn, h all matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        op.log_g.copy_(torch.randn(op.log_g.shape, generator=gen))
        op.h.copy_(torch.randn(op.h.shape, generator=gen))
        if op.log_gn is not None:
            op.log_gn.copy_(torch.randn(op.log_gn.shape, generator=gen))
    return op


def reference_state_dict(seed: int = 0, hidden: int = 9, features: int = 36) -> dict:
    """A state dict in the reference code's layout (SingleFcNet / MONSingleFc)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "mon.linear_module.U.weight": torch.randn(hidden, features, generator=g) * 0.3,
        "mon.linear_module.U.bias": torch.randn(hidden, generator=g) * 0.1,
        "mon.linear_module.A.weight": torch.randn(hidden, hidden, generator=g) * 0.3,
        "mon.linear_module.B.weight": torch.randn(hidden, hidden, generator=g) * 0.3,
        "Wout.weight": torch.randn(10, hidden, generator=g),
        "Wout.bias": torch.randn(10, generator=g),
    }
