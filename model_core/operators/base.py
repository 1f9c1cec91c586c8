"""The interface every monotone linear operator implements (docs/math.md §1–§5)."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

# On the CPU, batched work over many samples (the solver loop, the gradient of the layer's
# last application) runs in chunks of at most about this many bytes of iterate (times the
# operator's ``chunk_scale``), so that a chunk's transforms, matmuls and elementwise passes
# stay in cache. Measured on a 2-core EPYC VM, alternating sizes within one process (the
# VM's speed drifts), with model_core.runtime's allocator setting: conv 81 ch at batch 64
# (375 KB a sample) runs fastest in 4 chunks of 16 (6 MB; 8 and 12 MB +3-4%); a fmnist-conv
# training step (115 KB) in 3 chunks of 43 (64 rows +8%, 128 rows +15%); 3 MB is no
# better, 1.5 MB +26%. Multi-tier operators set chunk_scale 2; a one-tier operator whose
# resolvent is larger than the budget (81 channels: 32 MB) takes chunks of its resolvent's
# size and transforms in half-budget pieces, which beat the 4 chunks of 16 (see
# MultiTierOperator.chunk_scale).
CPU_CHUNK_BYTES = 6 << 20


def chunk_rows(x: Tensor, scale: float = 1.0) -> int:
    """Rows of ``x`` (``(B, ...)``) per chunk: equal chunks of at most ``scale`` ×
    :data:`CPU_CHUNK_BYTES` bytes on the CPU, one row at least; the whole batch on GPUs.

    The one reader of the budget (read at each call, so a test may patch it here)."""
    batch = x.shape[0]
    if x.device.type != "cpu" or batch <= 1:
        return max(batch, 1)
    budget = int(CPU_CHUNK_BYTES * scale)
    rows = max(1, budget // max(1, x[0].numel() * x.element_size()))
    chunks = -(-batch // rows)
    return -(-batch // chunks)


# Resolvents kept per operator. Serving holds one α and builds the next one aside while
# retuning; training needs one per optimizer step. Four covers both with room to spare.
RESOLVENT_CACHE_SIZE = 4

# Guards every operator's resolvent-cache bookkeeping (not the builds): a server's solve
# thread reads the cache while an α search inserts the next resolvent. Module-level, so
# operators stay picklable and deep-copyable; the critical sections are a few dict ops.
_CACHE_LOCK = threading.Lock()


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: Tensor) -> Tensor:
    """A float tensor's bit pattern as integers: equal exactly when the values are identical,
    NaN included (a NaN weight would otherwise never match its copy)."""
    if t.is_floating_point() and t.element_size() in _SAME_WIDTH_INT:
        return t.view(_SAME_WIDTH_INT[t.element_size()])
    return t


def spectral_norm_above(matrices: Tensor) -> float:
    """The largest ``‖M‖₂`` of ``matrices`` (one ``(m, n)`` or a batch ``(..., m, n)``), in
    float64 and raised past that computation's rounding: an upper bound, which every Lipschitz
    bound and certified radius needs (float32 read fmnist-fc's ``‖U‖₂`` 1.9e-7 low)."""
    m = matrices.detach()
    m = m.to(torch.complex128 if m.is_complex() else torch.float64)  # (a transfer function)
    return torch.linalg.matrix_norm(m, ord=2).max().item() * (1.0 + 1e-12)


def spectral_norms_above(matrices: Tensor) -> Tensor:
    """``‖M‖₂`` of each float64 (or complex128) matrix of ``matrices`` (``(..., p, q)``, a
    ``(...)`` tensor), from above: :func:`spectral_norm_above` per matrix, as ``√λ_max`` of
    the smaller Gram matrix (Hermitian eigenvalues take about three quarters of the SVDs'
    time on cifar-conv's 612 blocks of 81 × 81), raised past its rounding (``q`` products
    per entry, and the eigensolver's backward error: far below the 1e-9 added)."""
    m = matrices
    g = m @ m.mH if m.shape[-2] <= m.shape[-1] else m.mH @ m
    return torch.linalg.eigvalsh(g)[..., -1].clamp_min(0.0).sqrt() * (1.0 + 1e-9)


def same_values(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` hold identical values bit for bit (NaN equal to itself, ``-0.0``
    not equal to ``0.0``): how every cache kept per weights checks that they still hold."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


class Resolvent:
    """``V = (I + α(I − W))⁻¹`` and ``Vᵀ``, prepared once for one (weights, α).

    Built by :meth:`MonotoneOperator.resolvent`; holds no autograd graph.

    Attributes:
        alpha: the step size α it inverts for.
        weights: the operator's weights key (:meth:`MonotoneOperator._weights_key`) when
            it was built; :meth:`is_current` compares it with the key now.
    """

    def __init__(self, op: MonotoneOperator, alpha: float, data: Any, weights: tuple = ()):
        self.op = op
        self.alpha = alpha
        self.data = data
        self.weights = weights

    def is_current(self) -> bool:
        """Whether the operator's weights are still the ones this was built from."""
        return self.op._weights_key() == self.weights

    def inverse(self, z: Tensor) -> Tensor:
        """``V z`` for ``z`` of shape ``(B, *op.z_shape)``."""
        return self.op._apply_inverse(self.data, z, transpose=False)

    def inverse_transpose(self, z: Tensor) -> Tensor:
        """``Vᵀ z`` for ``z`` of shape ``(B, *op.z_shape)``."""
        return self.op._apply_inverse(self.data, z, transpose=True)

    def inverse_injection(self, x: Tensor) -> Tensor:
        """``V(α(U x + b))`` ``(B, *op.z_shape)`` for the ``(B, ...)`` input ``x``: the
        first half step of PR from zero (docs/math.md §2), which an operator may form
        without the injection (:meth:`MonotoneOperator._inverse_injection`). Equal to
        ``inverse(alpha * op.bias(x))`` up to rounding."""
        return self.op._inverse_injection(self.data, x, self.alpha)


class MonotoneOperator(nn.Module):
    """A linear layer ``z ↦ W z + U x + b`` with ``I − W ⪰ m I`` by construction.

    A concrete operator (one subclass; :class:`~model_core.operators.FCOperator` is the
    shortest) calls ``super().__init__(m)``, sets :attr:`z_shape` and implements ``_k``
    (apply ``I − W`` or its transpose), ``_prepare`` and ``_apply_inverse`` (the
    resolvent), ``bias`` and ``_injection_norm``, and names any cache of its own in
    ``weight_caches``. Everything else, and the caching of resolvents per (weights, α),
    lives here. An architecture builds it
    (:func:`~model_core.config.register_architecture`). Every cache keyed on
    :meth:`_weights_key` serves only the current weight values, however they were written.

    Attributes:
        m: the monotonicity parameter ``m > 0``.
        z_shape: per-sample shape of the hidden state ``z``.
    """

    m: float
    z_shape: tuple[int, ...]
    chunk_scale: float = 1.0  # multiple of CPU_CHUNK_BYTES the solver loop chunks by
    # Attributes naming a subclass's own per-weights caches (dicts): clear_cache empties them.
    weight_caches: tuple[str, ...] = ()
    # _inverse_injection forms V(α(Ux + b)) from the input, not through bias(x): PR's first
    # step then takes it (solve_forward's image) and counts its rounding at the injection's
    # scale (PeacemanRachford._shortcut_scale).
    injects_through_resolvent: bool = False

    def __init__(self, m: float):
        super().__init__()
        if not m > 0:
            raise ValueError(f"m must be > 0 for a monotone operator, got {m}")
        self.m = float(m)
        self._resolvents: OrderedDict[tuple, Resolvent] = OrderedDict()
        self._norm_cache: tuple[tuple, float] | None = None
        self._w_norm_cache: tuple[tuple, float, bool] | None = None  # (key, bound, tight)
        self._in_training = 0  # open weights_in_training() scopes
        # (key, identity, copies): the parameter values the current weights key stands for.
        self._snapshot: tuple[tuple, tuple, list[Tensor]] | None = None
        self._generation = 0
        self._fixed = 0  # open fixed_weights() scopes
        self._fixed_key: tuple = ()

    # ---- the written-down interface -------------------------------------------------
    def bias(self, x: Tensor) -> Tensor:
        """``U x + b``: ``(B, C, H, W)`` (or ``(B, D)``) input to ``(B, *z_shape)``."""
        raise NotImplementedError

    def injection_scale(self, x: Tensor) -> Tensor | None:
        """``(B,)``: ``‖|U||x| + |b|‖`` per sample, the scale of the rounding of
        :meth:`bias` (:func:`~model_core.bounds.rounding_error`), which ``‖U x + b‖`` is not
        where ``U x`` cancels. ``None`` where an operator cannot say (then 0 is taken)."""
        return None

    def multiply(self, z: Tensor) -> Tensor:
        """``W z`` for ``z`` of shape ``(B, *z_shape)``."""
        return self._minus_k(z, transpose=False)

    def multiply_transpose(self, z: Tensor) -> Tensor:
        """``Wᵀ z`` for ``z`` of shape ``(B, *z_shape)``."""
        return self._minus_k(z, transpose=True)

    def _minus_k(self, z: Tensor, transpose: bool) -> Tensor:
        """``z − (I − W) z`` (or its transpose), on the CPU in the solver's cache-sized
        chunks of rows. A whole batch at once (the error bound's ``W r`` after a solve, §9)
        runs its transforms out of cache: the batch-64 ``W r`` of the 81-channel conv model
        took about a quarter more time unchunked than in four chunks of 16. Every row's
        arithmetic is the same either way."""
        if z.shape[0] == 0:  # (the Fourier transforms cannot shape an empty batch)
            return z.clone()
        rows = chunk_rows(z, self.chunk_scale)
        if rows >= z.shape[0] or torch.is_grad_enabled():  # (out= has no autograd)
            return z - self._k(z, transpose=transpose)
        out = torch.empty_like(z)
        for zc, oc in zip(z.split(rows), out.split(rows), strict=True):
            torch.sub(zc, self._k(zc, transpose=transpose), out=oc)
        return out

    def multiply_known(self, z: Tensor, wz: Tensor) -> Tensor:
        """``W z`` for a constant ``z`` whose product ``wz`` is already known.

        Training applies the layer once more after the solve, with autograd, and PR's
        final state gives ``W z*`` for free (§2). Operators that can form the parameter
        gradient of ``W z`` from ``z`` and the incoming gradient alone override this to
        return ``wz`` without applying ``W``; this default recomputes ``W z``.

        Args:
            z: ``(B, *z_shape)``, not differentiated.
            wz: ``(B, *z_shape)``, the value of ``W z``.

        Returns:
            ``(B, *z_shape)`` equal to ``W z``, differentiable w.r.t. the parameters.
        """
        return self.multiply(z)

    def resolvent(self, alpha: float, *, cache: bool = True) -> Resolvent:
        """``(I + α(I − W))⁻¹`` for the current weights, cached per (weights, α) (§2).

        ``cache=False`` builds one aside without touching the cache (α searches).

        Raises:
            ValueError: ``alpha`` not > 0.
        """
        alpha = float(alpha)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        weights = self._weights_key()
        key = (alpha, weights)
        with _CACHE_LOCK:
            hit = self._resolvents.get(key)
            if hit is not None:
                self._resolvents.move_to_end(key)
                return hit
        with torch.no_grad():
            res = Resolvent(self, alpha, self._prepare(alpha), weights)
        if not cache:
            return res
        with _CACHE_LOCK:
            # Resolvents of older weights can never be hit again (training steps): drop them.
            for old in [k for k in self._resolvents if k[1] != weights]:
                del self._resolvents[old]
            self._resolvents[key] = res
            while len(self._resolvents) > RESOLVENT_CACHE_SIZE:
                self._resolvents.popitem(last=False)
        return res

    def injection_norm(self) -> float:
        """``‖U‖₂``, the spectral norm of the input injection (for §7's Lipschitz bound).

        Cached per weights: ``infer`` asks for it on every batch.
        """
        key = self._weights_key()
        if self._norm_cache is None or self._norm_cache[0] != key:
            with torch.no_grad():
                self._norm_cache = (key, float(self._injection_norm()))
        return self._norm_cache[1]

    def _injection_norm(self) -> float:
        """``‖U‖₂`` for the current weights (uncached; :meth:`injection_norm` caches it)."""
        raise NotImplementedError

    def weight_norm(self) -> float:
        """A bound ``≥ max(‖W‖₂, ‖I − W‖₂)``: the scale of rounding in a product ``W z``, for
        the stopping rule's and the error bound's rounding terms (§2, §9), and of ``I − W``
        in PR's first step. An upper bound by construction, never an estimate from below,
        from the parameterisation (§1, §5) and not by iterating on ``W``
        (:meth:`_weight_norm`; docs/math.md §9, "The bound on ‖W‖₂").

        The operator's tightest bound, except inside :meth:`weights_in_training`, where a
        cheaper one that may be looser does. ``inf`` where a parameter is not finite (a
        diverged training step: every bound and residual then reads ``inf``, where the
        eigensolvers behind the bound would raise). Cached per weights (every bound asks
        for it).
        """
        key = self._weights_key()
        tight = self._in_training == 0
        held = self._w_norm_cache
        if held is None or held[0] != key or (tight and not held[2]):
            with torch.no_grad():
                finite = all(bool(torch.isfinite(p).all()) for p in self.parameters())
                bound = float(self._weight_norm(tight)) if finite else math.inf
                held = self._w_norm_cache = (key, bound, tight)
        return held[1]

    @contextmanager
    def weights_in_training(self) -> Iterator[None]:
        """A training step's scope: the weights will change after it, so :meth:`weight_norm`
        may take the operator's cheaper bound (a conv operator's from its kernels alone:
        25 ms a step on cifar-conv, against 0.6 s for the tight one from its spectra, which
        serving pays once). Its answers stay honest, their rounding terms a little larger.
        Nests; a tight bound already held for these weights is used as it is."""
        with _CACHE_LOCK:
            self._in_training += 1
        try:
            yield
        finally:
            with _CACHE_LOCK:
                self._in_training -= 1

    def _weight_norm(self, tight: bool) -> float:
        """:meth:`weight_norm` for the current weights (uncached), rounded up; ``tight``:
        the operator's tightest bound, else one that may be cheaper and looser."""
        raise NotImplementedError

    # ---- what concrete operators implement ------------------------------------------
    def _k(self, z: Tensor, transpose: bool) -> Tensor:
        """``(I − W) z`` or ``(I − W)ᵀ z``."""
        raise NotImplementedError

    def _prepare(self, alpha: float) -> Any:
        """Whatever ``_apply_inverse`` needs for this α (computed without autograd)."""
        raise NotImplementedError

    def _apply_inverse(self, data: Any, z: Tensor, transpose: bool) -> Tensor:
        """``V z`` (``Vᵀ z`` with ``transpose``) for ``z`` of ``(B, *z_shape)``, from
        ``_prepare``'s ``data``."""
        raise NotImplementedError

    def _inverse_injection(self, data: Any, x: Tensor, alpha: float) -> Tensor:
        """``V(α(U x + b))`` from ``_prepare``'s ``data`` (:meth:`Resolvent.inverse_injection`).
        By default through the injection; an operator whose ``V U`` is cheaper to apply
        than ``V`` (a convolution from a few image channels) overrides it."""
        return self._apply_inverse(data, self.bias(x).mul_(alpha), transpose=False)

    # ---- helpers ------------------------------------------------------------------
    def _weights_key(self) -> tuple:
        """Identifies the current weight *values*; every per-weight cache keys on it.

        The key changes whenever a parameter's value or ``m`` does, however it was written: an
        optimizer step, ``load_state_dict``, ``copy_``, ``.to()``, replacing ``.data`` or
        writing through it (which bypasses the version counter). Storage, version, dtype and
        device are compared first; if they are unchanged, every parameter is compared
        (``torch.equal``) with a copy taken when the key was issued. Inside
        :meth:`fixed_weights` the key validated at its entry is returned unchecked.

        Returns:
            ``(generation, identity)``: an opaque, hashable tuple.
        """
        if self._fixed:
            return self._fixed_key
        return self._check_weights()

    def _check_weights(self) -> tuple:
        params = [p.detach() for p in self.parameters()]
        # m is part of W (I − W = m I + ...) though not a parameter: a changed m is new weights.
        ident = (self.m, *((p.data_ptr(), p._version, p.dtype, p.device) for p in params))
        snap = self._snapshot
        if (
            snap is not None
            and snap[1] == ident
            and all(same_values(p, c) for p, c in zip(params, snap[2], strict=True))
        ):
            return snap[0]
        copies = [p.clone() for p in params]
        with _CACHE_LOCK:
            self._generation += 1
            key = (self._generation, ident)
            self._snapshot = (key, ident, copies)
        return key

    @contextmanager
    def fixed_weights(self) -> Iterator[tuple]:
        """Declare the weights constant for a while (a solve): validate the weights key once
        at entry and skip the comparison on every cache lookup inside, which would otherwise
        run once per iteration (conv operators look up their spectra on every application).

        Scopes nest: one opened inside another (``infer`` around its solve) takes the
        enclosing scope's key without comparing the weights again.

        Yields:
            the weights key. Writing weights inside the scope is a race, as it would be
            for the solve itself.
        """
        with _CACHE_LOCK:
            key = self._fixed_key if self._fixed else None
        if key is None:
            key = self._check_weights()
        with _CACHE_LOCK:
            self._fixed += 1
            self._fixed_key = key
        try:
            yield key
        finally:
            with _CACHE_LOCK:
                self._fixed -= 1

    def clear_cache(self) -> None:
        """Drop everything cached per weights (resolvents, spectra, norms); rebuilt on demand.

        Frees memory; never needed for correctness, since the caches follow the weight
        values (see :meth:`_weights_key`).
        """
        with _CACHE_LOCK:
            self._resolvents.clear()
        self._norm_cache = self._w_norm_cache = None
        for name in self.weight_caches:
            cache = getattr(self, name, None)
            if cache is not None:
                cache.clear()

    @torch.no_grad()
    def operator_norm_estimate(self, iters: int = 50, seed: int = 0) -> float:
        """``‖I − W‖₂`` by power iteration on ``(I − W)ᵀ(I − W)`` (FB's step bound,
        :meth:`~model_core.solvers.ForwardBackward.safe_alpha`)."""
        p = next(self.parameters())
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randn((1, *self.z_shape), generator=gen, dtype=p.dtype).to(p.device)
        v = v / v.norm()
        sigma = 0.0
        with self.fixed_weights():
            for _ in range(iters):
                w = self._k(self._k(v, transpose=False), transpose=True)
                sigma = w.norm().sqrt().item()
                v = w / w.norm().clamp_min(torch.finfo(w.dtype).tiny)
        return sigma
