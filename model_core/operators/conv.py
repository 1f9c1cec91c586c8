"""Convolutional monotone operators: single circular conv and multi-tier (docs/math.md §4, §5).

One class covers both: a single-conv model is the one-tier case. Tier ``i`` holds ``n_i``
channels on an ``s_i × s_i`` grid. The image is zero-padded by one pixel, so
``s_1 = image + 2``, and ``s_(i+1) = s_i/2 + 1`` (stride-2 conv, then the embedding ``P``
that appends a zero row and column).

Parameters, in the paper's weight-norm form (§1) with the scale on ``AᵀA`` kept
non-negative by storing its logarithm:

* ``A_i = √g_i · A0_i/‖A0_i‖_F``  (``n_i → n_i``, 3×3), ``g_i = exp(log_g[i])``
* ``S_i = √gn_i · S0_i/‖S0_i‖_F`` (``n_i → n_(i+1)``, 3×3, stride 2)
* ``B_i = h_i · B0_i/‖B0_i‖_F``    (``n_i → n_i``, 3×3)
* ``U``: ``in_channels → n_1``, 3×3 with bias, on the padded image.

``W = (1 − m) I − L + B − Bᵀ`` where ``L`` is block lower triangular with diagonal blocks
``A_iᵀA_i + S_iᵀS_i`` and sub-diagonal blocks ``2 A_(i+1)ᵀ P S_i`` (§5): its symmetric part
is ``AᵀA ⪰ 0``, so ``I − W ⪰ m I``. ``I + α(I − W)`` is block lower triangular; its inverse
runs tier by tier (forward substitution), each diagonal block inverted per alias group
with the Woodbury identity, the middle inverse an ``n_(i+1) × n_(i+1)`` matrix per
low-resolution frequency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nonlinearity import border_mask
from . import base
from .base import MonotoneOperator, chunk_rows, spectral_norm_above, spectral_norms_above
from .spectral import (
    AliasGroups,
    block_diag4,
    crop_spectrum,
    from_spectrum,
    from_spectrum_adjoint,
    lift_spectrum,
    to_spectrum,
    transfer,
)


def tier_sizes(image_size: int, tiers: int) -> list[int]:
    """Grid sizes ``s_i`` in pixels: ``s_1 = image + 2``, ``s_(i+1) = s_i/2 + 1`` (§5).

    Raises:
        ValueError: a tier grid ``s_i`` is odd, so the stride-2 tier after it cannot exist.
    """
    sizes = [image_size + 2]
    for _ in range(tiers - 1):
        if sizes[-1] % 2:
            raise ValueError(
                f"tier grid {sizes[-1]} is odd, so a stride-2 tier cannot follow it; "
                f"image size {image_size} supports fewer tiers"
            )
        sizes.append(sizes[-1] // 2 + 1)
    return sizes


@dataclass
class _TierSpectra:
    """Per-frequency blocks of one tier. Each is contiguous (bmm copies an operand whose
    matrices are not, matrix by matrix) except ``k_h`` and tier 1's ``a_hat_h``, conjugate-
    transposed views, which a product copies when it reads them (:func:`_adjoint`).
    Autograd-tracked when built with grad.

    Attributes:
        kd: ``(F, n, n)``, ``m I + ÂᴴÂ − B̂ + B̂ᴴ``.
        k, k_h: the diagonal block of ``I − W`` and its adjoint: ``(F, n, n)`` for the last
            tier, ``(F', 4n, 4n)`` (alias-group layout) for the others.
        a_hat, a_hat_h: ``(F, n, n)`` transfer of ``A_i`` and its adjoint.
        s_grp: ``(F', 4, n_(i+1), n)``, ``½ ĉ`` of ``S_i`` per alias (``None`` for the last tier).
        s_blk, s_blk_h: ``(F', n_(i+1), 4n)``, ``S_i`` in group layout, and its adjoint.
    """

    kd: Tensor
    k: Tensor
    k_h: Tensor
    a_hat: Tensor
    a_hat_h: Tensor
    s_grp: Tensor | None = None
    s_blk: Tensor | None = None
    s_blk_h: Tensor | None = None


def _adjoint(x: Tensor) -> Tensor:
    """``xᴴ`` per frequency, materialised: the conjugation applied, in one pass. A conjugate-
    transposed *view* is no cheaper: ``bmm`` resolves the conjugation into a copy of the
    whole operand at every call (torch 2.14: an 81-channel block set, 32 MB, costs 3–9 ms
    more per product than the same product with the copy made once). Either row- or
    column-major comes out (``linalg.inv`` returns the latter, whose ``mH`` is row-major
    already, so ``contiguous()`` would keep the conjugate view); BLAS reads both in place."""
    return x.mH.resolve_conj()


class _Adjointed:
    """A per-frequency block set and its adjoint, formed on first use (:func:`_adjoint`) and
    kept: serving applies only ``V``, training also ``Vᵀ`` at every backward iteration. Two
    threads asking at once both form it and one result is kept: the same values.

    Attributes:
        block: ``(F, n, n)`` (or group-layout) blocks.
    """

    __slots__ = ("_adjoint", "block")

    def __init__(self, block: Tensor):
        self.block = block
        self._adjoint: Tensor | None = None

    def adjoint(self) -> Tensor:
        """``blockᴴ`` per frequency, conjugation applied (:func:`_adjoint`)."""
        h = self._adjoint
        if h is None:
            h = self._adjoint = _adjoint(self.block)
        return h


class MultiTierOperator(MonotoneOperator):
    """Multi-tier (and, with one tier, single) circular-convolution monotone operator.

    Args:
        in_channels: image channels.
        channels: ``[n_1, …, n_L]``.
        image_size: image height = width (before the one-pixel pad).
        m: monotonicity parameter.
        kernel_size: odd kernel size of every conv.

    ``z_shape`` is ``(n_1, s_1, s_1)`` for one tier and ``(Σ n_i s_i²,)`` (tiers flattened
    and concatenated) for several.
    """

    weight_caches = ("_spectra",)
    injects_through_resolvent = True  # (α T_1⁻¹ Û) x̂: see _inverse_injection

    def __init__(
        self,
        in_channels: int,
        channels: list[int],
        image_size: int,
        m: float = 1.0,
        kernel_size: int = 3,
    ):
        super().__init__(m)
        if not channels:
            raise ValueError("channels must name at least one tier")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.channels = [int(c) for c in channels]
        self.sizes = tier_sizes(image_size, len(self.channels))
        self.kernel_size = kernel_size
        n, k, tiers = self.channels, kernel_size, len(self.channels)

        self.U = nn.Conv2d(in_channels, n[0], k)
        self.A = nn.ParameterList(_kernel(c, c, k) for c in n)
        self.B = nn.ParameterList(_kernel(c, c, k) for c in n)
        self.S = nn.ParameterList(_kernel(n[i + 1], n[i], k) for i in range(tiers - 1))
        self.log_g = nn.Parameter(torch.zeros(tiers))
        self.log_gn = nn.Parameter(torch.zeros(tiers - 1)) if tiers > 1 else None
        self.h = nn.Parameter(torch.ones(tiers))

        self.numels = [c * s * s for c, s in zip(n, self.sizes, strict=True)]
        self.z_shape = (n[0], self.sizes[0], self.sizes[0]) if tiers == 1 else (sum(self.numels),)
        self._groups: dict[tuple[int, torch.device], AliasGroups] = {}
        self._spectra: dict[tuple, list[_TierSpectra]] = {}

    # ---- layout -------------------------------------------------------------------
    @property
    def tiers(self) -> int:
        """The number of tiers ``L`` (1 for a single convolution, §4–§5)."""
        return len(self.channels)

    @property
    def chunk_scale(self) -> float:
        """The solver loop's multiple of the CPU chunk budget (``CPU_CHUNK_BYTES``).

        Several tiers: twice the budget. Their per-frequency matmuls are ``4n × 4n`` blocks
        applied to one column per sample, and run well below the GEMM peak at 32 columns.
        Batch-64 (16,32,60) inference in one chunk of 64 instead of two of 32: −2…−8% in
        four alternating runs; at batch 128, chunks of 43, 64 or 128 are even.

        One tier: a chunk holds at least as many iterate bytes as the per-frequency
        resolvent has, which every chunk reads once per iteration. The 81-channel CIFAR
        resolvent is 32 MB, 85 samples' worth, and its products ran at 80 GFLOP/s with 16
        columns against 119 with 32; the transforms, which want cache-sized pieces, run
        :meth:`transform_rows` samples at a time instead. Batch 64, alternating within one
        run against four chunks of 16: inference −7% on two threads, −14% on one; the layer
        gradient's pass (``_KnownProduct``) in the same chunks, −2% of a train step.
        Smaller operators keep the budget: the 32-channel Fashion-MNIST resolvent
        (4 MB) stays in cache, and that model's batch-64 inference in one chunk with pieces
        was +6% against two chunks of 32. (16,32,60) in one chunk of 64 with transform
        pieces: +14% inference, +9% train step.
        """
        if self.tiers > 1:
            return 2.0
        s, n = self.sizes[0], self.channels[0]
        resolvent_bytes = s * (s // 2 + 1) * n * n * 2 * self.A[0].element_size()
        return max(1.0, resolvent_bytes / base.CPU_CHUNK_BYTES)

    def transform_rows(self, z: Tensor) -> int | None:
        """Samples per transform piece for ``z`` ``(B, ...)`` where one tier's chunk is
        larger than the budget (:attr:`chunk_scale`): half the budget, 8 samples of the
        81-channel CIFAR grid (pieces of 4 or 16 gained 0–3% where 8 gained 7%). ``None``
        (the whole argument at once) where chunks are cache-sized already, and with
        several tiers (pieces cost their coupling passes 14%, :attr:`chunk_scale`)."""
        return chunk_rows(z, 0.5) if self.tiers == 1 and self.chunk_scale > 1.0 else None

    def split(self, z: Tensor) -> list[Tensor]:
        """``(B, *z_shape)`` → per tier ``(B, n_i, s_i, s_i)`` (views)."""
        b = z.shape[0]
        if self.tiers == 1:
            return [z.view(b, self.channels[0], self.sizes[0], self.sizes[0])]
        out, start = [], 0
        for c, s, size in zip(self.channels, self.sizes, self.numels, strict=True):
            out.append(z[:, start : start + size].view(b, c, s, s))
            start += size
        return out

    def merge(self, tiers: list[Tensor]) -> Tensor:
        """Inverse of :meth:`split`."""
        if self.tiers == 1:
            return tiers[0]
        return torch.cat([t.flatten(1) for t in tiers], dim=1)

    def border_mask(self) -> Tensor:
        """0/1 mask of ``z_shape`` zeroing a one-pixel border of every tier (§5)."""
        masks = [
            border_mask(s).expand(c, s, s) for c, s in zip(self.channels, self.sizes, strict=True)
        ]
        if self.tiers == 1:
            return masks[0][:1].clone()  # (1, s, s) broadcasts over channels
        return torch.cat([mk.reshape(-1) for mk in masks])

    def _alias(self, i: int, device: torch.device) -> AliasGroups:
        key = (i, device)
        if key not in self._groups:
            self._groups[key] = AliasGroups(self.sizes[i], device=device)
        return self._groups[key]

    # ---- effective weights --------------------------------------------------------
    def weights(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Effective kernels ``(A_i, B_i, S_i)`` after the weight-norm scaling."""
        a = [
            torch.exp(0.5 * self.log_g[i]) * w / w.norm()
            for i, w in enumerate(self.A)  # √g A0/‖A0‖
        ]
        b = [self.h[i] * w / w.norm() for i, w in enumerate(self.B)]
        s = [torch.exp(0.5 * self.log_gn[i]) * w / w.norm() for i, w in enumerate(self.S)]
        return a, b, s

    def spectra(self) -> list[_TierSpectra]:
        """Per-tier frequency blocks; cached per weights when autograd is off."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self._build_spectra()
        key = self._weights_key()
        hit = self._spectra.get(key)
        if hit is None:
            with torch.no_grad():
                hit = self._build_spectra()
            self._spectra.clear()  # one set of weights at a time: older ones are dead
            self._spectra[key] = hit
        return hit

    def _build_spectra(self, weights: tuple | None = None) -> list[_TierSpectra]:
        """Per-tier blocks of :meth:`weights` (or of ``weights``, its ``(A, B, S)`` lists in
        another dtype: :meth:`_weight_norm` builds them in float64)."""
        a_w, b_w, s_w = self.weights() if weights is None else weights
        out = []
        for i, (c, s) in enumerate(zip(self.channels, self.sizes, strict=True)):
            a_hat, b_hat = transfer(a_w[i], s), transfer(b_w[i], s)
            # Views where a block set's adjoint is read once here or rarely (k_h: forward–
            # backward's Wᵀ, never in PR): bmm's copy of a view is the materialisation's
            # price, paid only when used. Materialised where read at every iteration: the
            # coupling's Â_(i+1)ᴴ (every multi-tier forward) and S_iᴴ (every backward).
            a_hat_h = _adjoint(a_hat) if i > 0 else a_hat.mH
            eye = torch.eye(c, dtype=a_hat.dtype, device=a_hat.device)
            kd = self.m * eye + a_hat_h @ a_hat - b_hat + b_hat.mH
            if i == self.tiers - 1:
                out.append(_TierSpectra(kd, kd, kd.mH, a_hat, a_hat_h))
                continue
            grp = self._alias(i, a_hat.device)
            s_grp = 0.5 * grp.group(transfer(s_w[i], s))  # (F', 4, n2, n)
            g, four, n2, _ = s_grp.shape
            s_blk = s_grp.permute(0, 2, 1, 3).reshape(g, n2, four * c)
            s_blk_h = _adjoint(s_blk)
            k = block_diag4(grp.group(kd)) + s_blk_h @ s_blk
            out.append(_TierSpectra(kd, k, k.mH, a_hat, a_hat_h, s_grp, s_blk, s_blk_h))
        return out

    # ---- the interface ------------------------------------------------------------
    def bias(self, x: Tensor) -> Tensor:
        """``U x + b`` on the zero-padded image, feeding tier 1 only. ``(B, *z_shape)``."""
        u = self._inject(x, self.U.weight, self.U.bias)
        if self.tiers == 1:
            return u
        rest = u.new_zeros(u.shape[0], sum(self.numels[1:]))
        return torch.cat([u.flatten(1), rest], dim=1)

    def injection_scale(self, x: Tensor) -> Tensor:
        """``(B,)`` ``‖|U||x| + |b|‖`` (the base class): :meth:`bias`'s convolution once
        more, with ``|U|`` on ``|x|`` (the other tiers' zeros add nothing)."""
        with torch.no_grad():
            u = self._inject(x.abs(), self.U.weight.abs(), self.U.bias.abs())
            return torch.linalg.vector_norm(u.flatten(1), dim=1)

    def _inject(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """``(B, C, H, W)`` image → ``(B, *tier-1 shape)``: the circular convolution with
        ``weight`` and ``bias`` on the image with its one-pixel zero border (Appendix C.2)."""
        p = self.kernel_size // 2
        xp = F.pad(x, (1, 1, 1, 1))
        return F.conv2d(F.pad(xp, (p, p, p, p), mode="circular"), weight, bias)

    def _injection_norm(self) -> float:
        # Exact: the largest σ over the frequency blocks.
        return spectral_norm_above(transfer(self.U.weight.detach().double(), self.sizes[0]))

    def _weight_norm(self, tight: bool) -> float:
        """``max(m, |1 − m|) + ‖L − B + Bᵀ‖`` (``I − W = m I + L − B + Bᵀ``, ``W = (1 − m) I −
        L + B − Bᵀ``; §1, §5), the second term at most ``max_i ‖D_i‖ + max_i ‖2 A_(i+1)ᵀ P
        S_i‖`` for ``L − B + Bᵀ``'s diagonal blocks ``D_i = A_iᵀA_i + S_iᵀS_i − B_i + B_iᵀ``
        and its sub-diagonal ones (``‖P‖ = 1``): a block bidiagonal matrix is at most its
        diagonal's norm plus its sub-diagonal's, and each of those is its largest block.

        * ``tight`` (serving: the weights stay, and the bound is paid once): every norm
          exact, from the frequency blocks built in float64
          (:func:`~.base.spectral_norms_above`; one tier, ``max_f ‖K̂_f − m I‖₂``: exact.
          cifar-conv about 0.6 s, once).
        * Otherwise (a training step, whose weights change after it), from the kernels
          alone (:func:`conv_norm_above`; cifar-conv about 25 ms a step, where 50 steps of
          power iteration took 560 ms): ``‖D_i‖ ≤ ‖A_i‖² + ‖S_i‖² + 2 ‖B_i‖``.
        """
        a_w, b_w, s_w = self.weights()
        base = max(self.m, abs(1.0 - self.m))
        if tight:
            specs = self._build_spectra(
                tuple([w.detach().double() for w in ws] for ws in (a_w, b_w, s_w))
            )
            diag = sub = 0.0
            for i, sp in enumerate(specs):
                eye = torch.eye(sp.k.shape[-1], dtype=sp.k.dtype, device=sp.k.device)
                diag = max(diag, spectral_norms_above(sp.k - self.m * eye).max().item())
                if i + 1 < self.tiers:  # ‖Â_(i+1)‖ ‖S_i‖, S_i exact in its group layout
                    a_next = spectral_norms_above(specs[i + 1].a_hat).max().item()
                    sub = max(sub, 2.0 * a_next * spectral_norms_above(sp.s_blk).max().item())
            return (base + diag + sub) * (1.0 + 1e-12)
        a = [conv_norm_above(w) for w in a_w]
        sv = [conv_norm_above(w) for w in s_w] + [0.0]  # the last tier has no S
        b = [conv_norm_above(w) for w in b_w]
        diag = max(ai * ai + si * si + 2.0 * bi for ai, si, bi in zip(a, sv, b, strict=True))
        sub = max((2.0 * a[i + 1] * sv[i] for i in range(self.tiers - 1)), default=0.0)
        return (base + diag + sub) * (1.0 + 1e-12)

    def _couple(
        self, specs: list[_TierSpectra], y_grp: Tensor, i: int, acc: Tensor | None, scale: float
    ) -> Tensor:
        """``acc + scale · 2 Â_(i+1)ᴴ P S_i y`` for tier ``i``'s ``y`` in group layout and
        ``acc`` in tier ``i+1``'s half layout (one fused multiply-add; ``None``: zero)."""
        lifted = lift_spectrum(specs[i].s_blk @ y_grp, self.sizes[i] // 2)  # P S_i y
        if acc is None:  # a zero tier (:meth:`_inverse_injection`)
            return torch.matmul(specs[i + 1].a_hat_h, lifted).mul_(2.0 * scale)
        return torch.baddbmm(acc, specs[i + 1].a_hat_h, lifted, alpha=2.0 * scale)

    def _couple_transpose(
        self, specs: list[_TierSpectra], x_next: Tensor, i: int, acc: Tensor, scale: float
    ) -> Tensor:
        """``acc + scale · 2 S_iᵀ Pᵀ Â_(i+1) x`` for tier ``i+1``'s half-layout ``x`` and
        ``acc`` in tier ``i``'s group layout."""
        # Pᵀ in the frequency domain, as P in _couple: the spatial round trip (an inverse
        # transform on the s_(i+1) grid and a forward one on the s_i/2 grid) cost about as
        # much as a tier's own transforms, in every transposed (training backward) step.
        up = crop_spectrum(specs[i + 1].a_hat @ x_next, self.sizes[i] // 2)
        return torch.baddbmm(acc, specs[i].s_blk_h, up, alpha=2.0 * scale)

    def _k(self, z: Tensor, transpose: bool) -> Tensor:
        """``(I − W) z``: diagonal blocks per tier plus the sub-diagonal coupling (§5)."""
        ys = self._k_spectra(z, transpose)
        rows = self.transform_rows(z)
        return self.merge([from_spectrum(y, s, rows) for y, s in zip(ys, self.sizes, strict=True)])

    def _k_spectra(
        self, z: Tensor, transpose: bool, specs: list[_TierSpectra] | None = None
    ) -> list[Tensor]:
        """``(I − W) z`` per tier, as ``(F_i, n_i, B)`` half spectra (with ``specs`` given,
        those blocks instead of :meth:`spectra`)."""
        specs = self.spectra() if specs is None else specs
        rows = self.transform_rows(z)
        xs = [to_spectrum(t, rows) for t in self.split(z)]
        outs: list[Tensor] = []
        last = self.tiers - 1
        prev_grp: Tensor | None = None  # tier i-1's input in group layout (forward)
        for i, (spec, x) in enumerate(zip(specs, xs, strict=True)):
            k = spec.k_h if transpose else spec.k
            if i == last:
                y = k @ x
            else:
                grp = self._alias(i, x.device)
                xg = grp.group(x).reshape(grp.groups, -1, x.shape[-1])
                y = k @ xg
                if transpose:
                    y = self._couple_transpose(specs, xs[i + 1], i, y, 1.0)
                y = grp.ungroup(y.view(grp.groups, 4, -1, x.shape[-1]))
            if not transpose and i > 0:  # + 2 Â_iᴴ P S_(i-1) z_(i-1)
                y = self._couple(specs, prev_grp, i - 1, y, 1.0)
            if not transpose and i < last:
                prev_grp = xg
            outs.append(y)
        return outs

    def multiply_known(self, z: Tensor, wz: Tensor) -> Tensor:
        """``W z`` with its known value ``wz`` (see the base class), its parameter gradient
        formed in the frequency domain: for an incoming gradient ``v``, ``⟨v, W z⟩ = ⟨v, z⟩
        − Re Σ conj(v̌)·(K̂ ẑ)``, ``v̌`` the adjoint transform of ``v``. The backward costs two
        transforms and the per-frequency products, not a forward and backward ``W z``."""
        params = [p for name, p in self.named_parameters() if not name.startswith("U.")]
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return wz
        return _KnownProduct.apply(self, z.detach(), wz.detach(), *params)

    def _prepare(self, alpha: float) -> tuple[float, list[_Adjointed], tuple]:
        """α; per tier, ``T_i⁻¹`` of the diagonal blocks ``T_i = I + α K_i`` (with ``T_i⁻ᴴ``
        formed on first use, :class:`_Adjointed`); and
        the injection's blocks ``(α T_1⁻¹ Û, α T_1⁻¹ b̂)`` (:meth:`_inverse_injection`)."""
        blocks = []
        last = self.tiers - 1
        for i, spec in enumerate(self.spectra()):
            eye = torch.eye(spec.kd.shape[-1], dtype=spec.kd.dtype, device=spec.kd.device)
            d_inv = torch.linalg.inv(eye + alpha * spec.kd)  # per frequency, (F, n, n)
            if i == last:
                t_inv = d_inv
            else:
                t_inv = _woodbury(self._alias(i, d_inv.device).group(d_inv), spec.s_grp, alpha)
            blocks.append(_Adjointed(t_inv))
        return alpha, blocks, self._injection_blocks(alpha, blocks[0].block)

    def _injection_blocks(self, alpha: float, t_inv: Tensor) -> tuple[Tensor, Tensor]:
        """``(α T_1⁻¹ Û, α T_1⁻¹ b̂)`` per frequency (alias groups with several tiers).

        ``U x + b`` is a circular convolution on the padded image (:meth:`_inject`), so its
        spectrum is ``Û x̂`` plus ``b`` at the zero frequency: ``b s`` in the unitary
        ``rfft2``, the constant ``b`` summed over ``s²`` pixels and divided by ``s``.
        Returns ``(F, n, C)`` and ``(F, n, 1)``, or ``(F', 4n, 4C)`` and ``(F', 4n, 1)``.
        """
        s = self.sizes[0]
        u_hat = transfer(self.U.weight.detach(), s)  # (F, n, C)
        b_hat = torch.zeros_like(u_hat[:, :, :1])  # (F, n, 1)
        b_hat[0, :, 0] = self.U.bias.detach() * s
        if self.tiers == 1:
            return alpha * (t_inv @ u_hat), alpha * (t_inv @ b_hat)
        grp = self._alias(0, t_inv.device)
        u_grp = block_diag4(grp.group(u_hat))  # (F', 4n, 4C)
        b_grp = grp.group(b_hat).reshape(grp.groups, -1, 1)  # (F', 4n, 1)
        return alpha * (t_inv @ u_grp), alpha * (t_inv @ b_grp)

    def _apply_inverse(self, data: tuple, z: Tensor, transpose: bool) -> Tensor:
        """Block forward substitution for ``V``, backward substitution for ``Vᵀ`` (§5)."""
        rows = self.transform_rows(z)
        rs = [to_spectrum(t, rows) for t in self.split(z)]
        ys = self._substitute(data, rs, transpose)
        return self.merge([from_spectrum(y, s, rows) for y, s in zip(ys, self.sizes, strict=True)])

    def _inverse_injection(self, data: tuple, x: Tensor, alpha: float) -> Tensor:
        """``V(α(U x + b))`` for the ``(B, C, H, W)`` image ``x``, as ``(α T_1⁻¹ Û) x̂ + α
        T_1⁻¹ b̂`` on tier 1, whose product ``_prepare`` formed once (§4–§5).

        It is what :meth:`_apply_inverse` gives for ``α`` :meth:`bias` (to rounding) at a
        fraction of the work: the transform of ``C`` image channels instead of ``n_1``
        iterate channels, ``n_1 × C`` blocks instead of ``n_1 × n_1`` (tier 1's ``4n_1 ×
        4C`` per group), and no transforms of the other tiers, whose injection is zero.
        PR's first half step from zero is this (:class:`~model_core.solvers.PeacemanRachford`):
        on cifar-conv's 81-channel grid about 22 of the generic step's 72 MFLOP a sample.
        """
        _, _, (m_inj, c_inj) = data  # (α is in them)
        b = x.shape[0]
        xs = to_spectrum(F.pad(x, (1, 1, 1, 1)).to(m_inj.real.dtype))  # (F, C, B)
        if self.tiers == 1:
            # (pieces as for an iterate: a zero-strided stand-in of its shape)
            rows = self.transform_rows(xs.real.new_zeros(()).expand(b, *self.z_shape))
            return from_spectrum(torch.baddbmm(c_inj, m_inj, xs), self.sizes[0], rows)
        grp = self._alias(0, xs.device)
        first = torch.baddbmm(c_inj, m_inj, grp.group(xs).reshape(grp.groups, -1, b))
        ys = self._substitute(data, [None] * self.tiers, False, first)
        return self.merge([from_spectrum(y, s) for y, s in zip(ys, self.sizes, strict=True)])

    def _substitute(
        self, data: tuple, rs: list[Tensor | None], transpose: bool, first: Tensor | None = None
    ) -> list[Tensor]:
        """Per tier, the half spectra ``(F_i, n_i, B)`` of ``V r`` (``Vᵀ r``) from those of
        ``r``, ``rs`` (``None``: a zero tier). ``first`` (forward only): tier 1's solution
        already known, in its group layout (:meth:`_inverse_injection`)."""
        alpha, blocks, _ = data
        specs = self.spectra()
        ys: list[Tensor | None] = list(rs)
        last = self.tiers - 1
        prev_grp: Tensor | None = None  # tier i-1's solution in group layout (forward)
        for i in range(last, -1, -1) if transpose else range(self.tiers):
            t_inv = blocks[i].adjoint() if transpose else blocks[i].block
            r = rs[i]
            if not transpose and i > 0:
                r = self._couple(specs, prev_grp, i - 1, r, -alpha)
            if i == last:
                ys[i] = t_inv @ r
                continue
            grp = self._alias(i, t_inv.device)
            if i == 0 and first is not None:
                prev_grp = first
            else:
                rg = grp.group(r).reshape(grp.groups, -1, r.shape[-1])
                if transpose:
                    rg = self._couple_transpose(specs, ys[i + 1], i, rg, -alpha)
                prev_grp = t_inv @ rg
            ys[i] = grp.ungroup(prev_grp.view(grp.groups, 4, -1, prev_grp.shape[-1]))
        return ys


class _KnownProduct(torch.autograd.Function):
    """Forward: the known ``W z``. Backward: the parameter gradient of ``⟨v, W z⟩``."""

    @staticmethod
    def forward(ctx, op: MultiTierOperator, z: Tensor, wz: Tensor, *params: Tensor) -> Tensor:
        ctx.op, ctx.params = op, params
        ctx.save_for_backward(z)
        return wz.view_as(wz)  # a view, not a copy of the batch

    @staticmethod
    def backward(ctx, v: Tensor):
        (z,) = ctx.saved_tensors
        op: MultiTierOperator = ctx.op
        v = v.contiguous()
        wanted = [p for p in ctx.params if p.requires_grad]
        rows = chunk_rows(z, op.chunk_scale if op.tiers == 1 else 1.0)
        pieces = op.transform_rows(z)
        with torch.enable_grad():
            # Gradients w.r.t. the per-frequency blocks first, chunk by chunk (the chunks'
            # transforms stay in cache; a one-tier chunk as large as the solver's, its
            # transforms in pieces), then once through the blocks to the weights.
            if op.tiers == 1:
                # One block: the gradient of Re Σ conj(v̌)·(K̂ ẑ) w.r.t. K̂ is Σ_b v̌ ẑᴴ per
                # frequency (PyTorch's convention for complex leaves), formed directly,
                # without the product K̂ ẑ that autograd would compute first.
                grad_k = None
                for zc, vc in zip(z.split(rows), v.split(rows), strict=True):
                    g = from_spectrum_adjoint(vc, pieces) @ to_spectrum(zc, pieces).mH
                    grad_k = g if grad_k is None else grad_k.add_(g)
                blocks, block_grads = _transfer_gradients(op, grad_k.neg_())
            else:
                blocks, block_grads = _block_gradients(op, op._build_spectra(), z, v, rows)
            grads = iter(torch.autograd.grad(blocks, wanted, block_grads, allow_unused=True))
        return None, None, None, *(next(grads) if p.requires_grad else None for p in ctx.params)


def _transfer_gradients(op: MultiTierOperator, grad_k: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """The transfer functions ``Â, B̂`` of a one-tier operator (with their graphs to the
    weights) and the gradient of a score w.r.t. each, from its gradient ``G`` w.r.t. ``K̂ = m I
    + ÂᴴÂ − B̂ + B̂ᴴ`` (PyTorch's convention for complex tensors: ``d score = Re⟨G, dK̂⟩``).

    ``d(ÂᴴÂ) = dÂᴴ Â + Âᴴ dÂ`` gives ``Â (G + Gᴴ)``, and ``−B̂ + B̂ᴴ`` gives ``Gᴴ − G``: one
    batched product per frequency, where autograd through ``ÂᴴÂ`` formed the product again
    and then two more (the 81-channel CIFAR model: 2.6 GFLOP each).
    """
    a_w, b_w, _ = op.weights()
    s = op.sizes[0]
    a_hat, b_hat = transfer(a_w[0], s), transfer(b_w[0], s)
    grad_h = grad_k.mH
    return [a_hat, b_hat], [a_hat.detach() @ (grad_k + grad_h), grad_h - grad_k]


def _block_gradients(
    op: MultiTierOperator, specs: list[_TierSpectra], z: Tensor, v: Tensor, rows: int
) -> tuple[list[Tensor], list[Tensor]]:
    """The blocks of ``specs`` that ``Re Σ conj(v̌)·(K̂ ẑ)`` depends on, and the gradient of
    ``−`` that score w.r.t. each, by autograd through :meth:`MultiTierOperator._k_spectra` on
    leaf copies of the blocks, chunk by chunk."""
    pairs: list[tuple[Tensor, Tensor]] = []  # (block with its graph, a leaf copy)

    def leaf(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        pairs.append((t, t.detach().requires_grad_()))
        return pairs[-1][1]

    leaves = [_TierSpectra(**{k: leaf(t) for k, t in vars(sp).items()}) for sp in specs]
    for zc, vc in zip(z.split(rows), v.split(rows), strict=True):
        ys = op._k_spectra(zc, transpose=False, specs=leaves)  # K̂ ẑ
        vs = [from_spectrum_adjoint(t) for t in op.split(vc)]
        score = sum(
            torch.vdot(a.reshape(-1), y.reshape(-1)).real for a, y in zip(vs, ys, strict=True)
        )
        (-score).backward()  # ⟨v, W z⟩ = ⟨v, z⟩ − ⟨v, K z⟩; z is a constant
    used = [(t, copy.grad) for t, copy in pairs if copy.grad is not None]
    return [t for t, _ in used], [g for _, g in used]


def conv_norm_above(weight: Tensor) -> float:
    """An upper bound on the ℓ2 operator norm of the circular convolution with ``weight``
    ``(n_out, n_in, k, k)`` on any grid, stride 1 or 2, from the kernel alone: the smaller
    of two bounds.

    * ``Σ_taps ‖w[:, :, i, j]‖₂``: the convolution is the sum over taps of a unitary shift
      and that tap's channel map (stride 2 then subsamples, which cannot raise the norm).
    * ``k · min_R ‖R‖₂`` over the four reshapes ``R`` of the kernel to
      ``n_out × n_in k²``, ``n_in × n_out k²``, ``n_out k × n_in k`` (rows by kernel row)
      and by kernel column (Singla & Feizi, "Fantastic Four", ICLR 2021, Theorem 1).

    Each ``‖R‖₂`` in float64, raised past its rounding (:func:`~.base.spectral_norms_above`).
    On the paper's CIFAR kernels at initialisation 1.7× the exact ``max_f ‖ŵ(f)‖₂`` (random
    taps do not add up), within 2% after ten Adam steps; on the trained fmnist-conv 1.2×.
    About 3 ms for an 81-channel kernel, where the exact value takes SVDs of its 612
    frequency blocks.
    """
    w = weight.detach().to(torch.float64)
    n_out, n_in, kh, kw = w.shape
    taps = w.flatten(2).permute(2, 0, 1)
    tap_sum = spectral_norms_above(taps).sum().item()
    reshapes = (
        w.reshape(n_out, -1),
        w.transpose(0, 1).reshape(n_in, -1),
        w.permute(0, 2, 1, 3).reshape(n_out * kh, -1),
        w.permute(0, 3, 1, 2).reshape(n_out * kw, -1),
    )
    four = math.sqrt(kh * kw) * min(spectral_norms_above(r).item() for r in reshapes)
    return min(tap_sum, four)


def _kernel(n_out: int, n_in: int, k: int) -> nn.Parameter:
    """A conv kernel initialised like ``nn.Conv2d`` (Kaiming uniform, a = √5)."""
    w = torch.empty(n_out, n_in, k, k)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return nn.Parameter(w)


def _woodbury(d_inv_grp: Tensor, s_grp: Tensor, alpha: float) -> Tensor:
    """``(D + α SᴴS)⁻¹ = D⁻¹ − D⁻¹Sᴴ(α⁻¹I + S D⁻¹ Sᴴ)⁻¹ S D⁻¹`` per alias group (§5).

    Args:
        d_inv_grp: ``(F', 4, n, n)``, ``D⁻¹`` at the four aliases of each group.
        s_grp: ``(F', 4, n2, n)``, the blocks of ``S`` per alias.

    Returns:
        ``(F', 4n, 4n)``.
    """
    g, four, n2, n = s_grp.shape
    ds = d_inv_grp @ s_grp.mH  # (F', 4, n, n2): D⁻¹Sᴴ per alias
    sd = s_grp @ d_inv_grp  # (F', 4, n2, n): S D⁻¹ per alias
    eye = torch.eye(n2, dtype=s_grp.dtype, device=s_grp.device)
    middle = eye / alpha + (s_grp @ ds).sum(dim=1)  # (F', n2, n2)
    correction = ds.reshape(g, four * n, n2) @ torch.linalg.solve(
        middle, sd.permute(0, 2, 1, 3).reshape(g, n2, four * n)
    )
    return block_diag4(d_inv_grp) - correction
