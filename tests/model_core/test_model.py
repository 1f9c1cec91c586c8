"""Classifiers: config validation, heads, infer, Lipschitz bound, certified radius, α search."""

from __future__ import annotations

import math

import pytest
import torch

from model_core import SolverSettings, build_model, tune_alpha
from model_core.operators.spectral import transfer
from model_core.solvers import ForwardBackward

FC = {"arch": "fc", "in_channels": 1, "image_size": 6, "hidden": 8}
CONV = {"arch": "conv", "in_channels": 2, "image_size": 6, "channels": 4}
MT = {"arch": "multi_tier", "in_channels": 1, "image_size": 6, "channels": [3, 4]}


@pytest.mark.parametrize(
    "config, match",
    [
        ({"arch": "rnn", "in_channels": 1, "image_size": 4}, "arch"),
        ({"arch": "fc", "in_channels": 1, "image_size": 4}, "hidden"),
        ({"arch": "conv", "in_channels": 1, "image_size": 4, "channels": [3]}, "channels"),
        ({"arch": "multi_tier", "in_channels": 1, "image_size": 4, "channels": 3}, "channels"),
        ({**FC, "image_size": 0}, "image_size"),
        ({**FC, "m": 0.0}, "m must be > 0"),
        ({**FC, "solver": {"method": "newton"}}, "unknown solver"),
        ({**FC, "solver": {"alpha": -1.0}}, "alpha"),
        ({**FC, "solver": {"tol": 0}}, "tol"),
        ({**FC, "solver": {"speed": 3}}, "unknown solver settings"),
        # 28 + 2 = 30 -> 16 -> 9 is odd: a 4th tier cannot follow
        ({"arch": "multi_tier", "in_channels": 1, "image_size": 28, "channels": [2] * 4}, "odd"),
    ],
)
def test_bad_configs_raise_value_error(config, match):
    with pytest.raises(ValueError, match=match):
        build_model(config)


@pytest.mark.parametrize("config", [FC, CONV, MT], ids=lambda c: c["arch"])
def test_infer_shapes_and_agreement_with_forward(config):
    torch.manual_seed(0)
    model = build_model({**config, "solver": {"tol": 1e-8, "max_iter": 1000}}).double()
    x = torch.randn(5, config["in_channels"], 6, 6, dtype=torch.float64)
    out = model.infer(x)
    assert out.logits.shape == (5, 10)
    assert out.stats.iterations.shape == (5,) and out.stats.iterations.dtype == torch.int64
    assert out.stats.converged.all()
    assert out.certified_radius.shape == (5,) and (out.certified_radius >= 0).all()
    assert out.labels.shape == (5,)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out.logits, rtol=1e-6, atol=1e-7)
    # train-mode forward (autograd on) gives the same logits and fills the residual
    logits = model(x)
    torch.testing.assert_close(logits.detach(), out.logits, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(model.deq.last_forward_stats.residual).all()


def test_infer_overrides_do_not_change_defaults():
    model = build_model(CONV)
    x = torch.randn(3, 2, 6, 6)
    out = model.infer(x, method="forward_backward", tol=1e-3, max_iter=7)
    assert out.stats.method == "forward_backward" and out.stats.max_iter == 7
    assert out.stats.alpha == pytest.approx(ForwardBackward.safe_alpha(model.op))
    assert model.deq.settings.method == "peaceman_rachford"
    assert model.infer(x).stats.tol == model.deq.settings.tol


def test_solver_settings_are_one_public_view():
    """Read, assigned and changed through the classifier; the config a checkpoint stores
    follows; a bad change raises and leaves them as they were; ``solver_alpha`` is the α a
    solve takes: the settings', else the method's safe α for the current weights."""
    model = build_model(FC)
    assert model.solver_settings is model.deq.settings
    model.set_solver(alpha=0.5, backward_method="forward_backward")
    assert model.config["solver"] == model.solver_settings.to_dict()
    assert (model.solver_alpha(), model.solver_settings.backward().alpha) == (0.5, None)
    assert model.solver_alpha(backward=True) == ForwardBackward.safe_alpha(model.op)
    before = model.solver_settings
    with pytest.raises(ValueError, match="unknown solver settings"):
        model.set_solver(speed=3)
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        model.set_solver(method="newton")
    with pytest.raises(TypeError, match="SolverSettings"):
        model.solver_settings = {"alpha": 2.0}
    assert model.solver_settings is before and model.config["solver"] == before.to_dict()
    model.solver_settings = SolverSettings(method="forward_backward", alpha=None)
    assert model.config["solver"]["method"] == "forward_backward"
    assert model.solver_alpha() == ForwardBackward.safe_alpha(model.op)
    assert model.solver_settings.solver is ForwardBackward


def test_lipschitz_bound_fc_matches_dense_norms():
    torch.manual_seed(1)
    model = build_model({**FC, "m": 2.0})
    expect = (
        torch.linalg.matrix_norm(model.head.weight, 2)
        * torch.linalg.matrix_norm(model.op.U.weight, 2)
        / 2.0
    )
    assert model.lipschitz_bound() == pytest.approx(expect.item(), rel=1e-6)


def test_conv_injection_norm_is_exact_for_the_circular_conv():
    """The FFT value equals the dense spectral norm of the circular conv on the padded grid."""
    torch.manual_seed(2)
    model = build_model(CONV).double()
    s = model.op.sizes[0]
    w = model.op.U.weight
    c = w.shape[1]
    eye = torch.eye(c * s * s, dtype=torch.float64).reshape(-1, c, s, s)
    dense = torch.nn.functional.conv2d(
        torch.nn.functional.pad(eye, (1, 1, 1, 1), mode="circular"), w
    )
    dense = dense.reshape(c * s * s, -1).T
    assert model.op.injection_norm() == pytest.approx(
        torch.linalg.matrix_norm(dense, 2).item(), rel=1e-9
    )
    assert transfer(w, s).shape == (s * (s // 2 + 1), w.shape[0], c)


@pytest.mark.parametrize("config", [FC, CONV, MT], ids=lambda c: c["arch"])
def test_certified_radius_holds_against_attacks(config):
    """No perturbation inside the radius flips a label: random and gradient directions."""
    torch.manual_seed(3)
    model = build_model({**config, "solver": {"tol": 1e-9, "max_iter": 3000}}).double()
    x = torch.randn(6, config["in_channels"], 6, 6, dtype=torch.float64)
    out = model.infer(x)
    radius = out.certified_radius
    assert (radius > 0).all()
    # the bound itself: |Δlogit margin| <= ‖w_y − w_j‖ · L_z · ‖δ‖ along the worst direction
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    top2 = logits.topk(2, dim=1).values
    (top2[:, 0] - top2[:, 1]).sum().backward()
    direction = -xg.grad / xg.grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    for scale in (0.5, 0.99):
        for d in (direction, torch.randn_like(x)):
            d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            moved = model.infer(x + scale * radius.view(-1, 1, 1, 1) * d)
            assert torch.equal(moved.labels, out.labels)


@pytest.mark.parametrize("config", [FC, CONV, MT], ids=lambda c: c["arch"])
def test_a_radius_only_where_the_label_is_proven_and_never_above_the_equilibriums(config):
    """After one iteration nothing has converged: a sample gets a radius exactly where its
    label is proven (§9), and that radius, shrunk by the error bound, is never above the one
    of the converged solve; solved tightly, every sample is proven and the radius is the
    formula's (§7) up to the vanishing slack."""
    torch.manual_seed(6)
    model = build_model(config).double()
    x = torch.randn(6, config["in_channels"], 6, 6, dtype=torch.float64)
    cut = model.infer(x, max_iter=1, tol=1e-6)
    assert cut.stats.converged.tolist() == [False] * 6
    assert torch.equal(cut.certified_radius.isnan(), ~cut.label_proven)
    full = model.infer(x, tol=1e-9, max_iter=3000)
    assert full.stats.converged.all() and full.label_proven.all()
    torch.testing.assert_close(full.certified_radius, model.certified_radius(full.logits))
    assert (full.certified_radius > 0).all()
    p = cut.label_proven
    assert torch.equal(cut.labels[p], full.labels[p])
    assert (cut.certified_radius[p] <= full.certified_radius[p] * (1 + 1e-6)).all()


def _edit_weights(model, how: str) -> None:
    """Add 0.2·N(0, 1) to every operator parameter, written the way ``how`` names."""
    gen = torch.Generator().manual_seed(11)
    params = dict(model.op.named_parameters())
    new = {k: p.detach() + 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
           for k, p in params.items()}  # fmt: skip
    if how == "load_state_dict":
        model.op.load_state_dict({**model.op.state_dict(), **new})
        return
    if how == "optimizer":
        opt = torch.optim.SGD(model.op.parameters(), lr=1.0)
        for k, p in params.items():
            p.grad = p.detach() - new[k]  # one SGD step lands exactly on new
        opt.step()
        return
    for k, p in params.items():
        if how == ".data":
            p.data.add_(new[k] - p.data)  # bypasses the version counter
        elif how == ".data =":
            p.data = new[k].clone()
        else:  # copy_
            with torch.no_grad():
                p.copy_(new[k])


@pytest.mark.parametrize(
    "how, method",
    [
        (h, "peaceman_rachford")
        for h in (".data", ".data =", "copy_", "load_state_dict", "optimizer")
    ]
    + [(".data", "forward_backward")],  # FB reads the spectra and its step bound, not V
)
@pytest.mark.parametrize("config", [FC, CONV, MT], ids=lambda c: c["arch"])
def test_weight_edits_reach_the_next_solve(config, how, method):
    """However weights change after an ``infer`` (EMA and weight clipping write through
    ``.data``), the next ``infer`` equals a fresh copy's with the same weights: no cached
    resolvent, spectrum, FB step or injection norm of the old weights survives, and the
    residual reported is the true one for the new weights."""
    torch.manual_seed(0)
    model = build_model(config).double()
    x = torch.randn(5, config["in_channels"], 6, 6, dtype=torch.float64)
    model.infer(x, method=method)
    _edit_weights(model, how)
    out = model.infer(x, method=method)
    fresh = build_model(config).double()
    fresh.load_state_dict(model.state_dict())
    ref = fresh.infer(x, method=method)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.stats.residual, ref.stats.residual)
    assert out.stats.alpha == ref.stats.alpha
    assert torch.equal(out.certified_radius.nan_to_num(-1), ref.certified_radius.nan_to_num(-1))
    z, stats, _ = model.deq.solve(x, method=method)  # the residual against a direct evaluation
    true = z - fresh.deq.nonlin(fresh.op.multiply(z) + fresh.op.bias(x))
    true = true.flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)
    torch.testing.assert_close(stats.residual, true, rtol=1e-9, atol=1e-12)
    assert torch.equal(stats.converged, stats.residual <= model.deq.settings.tol)


@pytest.mark.parametrize("config", [FC, CONV, MT], ids=lambda c: c["arch"])
def test_a_changed_monotonicity_parameter_reaches_the_next_solve(config):
    """``m`` is part of ``W`` (``I − W = m I + AᵀA − B + Bᵀ``) without being a parameter: after
    ``op.m`` changes, no resolvent or spectrum of the old ``W`` serves. (A stale one gave
    logits 0.29 (fc), 0.08 (conv) and 0.07 (multi-tier) away at tol 1e-9, all converged.)"""
    torch.manual_seed(0)
    model = build_model(config).double()
    x = torch.randn(5, config["in_channels"], 6, 6, dtype=torch.float64)
    model.infer(x)
    model.op.m = model.op.m * 0.5
    out = model.infer(x, tol=1e-9, max_iter=3000)
    fresh = build_model(config).double()
    fresh.load_state_dict(model.state_dict())
    fresh.op.m = model.op.m
    ref = fresh.infer(x, tol=1e-9, max_iter=3000)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.stats.residual, ref.stats.residual)


def test_tune_alpha_returns_the_best_of_its_curve_and_leaves_the_model_alone():
    torch.manual_seed(4)
    model = build_model(CONV)
    x = torch.randn(8, 2, 6, 6)
    model.infer(x)
    cached = dict(model.op._resolvents)
    result = tune_alpha(model, x, grid=5, refine=4)
    alphas = [r["alpha"] for r in result.curve]
    assert alphas == sorted(alphas) and len(alphas) >= 6
    best = min(
        result.curve,
        key=lambda r: (r["iterations_mean"], r["iterations_max"], r["residual_mean"], r["alpha"]),
    )
    assert result.alpha == best["alpha"]
    assert result.baseline["alpha"] == 1.0
    assert result.curve and all(math.isfinite(r["time_s"]) for r in result.curve)
    assert model.deq.settings.alpha == 1.0
    assert dict(model.op._resolvents) == cached  # the serving resolvent was not evicted
    model.set_solver(alpha=result.alpha)
    assert model.infer(x).stats.iterations.double().mean() == pytest.approx(best["iterations_mean"])


def test_tune_alpha_with_targets_tunes_the_backward_problem():
    """With labels, the curve is the implicit backward solve's: each row's mean equals the
    backward iterations a training step at that α reports, and the best row sets
    ``backward_alpha`` without touching the forward α."""
    torch.manual_seed(5)
    model = build_model(CONV)
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 10, (8,))
    result = tune_alpha(model, x, targets=y, grid=5, refine=2)
    assert result.direction == "backward"
    assert result.baseline["alpha"] == 1.0  # the backward α follows the forward one
    best = min(
        result.curve,
        key=lambda r: (r["iterations_mean"], r["iterations_max"], r["residual_mean"], r["alpha"]),
    )
    assert result.alpha == best["alpha"]
    assert model.deq.settings.backward_alpha is None
    for row in (result.curve[0], result.curve[-1]):
        model.set_solver(backward_alpha=row["alpha"])
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        stats = model.deq.last_backward_stats
        assert stats.alpha == row["alpha"]
        assert model.deq.last_forward_stats.alpha == 1.0
        assert stats.iterations.double().mean().item() == pytest.approx(row["iterations_mean"])
    # The backward curve is not the forward one: the two problems differ.
    forward = tune_alpha(model, x, grid=5, refine=2)
    assert [r["iterations_mean"] for r in forward.curve] != [
        r["iterations_mean"] for r in result.curve
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tune_alpha_does_not_depend_on_the_clock(monkeypatch, seed):
    """Mean iterations tie often between α's; a tie must be broken by the solves, not by
    wall time, or two runs (two DDP ranks, a resumed run) pick different α's."""
    import random

    import model_core.tuning as tuning

    torch.manual_seed(0)
    model = build_model(
        {"arch": "fc", "in_channels": 1, "image_size": 6, "hidden": 12, "num_classes": 3}
    )
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(3))  # whole counts
    calm = tune_alpha(model, x, grid=9, refine=4)
    fewest = min(r["iterations_mean"] for r in calm.curve)
    assert sum(r["iterations_mean"] == fewest for r in calm.curve) >= 2  # a tie to break
    rng = random.Random(seed)
    clock = [0.0]

    def erratic() -> float:  # a busy machine: each call advances the clock at random
        clock[0] += rng.uniform(0.0, 1.0)
        return clock[0]

    monkeypatch.setattr(tuning.time, "perf_counter", erratic)
    assert tune_alpha(model, x, grid=9, refine=4).alpha == calm.alpha


def test_infer_moves_input_to_the_model_device_and_dtype():
    model = build_model(FC).double()
    out = model.infer(torch.randn(2, 1, 6, 6))  # float32 in, float64 model
    assert out.logits.dtype == torch.float64


@pytest.mark.parametrize("config", [FC, CONV], ids=["fc", "conv"])
def test_head_norms_are_kept_and_follow_the_head_weights(config):
    """``‖W_out‖₂`` and the rival distances are kept per the head's weight values: every write
    (in place, through ``.data``, ``load_state_dict``) reaches the bound and the radius."""
    torch.manual_seed(4)
    model = build_model(config)
    x = torch.randn(3, config["in_channels"], 6, 6)

    def expected_lipschitz():
        w = torch.linalg.matrix_norm(model.head.weight.detach(), 2).item()
        return w * model.pool_norm() * model.op.injection_norm() / model.op.m

    first = model.lipschitz_bound()
    assert first == pytest.approx(expected_lipschitz(), rel=1e-6)
    held = model._head_cache
    assert model.lipschitz_bound() == first and model._head_cache is held  # a hit
    model.head.weight.data.mul_(3.0)  # bypasses the version counter
    assert model.lipschitz_bound() == pytest.approx(3.0 * first, rel=1e-6)
    with torch.no_grad():
        model.head.weight[0, 0] += 1.0  # in place
    assert model.lipschitz_bound() == pytest.approx(expected_lipschitz(), rel=1e-6)
    other = build_model(config)
    model.head.load_state_dict(other.head.state_dict())
    assert model.lipschitz_bound() == pytest.approx(expected_lipschitz(), rel=1e-6)
    # The radius of infer reads the current rows: the same as a model built with them.
    twin = build_model(config)
    twin.load_state_dict(model.state_dict())
    got, want = model.infer(x), twin.infer(x)
    assert torch.equal(got.logits, want.logits)
    torch.testing.assert_close(got.certified_radius, want.certified_radius, equal_nan=True)


def test_infer_checks_the_weights_once():
    """``infer`` opens one weights scope around its solve; the solve's own scope inside it
    takes that key instead of comparing every parameter again."""
    model = build_model(FC)
    calls = []
    check = model.op._check_weights
    model.op._check_weights = lambda: calls.append(1) or check()
    model.infer(torch.randn(2, 1, 6, 6))
    assert len(calls) == 1
    # Outside any scope every lookup checks; a scope's key is the validated one.
    with model.op.fixed_weights() as key, model.op.fixed_weights() as inner:
        assert inner == key and len(calls) == 2
    model.op.A.weight.data.mul_(2.0)
    with model.op.fixed_weights() as after:
        assert after != key


@torch.no_grad()
def test_fc_product_follows_writes_through_data():
    """The fc operator keeps ``I − W`` per weights: a write through ``.data`` (no version
    bump) reaches the next ``W z``."""
    torch.manual_seed(5)
    model = build_model(FC)
    op = model.op
    z = torch.randn(4, *op.z_shape, dtype=torch.float32)

    def dense():
        eye = torch.eye(op.z_shape[0])
        return z @ (eye - op.k_matrix()).T

    torch.testing.assert_close(op.multiply(z), dense())
    op.B.weight.data.mul_(-2.0)
    torch.testing.assert_close(op.multiply(z), dense())
    op.A.weight.data.copy_(torch.randn_like(op.A.weight))
    torch.testing.assert_close(op.multiply(z), dense())
