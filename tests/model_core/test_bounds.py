"""Error bounds and proven labels (docs/math.md §9) against exact equilibria from dense solves.

Tiny fc, single-conv and multi-tier models in float64, random weights, inputs, m and
iteration counts. The exact ``z*`` comes from Peaceman–Rachford on the dense ``W`` (assembled
from space-domain convolutions in ``problems``, independently of the Fourier code), run until
its residual is at rounding level. A bound must never be below the true distance, and a
proven label must always be the exact equilibrium's.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from problems import dense_w_fc, dense_w_multitier, randomize_

from model_core import build_model
from model_core.bounds import (
    equilibrium_error_bound,
    pairwise_distances,
    proven_labels,
    rival_slack,
)
from model_core.solvers import solve_forward

CONFIGS = {
    "fc": {"arch": "fc", "in_channels": 1, "image_size": 6, "hidden": 12},
    "conv": {"arch": "conv", "in_channels": 2, "image_size": 6, "channels": 3},
    "multi_tier": {"arch": "multi_tier", "in_channels": 1, "image_size": 6, "channels": [2, 3]},
}


@functools.cache
def problem(arch: str, seed: int):
    """A random model, 8 random inputs and their exact equilibrium (cached across tests)."""
    model = random_model(arch, seed)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(8, CONFIGS[arch]["in_channels"], 6, 6, generator=gen, dtype=torch.float64)
    return model, x, dense_equilibrium(model, x)


def dense_equilibrium(model, x: torch.Tensor) -> torch.Tensor:
    """``z*`` of ``z = σ(W z + U x + b)`` by dense PR (α = 1) to rounding level."""
    op, nonlin = model.op, model.deq.nonlin
    w = dense_w_fc(op) if model.arch == "fc" else dense_w_multitier(op)
    n = w.shape[0]
    bias = op.bias(x).reshape(x.shape[0], n)
    v = torch.linalg.inv(2 * torch.eye(n, dtype=w.dtype) - w)  # (I + (I − W))⁻¹
    shape = (x.shape[0], *op.z_shape)
    z = u = torch.zeros_like(bias)
    for _ in range(4000):
        u_half = 2 * z - u
        z_half = (u_half + bias) @ v.T
        u = 2 * z_half - u_half
        z = nonlin(u.reshape(shape)).reshape_as(u)
    z_star = nonlin(((z @ w.T) + bias).reshape(shape))
    gap = (z_star.reshape_as(z) - z).norm(dim=1) / z.norm(dim=1).clamp_min(1e-300)
    assert (gap < 1e-11).all(), f"the dense reference did not converge: {gap.max():.2e}"
    return z_star


def random_model(arch: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    m = float(torch.empty(1).uniform_(0.05, 1.5, generator=gen))
    torch.manual_seed(seed)
    model = build_model({**CONFIGS[arch], "m": m}).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        if arch == "multi_tier":
            randomize_(model.op, seed)
    return model


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("method", ["peaceman_rachford", "forward_backward"])
def test_the_bound_holds_at_every_iterate_and_proven_labels_are_exact(arch, method):
    """At the first iteration and random later ones (PR up to 40, FB, whose safe α is
    small, up to 400) the bound on ``‖ĉ − z*‖``, the per-class logit bounds and the proven
    labels all hold against the dense equilibrium; and the plain bound ``‖ẑ − z*‖ ≤
    ‖W r‖ / m`` at ``ẑ = σ(W z + U x + b)`` holds too."""
    proven_seen = unproven_seen = 0
    most = 40 if method == "peaceman_rachford" else 400
    for seed in range(3):
        model, x, z_star = problem(arch, seed)
        logits_star = model.head(model.features(z_star)).detach()
        alpha = model.deq.resolve_alpha(method, None)
        gen = torch.Generator().manual_seed(200 + seed)
        for k in [1, *torch.randint(2, most + 1, (3,), generator=gen).tolist()]:
            z, stats, pre = solve_forward(
                model.op,
                model.deq.nonlin,
                model.op.bias(x).detach(),
                method=method,
                alpha=alpha,
                tol=1e-30,
                max_iter=k,
                preactivation=True,
                bias_scale=model.op.injection_scale(x),
                image=x,  # as infer's solve, whose bound this one must equal
            )
            centre, bound = equilibrium_error_bound(
                model.op, model.deq.nonlin, z, pre, stats.pre_scale
            )
            true = (centre - z_star).flatten(1).norm(dim=1)
            assert (true <= bound).all(), (k, (true - bound).max().item())
            z_hat = model.deq.nonlin(pre)
            plain = (z_hat - z_star).flatten(1).norm(dim=1)
            assert (plain <= 2 * bound).all()  # the ball's diameter
            r = model.infer(x, method=method, alpha=alpha, tol=1e-30, max_iter=k)
            torch.testing.assert_close(r.error_bound, bound, rtol=0, atol=0)
            err = (r.logits - logits_star).abs()
            assert (err <= r.logit_error_bound).all()
            proven = proven_labels(r.logits, model.head.weight, model.pool_norm(), bound)
            assert torch.equal(proven, r.label_proven)
            exact = logits_star.argmax(dim=1)
            assert torch.equal(r.labels[proven], exact[proven])
            # The radius accounts for the bound: never above the exact equilibrium's own.
            radius_star = model.certified_radius(logits_star)
            assert (r.certified_radius[proven] <= radius_star[proven] * (1 + 1e-9)).all()
            assert r.certified_radius[~proven].isnan().all()
            proven_seen += int(proven.sum())
            unproven_seen += int((~proven).sum())
    # The property was exercised both ways.
    assert proven_seen > 0 and unproven_seen > 0, (proven_seen, unproven_seen)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_stop_label_stops_each_sample_once_its_label_is_proven(arch):
    """``stop="label"``: every sample ends proven, on the exact label, and no later than the
    first iteration at which its label is proven (checked iteration by iteration)."""
    model, x, z_star = problem(arch, 0)
    exact = model.head(model.features(z_star)).argmax(dim=1)
    r = model.infer(x, stop="label", max_iter=500)
    assert r.label_proven.all()
    assert torch.equal(r.labels, exact)
    first = torch.full((8,), -1)
    for k in range(1, int(r.stats.iterations.max()) + 1):
        p = model.infer(x, tol=1e-30, max_iter=k).label_proven
        first[(first < 0) & p] = k
    assert torch.equal(r.stats.iterations, first)


def test_stop_logits_meets_its_accuracy_and_checks_its_arguments():
    model = random_model("fc", 3)
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    logits_star = model.head(model.features(dense_equilibrium(model, x)))
    r = model.infer(x, stop="logits", logit_tol=1e-4, max_iter=2000)
    assert (r.logit_error_bound.amax(dim=1) <= 1e-4).all()
    assert ((r.logits - logits_star).abs() <= 1e-4).all()
    for kwargs, match in (
        ({"stop": "logits"}, "logit_tol"),
        ({"stop": "logits", "logit_tol": 0.0}, "logit_tol"),
        ({"stop": "logits", "logit_tol": math.inf}, "logit_tol"),
        ({"stop": "label", "logit_tol": 1e-3}, "logit_tol applies"),
        ({"stop": "residual"}, "stop must be one of tol, label, logits"),
        ({"stop": "label", "check_every": 0}, "check_every"),
    ):
        with pytest.raises(ValueError, match=match):
            model.infer(x, **kwargs)


def test_a_diverged_sample_has_an_infinite_bound_and_no_proof():
    model = random_model("fc", 1)
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    x[1] = math.nan
    r = model.infer(x, stop="label", max_iter=50)
    assert r.error_bound[1] == math.inf
    assert r.label_proven.tolist() == [True, False, True]
    assert math.isnan(r.certified_radius[1])


def test_rival_distances_keep_their_digits_with_many_classes():
    """``‖w_y − w_j‖`` from the differences themselves. With more than 25 classes
    ``torch.cdist`` by default takes ``√(‖w_i‖² + ‖w_j‖² − 2 w_i·w_j)``: for two rows 1e-4
    apart at norm 1 that loses every digit in float32 (it read 0 or about 5e-4 here), and a
    distance read too small shrinks the slack of eq. (16): a label "proven" on a margin
    thinner than the bound allows."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(30, 64, generator=gen)
    w = w / w.norm(dim=1, keepdim=True)
    w[1] = w[0] + 1e-4 * torch.randn(64, generator=gen) / 8.0
    exact = torch.cdist(w.double(), w.double(), compute_mode="donot_use_mm_for_euclid_dist")
    got = pairwise_distances(w)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=0)
    assert got[0, 1] > 0 and torch.equal(got.diagonal(), torch.zeros(30))
    # The slack of the rival class 1 for a sample predicted 0, at bound 1 and ‖pool‖ 1.
    logits = torch.zeros(1, 30)
    logits[0, 0] = 1.0
    slack = rival_slack(logits, w, 1.0, torch.ones(1))
    assert slack[0, 1].item() == pytest.approx(exact[0, 1].item(), rel=1e-5)
    # A margin 10% below that slack proves nothing.
    logits[0, 1] = 1.0 - 0.9 * exact[0, 1].item()
    assert not proven_labels(logits, w, 1.0, torch.ones(1)).item()
