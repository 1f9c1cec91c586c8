"""Fourier-domain machinery for circular convolutions on square grids (docs/math.md §4, §5).

Conventions, fixed here once:

* Every FFT is ``norm="ortho"``, so the DFT is unitary and the adjoint of an operator is the
  conjugate transpose of its per-frequency blocks.
* Spectra are kept in *half layout* ``(F, n, B)``: the ``F = s·(s//2 + 1)`` frequencies of
  ``rfft2`` first, then channels, then the batch. Batched matmuls with per-frequency
  ``(F, n_out, n_in)`` blocks apply an operator to the whole batch at once.
* A kernel's *transfer function* is the per-frequency matrix of the circular
  cross-correlation ``y[p] = Σ_d w[d] x[p + d − k//2]`` (PyTorch's ``conv2d`` with circular
  padding). Conv theorem: ``ŷ(K) = ĥ(K) x̂(K)``, ``ĥ(K) = conj(DFT(w placed at d − k//2))``.

A stride-2 circular convolution on an ``s`` grid (``s`` even, ``r = s/2``) folds the four
*aliases* ``K + (a·r, b·r)``, ``a, b ∈ {0, 1}``, of each ``r``-grid frequency ``k'`` into one
(§5): ``(S x)^(k') = ½ Σ_a ĉ(K_a) x̂(K_a)``. :class:`AliasGroups` gathers half-layout
spectra into *group layout* ``(F', 4n, B)``, one row per ``r``-grid half frequency, so that
``S`` and everything that couples aliases is again a batched matmul.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def transfer(weight: Tensor, s: int) -> Tensor:
    """Per-frequency matrices of a circular cross-correlation on an ``s × s`` grid.

    Args:
        weight: ``(n_out, n_in, k, k)`` kernel, ``k`` odd and ``≤ s``.
        s: grid size.

    Returns:
        ``(F, n_out, n_in)`` complex, ``F = s·(s//2 + 1)`` (``rfft2`` half layout; §4).

    Raises:
        ValueError: ``k > s``.
    """
    n_out, n_in, k, _ = weight.shape
    if k > s:
        raise ValueError(f"kernel size {k} exceeds grid size {s}")
    # ĥ(K) = Σ_d w[d] e^{2πi K·(d − k//2)/s}: a GEMM with the k² phases, an order of
    # magnitude cheaper than an FFT of the zero-padded kernel (and of its backward).
    phases = _transfer_phases(k, s, weight.dtype, weight.device)
    cweight = weight.reshape(n_out * n_in, k * k).to(phases.dtype)
    # (F, n_out·n_in), contiguous as bmm wants its operands (on a permuted view it, and its
    # backward, copy matrix by matrix: 1,440 small copies a step of the 32-channel conv
    # model): the GEMM writes the frequency-major layout itself, where a product in the
    # kernel's layout needed a permuting copy of the whole block set (32 MB for 81
    # channels, forward and backward) after it.
    spec = phases.mT @ cweight.mT
    return spec.view(-1, n_out, n_in)


_PHASE_CACHE: dict[tuple, Tensor] = {}


def _transfer_phases(k: int, s: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``E[d, K] = e^{2πi K·(d − k//2)/s}``, ``(k², F)`` complex, cached per grid and dtype."""
    key = (k, s, dtype, device)
    hit = _PHASE_CACHE.get(key)
    if hit is None:
        offset = torch.arange(k, dtype=torch.float64) - k // 2
        rows = torch.arange(s, dtype=torch.float64)
        cols = torch.arange(s // 2 + 1, dtype=torch.float64)
        row_phase = torch.outer(offset, rows)  # (k, s): d1 · k1
        col_phase = torch.outer(offset, cols)  # (k, L): d2 · l
        angle = row_phase[:, None, :, None] + col_phase[None, :, None, :]  # (k, k, s, L)
        angle = (2 * math.pi / s) * angle.reshape(k * k, -1)
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        hit = torch.polar(torch.ones_like(angle), angle).to(device=device, dtype=cdtype)
        _PHASE_CACHE[key] = hit
    return hit


# On the CPU the grids are small (≤ 34) and awkward for FFTs (34 = 2·17): dense DFT matrices
# applied with GEMMs run 1.3–2.6× faster than rfft2/irfft2 here, and they emit the
# frequency-major layout directly. CUDA keeps cuFFT.
USE_DFT_MATMUL_ON_CPU = True
PAD_ALIASED_ROWS = True  # see to_spectrum and from_spectrum
_DFT_CACHE: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _mirror_weights(s: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(s//2 + 1, 1)``: 2 for the half-spectrum columns that stand for themselves and their
    mirror, 1 for those that are their own mirror (``l = 0``, and ``l = s/2`` for even ``s``)."""
    weight = torch.full((s // 2 + 1, 1), 2.0, dtype=dtype, device=device)
    weight[0] = 1.0
    if s % 2 == 0:
        weight[-1] = 1.0
    return weight


def _pad_aliased(t: Tensor, stride_bytes: int) -> bool:
    """Whether a transform's transpose, reading ``t``'s values ``stride_bytes`` apart, should
    go through a buffer one cache line wider: a multiple of 4 KiB puts every read in one
    cache set. Not under autograd (the padded path writes with ``out=``)."""
    return (
        PAD_ALIASED_ROWS
        and stride_bytes % 4096 == 0
        and not (t.requires_grad and torch.is_grad_enabled())
    )


def _dft_matrices(s: int, dtype: torch.dtype, device: torch.device):
    """Unitary real-to-half DFT factors for an ``s`` grid, cached per (s, dtype, device).

    Returns ``(dw, dw_inv, dh, dh_inv)``: ``dw`` ``(s, 2L)`` maps a real row to its ``L =
    s//2 + 1`` half-spectrum coefficients as interleaved (re, im); ``dh`` ``(s, s)`` is the
    complex DFT along the other axis; the ``_inv`` ones undo them (``dw_inv`` applies the
    Hermitian extension, doubling the bins that stand for two, as ``irfft`` does).
    """
    key = (s, dtype, device)
    hit = _DFT_CACHE.get(key)
    if hit is not None:
        return hit
    n_half = s // 2 + 1
    pos = torch.arange(s, dtype=torch.float64)
    theta = 2 * math.pi * torch.outer(pos, torch.arange(n_half, dtype=torch.float64)) / s
    root = math.sqrt(s)
    dw = torch.stack([torch.cos(theta), -torch.sin(theta)], dim=-1).reshape(s, 2 * n_half) / root
    weight = _mirror_weights(s, torch.float64, torch.device("cpu"))
    dw_inv = (
        torch.stack([weight * torch.cos(theta.T), -weight * torch.sin(theta.T)], dim=1).reshape(
            2 * n_half, s
        )
        / root
    )
    phase = 2 * math.pi * torch.outer(pos, pos) / s
    ones = torch.ones_like(phase)
    dh, dh_inv = torch.polar(ones, -phase) / root, torch.polar(ones, phase) / root
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    hit = (
        dw.to(device=device, dtype=dtype),
        dw_inv.to(device=device, dtype=dtype),
        dh.to(device=device, dtype=cdtype),
        dh_inv.to(device=device, dtype=cdtype),
    )
    _DFT_CACHE[key] = hit
    return hit


def to_spectrum(x: Tensor, rows: int | None = None) -> Tensor:
    """``(B, n, s, s)`` real → ``(F, n, B)`` complex half layout (unitary ``rfft2``).

    With ``rows`` (CPU only), ``rows`` samples at a time are transformed into the one
    ``(F, n, B)`` result: each piece's transposes stay in cache while the per-frequency
    products that follow read the blocks once for the whole batch (see
    :attr:`~model_core.operators.conv.MultiTierOperator.chunk_scale`). Every column takes
    the same arithmetic as in one transform of the batch; a GEMM's row tail may round its
    last bits differently (float64 pieces of 1 of 7 samples: 4e-16). The 81-channel CIFAR
    logits in pieces of 8 were equal to the last bit.
    """
    b, n, s, _ = x.shape
    if rows is not None and b > rows and x.device.type == "cpu":
        cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        out = x.new_empty((s * (s // 2 + 1), n, b), dtype=cdtype)
        for i in range(0, b, rows):
            out[:, :, i : i + rows] = to_spectrum(x[i : i + rows])
        return out
    if x.device.type == "cpu" and USE_DFT_MATMUL_ON_CPU:
        dw, _, dh, _ = _dft_matrices(s, x.dtype, x.device)
        per = n * s * dw.shape[1]  # reals per sample after the transform along the last axis
        if b > 1 and _pad_aliased(x, per * x.element_size()):
            # The transpose below gathers one value from each sample in turn. Samples a
            # multiple of 4 KiB apart fall into one cache set and evict each other (the
            # 32-channel 30-grid conv: 1.1 ms → 0.4 ms per 43 samples with one cache line of
            # padding, a training step −5%), so each sample starts one line further on.
            buf = x.new_empty(b, per + 64 // x.element_size())
            rows = buf[:, :per].view(b, n * s, -1)
            torch.bmm(x.reshape(b, n * s, s), dw.expand(b, s, -1), out=rows)
        elif b > 1 and not x.is_contiguous() and x[0].is_contiguous():
            # A tier's slice of the multi-tier iterate: one GEMM per sample reads it in
            # place, where the flat GEMM below would copy it first (the 16- and 32-channel
            # tiers at batch 64: 2.4× faster than copy and GEMM).
            rows = torch.bmm(x.reshape(b, n * s, s), dw.expand(b, s, -1))
        else:
            rows = x.reshape(-1, s) @ dw  # along the last axis
        rows = torch.view_as_complex(rows.view(b, n, s, s // 2 + 1, 2))
        rows = rows.permute(2, 3, 1, 0).reshape(s, -1)
        return (dh @ rows).view(-1, n, b)  # along the first axis, frequency-major
    # One explicit transpose copy: bmm on the strided view would copy matrix by matrix.
    return torch.fft.rfft2(x, norm="ortho").reshape(b, n, -1).permute(2, 1, 0).contiguous()


def from_spectrum(spec: Tensor, s: int, rows: int | None = None) -> Tensor:
    """``(F, n, B)`` half layout → ``(B, n, s, s)`` real (unitary ``irfft2``).

    With ``rows`` (CPU only), ``rows`` samples at a time, as in :func:`to_spectrum`."""
    _, n, b = spec.shape
    if rows is not None and b > rows and spec.device.type == "cpu":
        out = spec.new_empty((b, n, s, s), dtype=spec.real.dtype)
        for i in range(0, b, rows):
            # A piece of the sample axis is strided; its transforms need it contiguous
            # (the padded row transform views it as (s, n_half, n·rows)).
            out[i : i + rows] = from_spectrum(spec[:, :, i : i + rows].contiguous(), s)
        return out
    n_half = s // 2 + 1
    if spec.device.type == "cpu" and USE_DFT_MATMUL_ON_CPU:
        real = spec.real.dtype
        _, dw_inv, _, dh_inv = _dft_matrices(s, real, spec.device)
        nb = n * b
        if n_half > 1 and _pad_aliased(spec, nb * spec.element_size()):
            # The transpose below reads along the column frequency, ``n·B`` values apart; at
            # a multiple of 4 KiB (16 channels at batch 64) those reads share one cache set.
            # The transform along the rows runs per column frequency into a buffer one cache
            # line wider (batch 64: 4.1 → 3.6 ms on the 34 grid, 1.9 → 1.4 ms on the 18).
            pad = 64 // spec.element_size()
            buf = spec.new_empty(s, n_half, nb + pad)
            torch.bmm(
                dh_inv.expand(n_half, -1, -1),
                spec.view(s, n_half, nb).transpose(0, 1),
                out=buf[:, :, :nb].transpose(0, 1),
            )
            cols = buf[:, :, :nb]
        else:
            cols = dh_inv @ spec.reshape(s, -1)
        cols = cols.view(s, n_half, n, b).permute(3, 2, 0, 1)
        cols = torch.view_as_real(cols.contiguous()).reshape(-1, 2 * n_half)
        return (cols @ dw_inv).view(b, n, s, s)
    half = spec.permute(2, 1, 0).contiguous().view(b, n, s, n_half)  # c2r is slow on views
    return torch.fft.irfft2(half, s=(s, s), norm="ortho")


def from_spectrum_adjoint(x: Tensor, rows: int | None = None) -> Tensor:
    """The adjoint of :func:`from_spectrum` for the real inner product ``Re Σ conj(a)·b``.

    ``Σ x · from_spectrum(Y) = Re Σ conj(from_spectrum_adjoint(x)) · Y`` for every half
    spectrum ``Y``. A half-layout bin stands for itself and its mirror, except in the
    columns ``l = 0`` and ``l = s/2`` (``s`` even) that are their own mirrors, so this is
    :func:`to_spectrum` with the other columns counted twice.

    Args:
        x: ``(B, n, s, s)`` real.
        rows: transform ``rows`` samples at a time (:func:`to_spectrum`).

    Returns:
        ``(F, n, B)`` complex half layout.
    """
    s = x.shape[-1]
    spec = to_spectrum(x, rows)
    twice = _mirror_weights(s, x.dtype, x.device)
    return spec.view(s, s // 2 + 1, -1).mul_(twice).view(spec.shape)


_LIFT_CACHE: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _lift_factors(r: int, dtype: torch.dtype, device: torch.device):
    """Factors of :func:`lift_spectrum` for an ``r`` grid, cached per (r, complex dtype, device).

    With unitary DFTs, padding maps the full spectrum ``Y`` to ``R Y Rᵀ``, ``R = F_(r+1) P
    F_r⁻¹`` (``(r+1) × r``). On half spectra the columns ``Y`` lacks are mirrors,
    ``Y[k, l] = conj Y[−k, r − l]``, so ``Z = R (Y Pc) + R Φ (conj(Y) Qc)``: ``Pc`` takes the
    stored columns, ``Qc`` the mirrored ones, ``Φ`` reflects rows. Returns ``(R, RΦ,
    Pcᵀ, Qcᵀ)`` (the last two ``(hr', hr)``, ``hr = r//2 + 1``, ``hr' = (r+1)//2 + 1``).
    """
    key = (r, dtype, device)
    hit = _LIFT_CACHE.get(key)
    if hit is not None:
        return hit
    s, hr, hs = r + 1, r // 2 + 1, (r + 1) // 2 + 1
    j = torch.arange(r, dtype=torch.float64)
    out_k = torch.arange(s, dtype=torch.float64)
    # R[k', k] = Σ_j e^{-2πi k' j/s} e^{2πi j k/r} / √(s r): the pad keeps rows j < r.
    fwd = torch.polar(
        torch.ones(s, r, dtype=torch.float64), -2 * math.pi * torch.outer(out_k, j) / s
    )
    inv = torch.polar(torch.ones(r, r, dtype=torch.float64), 2 * math.pi * torch.outer(j, j) / r)
    lift = fwd @ inv / math.sqrt(s * r)  # (s, r)
    mirror = lift[:, (-torch.arange(r)) % r]  # R Φ
    keep = lift[:hs, :hr]  # Pcᵀ[l', l] = R[l', l]
    flip = torch.zeros(hs, hr, dtype=lift.dtype)  # Qcᵀ[l', m] = R[l', r − m], m = 1..r − hr
    for m in range(1, r - hr + 1):
        flip[:, m] = lift[:hs, r - m]
    hit = tuple(t.to(device=device, dtype=dtype).contiguous() for t in (lift, mirror, keep, flip))
    _LIFT_CACHE[key] = hit
    return hit


def lift_spectrum(y: Tensor, r: int) -> Tensor:
    """``P``, the zero row and column appended to an ``r`` grid, on half spectra (§5).

    Equals ``to_spectrum(F.pad(from_spectrum(y, r), (0, 1, 0, 1)))`` without leaving the
    frequency domain: two small batched GEMMs along the column frequency and two GEMMs
    along the row frequency, no transposes.

    Args:
        y: ``(F_r, n, B)`` half layout of the ``r`` grid, ``F_r = r·(r//2 + 1)``.
        r: the grid size.

    Returns:
        ``(F_(r+1), n, B)`` half layout of the ``(r+1)`` grid.
    """
    _, n, b = y.shape
    lift, mirror, keep, flip = _lift_factors(r, y.dtype, y.device)
    hr, hs = r // 2 + 1, keep.shape[0]
    rows = y.reshape(r, hr, n * b)
    kept = torch.matmul(keep, rows).view(r, -1)  # along the column frequency
    flipped = torch.matmul(flip, rows.conj()).view(r, -1)
    out = (lift @ kept).addmm_(mirror, flipped)  # along the row frequency
    return out.view((r + 1) * hs, n, b)


_CROP_CACHE: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _crop_factors(r: int, dtype: torch.dtype, device: torch.device):
    """Factors of :func:`crop_spectrum` for an ``r`` grid, cached per (r, complex dtype, device).

    The crop ``Pᵀ`` is the adjoint of :func:`lift_spectrum`'s ``P``: on full spectra ``Y =
    Rᴴ Z R̄`` (``R`` of :func:`_lift_factors`). On half spectra the columns ``l' ≥ hs`` of
    ``Z`` are mirrors, ``Z[k', l'] = conj Z[−k', s − l']``, so ``Y = Rᴴ (Z Kc) + Rᴴ Φ (conj(Z)
    Fc)`` with ``Kc[l', l] = conj R[l', l]`` on the stored columns, ``Fc[m, l] = conj R[s − m,
    l]`` on the mirrored ones and ``Φ`` the row reflection. Returns ``(Rᴴ, RᴴΦ, Kcᵀ, Fcᵀ)``
    (the last two ``(hr, hs)``, ``hr = r//2 + 1``, ``hs = (r+1)//2 + 1``).
    """
    key = (r, dtype, device)
    hit = _CROP_CACHE.get(key)
    if hit is not None:
        return hit
    s, hr, hs = r + 1, r // 2 + 1, (r + 1) // 2 + 1
    lift = _lift_factors(r, torch.complex128, torch.device("cpu"))[0]  # R, (s, r)
    crop = lift.mH  # Rᴴ, (r, s)
    mirror = crop[:, (-torch.arange(s)) % s]  # Rᴴ Φ
    keep = lift[:hs, :hr].conj().T  # Kcᵀ[l, l'] = conj R[l', l]
    flip = torch.zeros(hr, hs, dtype=lift.dtype)  # Fcᵀ[l, m] = conj R[s − m, l], m = 1..s − hs
    for m in range(1, s - hs + 1):
        flip[:, m] = lift[s - m, :hr].conj()
    hit = tuple(t.to(device=device, dtype=dtype).contiguous() for t in (crop, mirror, keep, flip))
    _CROP_CACHE[key] = hit
    return hit


def crop_spectrum(x: Tensor, r: int) -> Tensor:
    """``Pᵀ``, the last row and column of an ``(r+1)`` grid dropped, on half spectra (§5).

    Equals ``to_spectrum(from_spectrum(x, r + 1)[..., :r, :r])`` for the half spectrum ``x``
    of a real signal, without leaving the frequency domain: the adjoint of
    :func:`lift_spectrum`, two small batched GEMMs along the column frequency and two
    GEMMs along the row frequency.

    Args:
        x: ``(F_(r+1), n, B)`` half layout of the ``(r+1)`` grid.
        r: the smaller grid's size.

    Returns:
        ``(F_r, n, B)`` half layout of the ``r`` grid.
    """
    _, n, b = x.shape
    crop, mirror, keep, flip = _crop_factors(r, x.dtype, x.device)
    hs = keep.shape[1]
    rows = x.reshape(r + 1, hs, n * b)
    kept = torch.matmul(keep, rows).view(r + 1, -1)  # along the column frequency
    flipped = torch.matmul(flip, rows.conj()).view(r + 1, -1)
    out = (crop @ kept).addmm_(mirror, flipped)  # along the row frequency
    return out.view(r * keep.shape[0], n, b)


def _gather_conj(x: Tensor, index: Tensor, conj: Tensor, sign: Tensor) -> Tensor:
    """``x[index]`` along dim 0, conjugated on the rows where ``conj`` (``sign`` = ∓1 there).

    Without autograd the gathered copy is fixed in place (one pass over its imaginary
    parts); with autograd, an out-of-place ``where``.
    """
    y = x.index_select(0, index)
    if y.requires_grad:
        return torch.where(conj.view(-1, *([1] * (x.dim() - 1))), y.conj(), y)
    torch.view_as_real(y).select(-1, 1).mul_(sign.view(-1, *([1] * (x.dim() - 1))))
    return y


def block_diag4(blocks: Tensor) -> Tensor:
    """``(G, 4, n, c)`` → ``(G, 4n, 4c)`` block diagonal."""
    g, four, n, c = blocks.shape
    out = blocks.new_zeros(g, four, n, four, c)
    for a in range(four):
        out[:, a, :, a, :] = blocks[:, a]
    return out.reshape(g, four * n, four * c)


class AliasGroups:
    """Index maps between an even ``s`` grid's half layout and its alias-group layout.

    Group ``g`` is the ``r``-grid half frequency ``k' = (k1, l1)``, ``r = s/2``; slot ``a``
    holds the ``s``-grid frequency ``(k1 + a1·r, l1 + b1·r)``, ``a = 2·a1 + b1``. Where that
    frequency lies outside the ``rfft2`` half plane we read its mirror and conjugate
    (real signals: ``X(−K) = conj X(K)``).

    Attributes:
        s, r: the two grid sizes.
        groups: ``F' = r·(r//2 + 1)``, the number of groups.
    """

    def __init__(self, s: int, device: torch.device | None = None):
        if s % 2:
            raise ValueError(f"a stride-2 tier needs an even grid, got {s}")
        r = s // 2
        hr = r // 2 + 1
        self.s, self.r, self.groups = s, r, r * hr

        # group layout -> half layout of the s grid
        k1 = torch.arange(r).view(r, 1, 1)
        l1 = torch.arange(hr).view(1, hr, 1)
        a1 = torch.tensor([0, 0, 1, 1]).view(1, 1, 4)
        b1 = torch.tensor([0, 1, 0, 1]).view(1, 1, 4)
        kk, ll = torch.broadcast_tensors(k1 + a1 * r, l1 + b1 * r)  # (r, hr, 4)
        conj = ll > r
        kk = torch.where(conj, (-kk) % s, kk)
        ll = torch.where(conj, s - ll, ll)
        self.gather_index = (kk * (r + 1) + ll).reshape(-1).to(device)
        self.gather_conj = conj.reshape(-1).to(device)
        self.gather_sign = 1.0 - 2.0 * self.gather_conj.float()

        # half layout of the s grid -> group layout
        k = torch.arange(s).view(s, 1)
        col = torch.arange(r + 1).view(1, r + 1)
        direct = (col % r) < hr
        k_m, l_m = (-k) % s, (s - col) % s
        kk = torch.where(direct, k, k_m)
        ll = torch.where(direct, col, l_m)
        slot = (kk // r) * 2 + (ll // r)
        group = (kk % r) * hr + (ll % r)
        self.scatter_index = (group * 4 + slot).reshape(-1).to(device)
        self.scatter_conj = (~direct).expand(s, r + 1).reshape(-1).to(device)
        self.scatter_sign = 1.0 - 2.0 * self.scatter_conj.float()

    def group(self, x: Tensor) -> Tensor:
        """Half layout ``(F, ...)`` → ``(F', 4, ...)`` alias groups."""
        y = _gather_conj(x, self.gather_index, self.gather_conj, self.gather_sign)
        return y.view(self.groups, 4, *x.shape[1:])

    def ungroup(self, y: Tensor) -> Tensor:
        """``(F', 4, ...)`` alias groups → half layout ``(F, ...)``."""
        flat = y.reshape(self.groups * 4, *y.shape[2:])
        return _gather_conj(flat, self.scatter_index, self.scatter_conj, self.scatter_sign)
