"""How far an answer is from the exact equilibrium, at any iterate (docs/math.md §9).

``I − W`` is m-strongly monotone and σ is the proximal map of a convex function, so from any
point ``z`` with ``p = W z + U x + b``, the point ``ẑ = σ(p)`` and its step ``r = z − ẑ``
locate the unique equilibrium ``z*`` in a ball:

    ‖z* − (ẑ − W r / 2m)‖ ≤ ‖W r‖ / 2m                               (§9, eq. 15)

whatever solver produced ``z`` and however far it is from converged. The ball's centre is the
answer's point; through a linear head ``l = W_out pool(·) + b_out`` the radius bounds every
logit and every logit difference, so a label is **proven** (equal to the exact
equilibrium's) once its margin over each rival exceeds that rival's share of the radius
(eqs. 16, 17).

Everything here costs at most one multiply by ``W`` per call, and works per sample.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .nonlinearity import Nonlinearity
from .operators import MonotoneOperator

# The bound is evaluated in the model's own precision, so it carries two rounding terms.
# (1) Relative: the norm and the product W r are off by about 1e-6 in float32; the bound is
# inflated by ROUNDING_SLACK, a thousand times that.
ROUNDING_SLACK = 1e-3
# (2) Absolute: the computed p = W z + U x + b is off from the exact one by some ρ, and σ,
# being non-expansive, passes at most ρ on to ẑ; the centre then moves by at most
# ρ (1 + ‖W‖/2m) and the radius grows by at most ρ ‖W‖/2m (docs/math.md §9). ρ is taken
# as ROUNDING_ULPS · eps · (‖z‖ + ‖p‖). Measured on both default models in float32 (64 test
# images at iteration 9, against a float64 evaluation at the same z), the rounding of σ(p)
# was at most 2.3 · eps · (‖z‖ + ‖p‖): 16 is seven times that. In float32 the term is about
# 2% of the bound when a label is proven.
ROUNDING_ULPS = 16.0


def equilibrium_error_bound(
    op: MonotoneOperator,
    nonlin: Nonlinearity,
    z: Tensor,
    pre: Tensor,
    pre_scale: Tensor | None = None,
    *,
    product: MonotoneOperator | None = None,
) -> tuple[Tensor, Tensor]:
    """The point ``ĉ = ẑ − W r / 2m`` and a per-sample bound on ``‖ĉ − z*‖`` (§9, eq. 15).

    ``ẑ = σ(p)``, ``r = z − ẑ``; ``z*`` lies in the ball of centre ``ĉ`` and radius
    ``‖W r‖ / 2m`` (half the plain bound ``‖ẑ − z*‖ ≤ ‖W r‖ / m``, and the centre is the
    better estimate of ``z*``).

    Args:
        op: the monotone operator (``I − W ⪰ m I``).
        nonlin: σ, a proximal operator.
        z: ``(B, *op.z_shape)``, any point (an iterate of any solver).
        pre: ``(B, *op.z_shape)``, ``W z + U x + b`` at that point (every solver has it:
            :func:`~model_core.solvers.solve_forward` with ``preactivation=True``).
        pre_scale: ``(B,)``, the scale of the sums that formed ``pre``
            (:func:`rounding_error`; ``stats.pre_scale`` of that solve). ``None``: 0, right
            only where ``pre`` was formed without cancellation.
        product: the same ``W`` in a lower precision (a float32 model's operator, for a
            float64 ``z`` and ``pre``), which forms ``W r`` instead of ``op``: ``r`` is
            rounded to its dtype, and the bound adds that product's error against the
            exact ``W r`` (:func:`product_error`; docs/math.md §9, "``W r`` in a lower
            precision"). Rows where that error passes ``ROUNDING_SLACK / 2`` of ``‖W
            r‖`` are formed by ``op`` after all. ``None``: ``op`` forms ``W r``.

    Returns:
        ``(ĉ, bound)``: ``ĉ`` shaped like ``z``, and ``bound`` ``(B,)`` in the units of
        ``z`` (absolute ℓ2 distance, not relative), with its rounding terms
        (:data:`ROUNDING_SLACK`, :data:`ROUNDING_ULPS`). ``inf`` where the point is not
        finite. One multiply by ``W`` (with ``product``, one in its precision, and one
        in ``z``'s for the rows it leaves).
    """
    z_hat = nonlin(pre)
    step = z - z_hat  # r
    w_norm = op.weight_norm()
    if product is None:
        half_step = op.multiply(step).mul_(0.5 / op.m)  # W r / 2m
        bound = _norms(half_step) * (1.0 + ROUNDING_SLACK)
    else:
        low = step.to(next(product.parameters()).dtype)
        wr = product.multiply(low)
        half_step = wr.to(z.dtype).mul_(0.5 / op.m)  # (W r)_low / 2m, exactly
        wr_norm = _norms(half_step) * (2.0 * op.m)
        # ĉ moves by δ/2m from the centre of the exact W r, and the radius grows by as
        # much: ‖z* − ĉ‖ ≤ (‖(W r)_low‖ + 2‖δ‖) / 2m.
        delta = product_error(_norms(low).to(z.dtype), wr_norm, low.dtype, w_norm)
        # Where that term would pass the relative slack the bound carries anyway (r near
        # W's null space: ‖W r‖ ≪ ‖W‖ ‖r‖), W r in z's own precision instead, so that the
        # bound is never much above what that would give.
        again = 2.0 * delta > ROUNDING_SLACK * wr_norm
        if bool(again.any()):
            rows = again.nonzero().squeeze(1)
            exact = op.multiply(step.index_select(0, rows)).mul_(0.5 / op.m)
            half_step = half_step.index_copy(0, rows, exact)
            delta = delta.masked_fill(again, 0.0)
        bound = _norms(half_step) * (1.0 + ROUNDING_SLACK) + delta / op.m
    rho = rounding_error(_norms(z), _norms(pre), z.dtype, pre_scale)
    bound = bound + rho * (1.0 + w_norm / op.m)
    return z_hat - half_step, torch.where(torch.isfinite(bound), bound, math.inf)


def product_error(
    step_norm: Tensor, product_norm: Tensor, dtype: torch.dtype, weight_norm: float
) -> Tensor:
    """``(B,)``: a bound on ``‖δ‖``, how far ``W r`` formed in ``dtype`` from ``r`` rounded
    to ``dtype`` lies from the exact ``W r`` of the unrounded ``r`` (docs/math.md §9,
    "``W r`` in a lower precision").

    Two parts: the product's own rounding, with the rounding model of a product ``W z``
    (:func:`rounding_error` with ``S = ‖W‖ ‖r‖``: ``16 eps (‖r‖ + ‖W r‖ + ‖W‖ ‖r‖)``,
    seven times what was measured), and the rounding of ``r`` into ``dtype``, at most
    ``eps/2`` of each entry, which ``W`` turns into at most ``eps/2 · ‖W‖ ‖r‖`` (taken as
    ``eps ‖W‖ ‖r‖``, which also covers the subtraction that formed ``r`` in the higher
    precision).

    Args:
        step_norm: ``(B,)``, ``‖r‖`` of ``r`` as rounded to ``dtype``.
        product_norm: ``(B,)``, ``‖W r‖`` as formed in ``dtype``.
        dtype: the precision of the product (its ``eps``).
        weight_norm: a bound on ``‖W‖₂`` (:meth:`MonotoneOperator.weight_norm`).

    Returns:
        ``(B,)``, in the units of ``r``.
    """
    scaled = weight_norm * step_norm
    cast = torch.finfo(dtype).eps * scaled
    return rounding_error(step_norm, product_norm, dtype, scaled) + cast


def rounding_error(
    z_norm: Tensor, pre_norm: Tensor, dtype: torch.dtype, pre_scale: Tensor | None = None
) -> Tensor:
    """``ρ = ROUNDING_ULPS · eps · (‖z‖ + ‖p‖ + S)``, the bound taken on how far the computed
    ``p = W z + U x + b`` lies from the exact one (§9, "Rounding"); the error bound here and
    the residual that decides ``converged`` (:func:`model_core.solvers.relative_residual`)
    both carry it.

    ``S`` is the scale of the sums that formed ``p`` (``pre_scale``), which can be far
    larger than ``‖p‖`` when they cancel: ``‖W‖ ‖z‖`` for a product ``W z``, ``‖|U||x| +
    |b|‖`` for the injection, and Peaceman–Rachford's ``p`` from its resolvent identity
    carries the resolvent's rounding times ``(1 + α‖I − W‖)/α``
    (:meth:`~model_core.solvers.SplittingMethod.pre_scale_forward`). Measured in float32
    against float64 on the four default architectures, the resolvent's application was off
    by at most 2.3 ``eps`` times its argument, ``W z`` by 1.2 ``eps ‖W‖ ‖z‖`` and ``U x + b``
    by 0.14 ``eps ‖|U||x| + |b|‖``: ``ROUNDING_ULPS`` is seven times the largest.

    Args:
        z_norm, pre_norm: ``(B,)``, ``‖z‖`` and ``‖p‖`` per sample.
        dtype: the precision ``p`` was computed in (its ``eps``).
        pre_scale: ``(B,)``, ``S``; ``None``: 0.

    Returns:
        ``(B,)``, in the units of ``z``.
    """
    scale = z_norm + pre_norm if pre_scale is None else z_norm + pre_norm + pre_scale
    return (ROUNDING_ULPS * torch.finfo(dtype).eps) * scale


def _norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


def logit_error_bounds(
    weight: Tensor, pool_norm: float, bound: Tensor, rounding: Tensor | None = None
) -> Tensor:
    """Per-class bound on ``|l_i − l*_i|``: ``‖w_i‖ · ‖pool‖ · bound`` (§9, eq. 16), plus
    the head's own rounding.

    Args:
        weight: ``(K, D)``, the head's ``W_out``.
        pool_norm: ℓ2 operator norm of the map from ``z`` to the head's input.
        bound: ``(B,)``, from :func:`equilibrium_error_bound`.
        rounding: ``(B, K)``, :func:`head_rounding` (``None``: exact arithmetic).

    Returns:
        ``(B, K)``, in logit units.
    """
    out = bound[:, None] * (row_norms(weight) * pool_norm)[None, :]
    return out if rounding is None else out + rounding


def _up(value: Tensor, like: Tensor) -> Tensor:
    """A float64 ``value`` in ``like``'s dtype, never below it (:func:`cast_above`)."""
    return cast_above(value, like.dtype)


def cast_above(value: Tensor, dtype: torch.dtype) -> Tensor:
    """A float64 bound ``value`` (non-negative) in ``dtype``, never below it: the cast
    rounds to nearest, so it is raised by two units in ``dtype``'s last place first."""
    return (value * (1.0 + 2.0 * torch.finfo(dtype).eps)).to(dtype)


def row_norms(weight: Tensor) -> Tensor:
    """``(K,)``: ``‖w_i‖`` of the head's ``W_out`` ``(K, D)``, in float64 and rounded up into
    its dtype (an upper bound, as every bound here needs)."""
    return _up(torch.linalg.vector_norm(weight.double(), dim=1), weight)


def pairwise_distances(weight: Tensor) -> Tensor:
    """``(K, K)``: ``‖w_i − w_j‖`` between the rows of the head's ``W_out`` ``(K, D)``.

    Each from the difference itself, in float64, rounded up into ``weight``'s dtype.
    ``torch.cdist``'s default switches above 25 rows to ``√(‖w_i‖² + ‖w_j‖² − 2 w_i·w_j)``,
    whose cancellation loses about half the digits for close rows; an underestimated
    distance would shrink a rival's slack (eq. 16) and could prove a label that is not
    proven.
    """
    w = weight.double()
    return _up(torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist"), weight)


def head_rounding(
    logits: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    features_norm: Tensor,
    centre_norm: Tensor,
    pool_norm: float,
    pool_window: int,
) -> Tensor:
    """``(B, K)``: how far each computed logit may lie from the exact head at the exact
    centre, from the rounding of the head's own arithmetic (§9, "Rounding").

    The logits ``l = W_out pool(ĉ) + b_out`` are computed in the model's precision: the
    centre ``ĉ = ẑ − W r/2m`` rounds once, the average pool sums ``pool_window`` values
    and the head ``D``. By the standard bound for a sum of ``n`` products in any order,
    ``|fl(s) − s| ≤ γ_n Σ|terms|`` with ``γ_n = n u / (1 − n u)`` (``u = eps/2``), and by
    Cauchy–Schwarz ``Σ_k |w_ik| |f_k| ≤ ‖w_i‖ ‖f‖``: each logit is within ``γ_n (‖w_i‖
    (‖f‖ + ‖pool‖ ‖ĉ‖) + |b_i| + |l_i|)``, ``n = D + pool_window + 3``. Without it two
    near rows of a large head could "prove" a label by a margin smaller than the
    logits' own rounding (a float32 head of norm 1e3 did in 9 of 24 trials).

    Args:
        logits: ``(B, K)`` as computed; ``weight``: ``(K, D)``, ``W_out``; ``bias``:
            ``(K,)``, ``b_out`` (or ``None``).
        features_norm: ``(B,)``, ``‖pool(ĉ)‖``; ``centre_norm``: ``(B,)``, ``‖ĉ‖``.
        pool_norm: ``‖pool‖``; ``pool_window``: values each pooled feature averages.

    Returns:
        ``(B, K)``, in logit units, in ``logits``' dtype.
    """
    unit = torch.finfo(logits.dtype).eps / 2.0
    n = weight.shape[1] + pool_window + 3
    gamma = n * unit / (1.0 - n * unit)
    scale = row_norms(weight)[None, :] * (features_norm + pool_norm * centre_norm)[:, None]
    scale = scale + logits.abs()
    if bias is not None:
        scale = scale + bias.detach().abs()[None, :]
    return gamma * scale


def rival_slack(
    logits: Tensor,
    weight: Tensor,
    pool_norm: float,
    bound: Tensor,
    distances: Tensor | None = None,
    rounding: Tensor | None = None,
) -> Tensor:
    """How much each rival's margin may differ from the exact equilibrium's (§9, eq. 16).

    For the predicted class ``y`` and each class ``j``:
    ``|(l_y − l_j) − (l*_y − l*_j)| ≤ ‖w_y − w_j‖ · ‖pool‖ · bound``, plus the rounding
    of the two logits (``rounding_y + rounding_j``).

    Args:
        logits: ``(B, K)`` at the point the bound is about.
        weight, pool_norm, bound: as in :func:`logit_error_bounds`.
        distances: ``(K, K)`` :func:`pairwise_distances` of ``weight`` when the caller
            keeps them (``None``: computed here).
        rounding: ``(B, K)``, :func:`head_rounding` (``None``: exact arithmetic).

    Returns:
        ``(B, K)``, 0 in the predicted class's column.
    """
    pred = logits.argmax(dim=1)
    if distances is None:
        distances = pairwise_distances(weight)
    slack = distances[pred] * (pool_norm * bound)[:, None]  # (B, K): ‖w_y − w_j‖ · …
    if rounding is not None:
        slack = slack + rounding + rounding.gather(1, pred[:, None])
        slack = slack.scatter(1, pred[:, None], 0.0)
    # Raised past its own few roundings (and the margin's, eq. 17 compares the two in
    # this dtype), so that a margin above it is above the exact slack.
    return slack * (1.0 + 4.0 * torch.finfo(slack.dtype).eps)


def proven_labels(
    logits: Tensor,
    weight: Tensor,
    pool_norm: float,
    bound: Tensor,
    slack: Tensor | None = None,
    distances: Tensor | None = None,
    rounding: Tensor | None = None,
) -> Tensor:
    """``(B,)`` bool: the predicted label is the exact equilibrium's (§9, eq. 17).

    True when the top class leads every rival ``j`` by more than
    ``‖w_y − w_j‖ · ‖pool‖ · bound`` (plus the logits' rounding). Never true for a
    non-finite bound or a tie. ``slack``: that, ``(B, K)``, when the caller has it already
    (:func:`rival_slack`); ``distances``, ``rounding``: as in :func:`rival_slack`.
    """
    pred = logits.argmax(dim=1)
    margins = logits.gather(1, pred[:, None]) - logits
    if slack is None:
        slack = rival_slack(logits, weight, pool_norm, bound, distances, rounding)
    clear = margins > slack
    clear.scatter_(1, pred[:, None], True)
    return clear.all(dim=1) & torch.isfinite(bound)
