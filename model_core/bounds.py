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
    op: MonotoneOperator, nonlin: Nonlinearity, z: Tensor, pre: Tensor
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

    Returns:
        ``(ĉ, bound)``: ``ĉ`` shaped like ``z``, and ``bound`` ``(B,)`` in the units of
        ``z`` (absolute ℓ2 distance, not relative), with its rounding terms
        (:data:`ROUNDING_SLACK`, :data:`ROUNDING_ULPS`). ``inf`` where the point is not
        finite. One multiply by ``W``.
    """
    z_hat = nonlin(pre)
    half_step = op.multiply(z - z_hat).mul_(0.5 / op.m)  # W r / 2m
    bound = _norms(half_step) * (1.0 + ROUNDING_SLACK)
    rho = rounding_error(_norms(z), _norms(pre), z.dtype)
    bound = bound + rho * (1.0 + op.weight_norm() / op.m)
    return z_hat - half_step, torch.where(torch.isfinite(bound), bound, math.inf)


def rounding_error(z_norm: Tensor, pre_norm: Tensor, dtype: torch.dtype) -> Tensor:
    """``ρ = ROUNDING_ULPS · eps · (‖z‖ + ‖p‖)``, the bound taken on how far the computed
    ``p = W z + U x + b`` lies from the exact one (§9, "Rounding"); the error bound here and
    the residual that decides ``converged`` (:func:`model_core.solvers.relative_residual`)
    both carry it.

    Args:
        z_norm, pre_norm: ``(B,)``, ``‖z‖`` and ``‖p‖`` per sample.
        dtype: the precision ``p`` was computed in (its ``eps``).

    Returns:
        ``(B,)``, in the units of ``z``.
    """
    return (ROUNDING_ULPS * torch.finfo(dtype).eps) * (z_norm + pre_norm)


def _norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


def logit_error_bounds(weight: Tensor, pool_norm: float, bound: Tensor) -> Tensor:
    """Per-class bound on ``|l_i − l*_i|``: ``‖w_i‖ · ‖pool‖ · bound`` (§9, eq. 16).

    Args:
        weight: ``(K, D)``, the head's ``W_out``.
        pool_norm: ℓ2 operator norm of the map from ``z`` to the head's input.
        bound: ``(B,)``, from :func:`equilibrium_error_bound`.

    Returns:
        ``(B, K)``, in logit units.
    """
    w_norms = torch.linalg.vector_norm(weight, dim=1)  # (K,)
    return bound[:, None] * (w_norms * pool_norm)[None, :]


def pairwise_distances(weight: Tensor) -> Tensor:
    """``(K, K)``: ``‖w_i − w_j‖`` between the rows of the head's ``W_out`` ``(K, D)``.

    Each from the difference itself. ``torch.cdist``'s default switches above 25 rows to
    ``√(‖w_i‖² + ‖w_j‖² − 2 w_i·w_j)``, whose cancellation loses about half the digits
    for close rows; an underestimated distance would shrink a rival's slack (eq. 16) and
    could prove a label that is not proven.
    """
    return torch.cdist(weight, weight, compute_mode="donot_use_mm_for_euclid_dist")


def rival_slack(
    logits: Tensor,
    weight: Tensor,
    pool_norm: float,
    bound: Tensor,
    distances: Tensor | None = None,
) -> Tensor:
    """How much each rival's margin may differ from the exact equilibrium's (§9, eq. 16).

    For the predicted class ``y`` and each class ``j``:
    ``|(l_y − l_j) − (l*_y − l*_j)| ≤ ‖w_y − w_j‖ · ‖pool‖ · bound``.

    Args:
        logits: ``(B, K)`` at the point the bound is about.
        weight, pool_norm, bound: as in :func:`logit_error_bounds`.
        distances: ``(K, K)`` :func:`pairwise_distances` of ``weight`` when the caller
            keeps them (``None``: computed here).

    Returns:
        ``(B, K)``, 0 in the predicted class's column.
    """
    pred = logits.argmax(dim=1)
    if distances is None:
        distances = pairwise_distances(weight)
    return distances[pred] * (pool_norm * bound)[:, None]  # (B, K): ‖w_y − w_j‖ · …


def proven_labels(
    logits: Tensor,
    weight: Tensor,
    pool_norm: float,
    bound: Tensor,
    slack: Tensor | None = None,
    distances: Tensor | None = None,
) -> Tensor:
    """``(B,)`` bool: the predicted label is the exact equilibrium's (§9, eq. 17).

    True when the top class leads every rival ``j`` by more than
    ``‖w_y − w_j‖ · ‖pool‖ · bound``. Never true for a non-finite bound or a tie.
    ``slack``: that product, ``(B, K)``, when the caller has it already
    (:func:`rival_slack`); ``distances``: as in :func:`rival_slack`.
    """
    pred = logits.argmax(dim=1)
    margins = logits.gather(1, pred[:, None]) - logits
    if slack is None:
        slack = rival_slack(logits, weight, pool_norm, bound, distances)
    clear = margins > slack
    clear.scatter_(1, pred[:, None], True)
    return clear.all(dim=1) & torch.isfinite(bound)
