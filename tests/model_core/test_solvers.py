"""Solvers against dense answers: fixed points, FB = PR, α range, stats, per-sample stopping."""

from __future__ import annotations

import copy

import pytest
import torch
from problems import dense_w_fc

from model_core import build_model, solvers, tune_alpha
from model_core.bounds import rounding_error
from model_core.nonlinearity import BorderReLU, ReLU, border_mask
from model_core.operators import FCOperator, MultiTierOperator, base
from model_core.solvers import (
    SOLVERS,
    ForwardBackward,
    PeacemanRachford,
    SplittingMethod,
    get_solver,
    register_solver,
    solve_backward,
    solve_forward,
)

TIGHT = {"tol": 1e-11, "max_iter": 20_000}


def problem(seed=0, hidden=12, batch=6, scale=1.0):
    torch.manual_seed(seed)
    op = FCOperator(5, hidden, m=0.5).double()
    with torch.no_grad():
        op.A.weight.mul_(2.0)
        op.B.weight.mul_(2.0)
    x = scale * torch.randn(batch, 5, dtype=torch.float64)
    return op, op.bias(x).detach()


def dense_fixed_point_residual(op, bias, z):
    w = dense_w_fc(op)
    return (z - torch.relu(z @ w.T + bias)).norm(dim=1)


@pytest.mark.parametrize("method", sorted(SOLVERS))
@torch.no_grad()
def test_fixed_point_satisfies_the_equation(method):
    op, bias = problem()
    alpha = get_solver(method).safe_alpha(op)
    z, stats = solve_forward(op, ReLU(), bias, method=method, alpha=alpha, **TIGHT)
    assert stats.converged.all()
    assert (dense_fixed_point_residual(op, bias, z) <= 1e-8 * z.norm(dim=1).clamp_min(1)).all()
    # Both sides of the ReLU are exercised (PR returns z½, exact zeros only up to rounding).
    assert (z > 1e-3).any() and (z.abs() < 1e-9).any()


@torch.no_grad()
def test_fb_and_pr_reach_the_same_point():
    op, bias = problem(seed=1)
    z_pr, _ = solve_forward(op, ReLU(), bias, method="peaceman_rachford", alpha=1.0, **TIGHT)
    z_fb, _ = solve_forward(
        op, ReLU(), bias, method="forward_backward", alpha=ForwardBackward.safe_alpha(op), **TIGHT
    )
    torch.testing.assert_close(z_pr, z_fb, rtol=0, atol=1e-8)


@pytest.mark.parametrize("alpha", [1e-2, 1e-1, 1.0, 10.0, 1e2])
@torch.no_grad()
def test_pr_converges_for_alpha_over_four_decades(alpha):
    op, bias = problem(seed=2)
    ref, _ = solve_forward(op, ReLU(), bias, method="peaceman_rachford", alpha=1.0, **TIGHT)
    z, stats = solve_forward(
        op, ReLU(), bias, method="peaceman_rachford", alpha=alpha, tol=1e-10, max_iter=200_000
    )
    assert stats.converged.all()
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", sorted(SOLVERS))
@torch.no_grad()
def test_stats_report_the_true_residual(method):
    op, bias = problem(seed=3)
    alpha = 0.8 if method == "peaceman_rachford" else ForwardBackward.safe_alpha(op)
    z, stats = solve_forward(op, ReLU(), bias, method=method, alpha=alpha, tol=1e-3, max_iter=500)
    b = bias.shape[0]
    assert stats.iterations.shape == (b,) and stats.iterations.dtype == torch.int64
    assert stats.residual.shape == (b,) and stats.converged.shape == (b,)
    assert stats.converged.dtype == torch.bool
    assert stats.method == method and stats.alpha == pytest.approx(alpha)
    assert stats.tol == 1e-3 and stats.max_iter == 500 and stats.time_s > 0
    w = dense_w_fc(op)
    fz = torch.relu(z @ w.T + bias)
    norm = z.norm(dim=1)
    true = (z - fz).norm(dim=1) / torch.where(norm > 0, norm, fz.norm(dim=1))
    torch.testing.assert_close(stats.residual, true, rtol=1e-9, atol=1e-12)
    assert (stats.iterations >= 1).all() and (stats.iterations <= 500).all()


def dense_backward_residual(op, jac, grad, out):
    """``‖ũ − J(g + Wᵀũ)‖ / ‖ũ‖`` with ũ recovered from ``out = g + Wᵀũ`` densely."""
    w = dense_w_fc(op)
    u = torch.linalg.solve(w.T, (out - grad).T).T
    return (u - jac * out).norm(dim=1) / u.norm(dim=1)


@pytest.mark.parametrize(
    "method, alpha_scale, tol, max_iter",
    [
        ("forward_backward", 1.0, 1e-4, 40),  # the bound: some rows converge, some do not
        ("forward_backward", 0.01, 1e-2, 400),  # a tiny step: the step rule fired at once
        ("forward_backward", 1.0, 1e-6, 2000),
        ("peaceman_rachford", 1.0, 1e-3, 8),
        ("peaceman_rachford", 30.0, 1e-6, 400),  # a huge α: z = σ(u) can stall at 0
        ("peaceman_rachford", 0.01, 1e-4, 2000),
    ],
)
@torch.no_grad()
def test_converged_means_the_true_residual_is_within_tol(method, alpha_scale, tol, max_iter):
    """Forward and backward, for every method and step size: the residual reported is the
    true one of the returned point (against dense W), and a sample is converged exactly when
    it is at most ``tol``."""
    op, bias = problem(seed=8, batch=8)
    bias = bias * torch.tensor([1e-3, 1, 0.3, 3, 1, 0.1, 2, 1], dtype=torch.float64)[:, None]
    safe = get_solver(method).safe_alpha(op)
    kw = {"method": method, "alpha": alpha_scale * safe, "tol": tol, "max_iter": max_iter}
    z, stats, pre = solve_forward(op, ReLU(), bias, preactivation=True, **kw)
    true = dense_fixed_point_residual(op, bias, z) / z.norm(dim=1)
    # The reported residual is the computed one plus its rounding term (§2, eq. 5′): at
    # least the true one, and above it by no more than that term.
    rho = rounding_error(z.norm(dim=1), pre.norm(dim=1), z.dtype, stats.pre_scale)
    assert (stats.residual >= true).all()
    assert (stats.residual - true <= 1.01 * rho / z.norm(dim=1) + 1e-9 * true).all()
    assert torch.equal(stats.converged, stats.residual <= tol)
    assert ((stats.iterations < max_iter) <= stats.converged).all()  # an early stop converged
    jac = (torch.randn(bias.shape, generator=torch.Generator().manual_seed(1)) > -0.5).double()
    grad = torch.randn(bias.shape, generator=torch.Generator().manual_seed(2), dtype=bias.dtype)
    out, bstats = solve_backward(op, jac, grad, **kw)
    true = dense_backward_residual(op, jac, grad, out)
    torch.testing.assert_close(bstats.residual, true, rtol=1e-6, atol=1e-12)
    assert torch.equal(bstats.converged, bstats.residual <= tol)
    if max_iter >= 2000:
        assert stats.converged.all() and bstats.converged.all()


@torch.no_grad()
def test_a_small_forward_backward_step_does_not_stop_far_from_the_fixed_point():
    """FB's relative step ``‖z⁺ − z‖/‖z⁺‖`` is about α times the residual: at its safe α
    (0.021 here) a step rule stopped every sample after 41–58 iterations at residuals
    0.39–0.45, 40× ``tol``. The true residual decides: 144–197 iterations."""
    op, bias = problem(seed=9)
    alpha = ForwardBackward.safe_alpha(op)
    kw = {"method": "forward_backward", "alpha": alpha, "tol": 1e-2}
    z, stats = solve_forward(op, ReLU(), bias, max_iter=100, **kw)
    step = (z - torch.relu((1 - alpha) * z + alpha * (z @ dense_w_fc(op).T + bias))).norm(dim=1)
    assert (step <= 1e-2 * z.norm(dim=1)).all()  # a step rule would have stopped them all
    assert stats.converged.tolist() == [False] * 6 and stats.iterations.tolist() == [100] * 6
    assert (stats.residual > 0.05).all()
    z, stats = solve_forward(op, ReLU(), bias, max_iter=3000, **kw)
    assert stats.converged.all() and (stats.iterations > 100).all()
    assert (dense_fixed_point_residual(op, bias, z) <= 1e-2 * z.norm(dim=1)).all()


def test_max_iter_below_one_is_refused():
    op, bias = problem()
    with pytest.raises(ValueError, match="max_iter"):
        solve_forward(op, ReLU(), bias, method="forward_backward", alpha=0.1, tol=1e-3,
                      max_iter=0)  # fmt: skip


@torch.no_grad()
def test_unconverged_samples_are_reported_at_max_iter():
    op, bias = problem(seed=4)
    _, stats = solve_forward(op, ReLU(), bias, method="peaceman_rachford", alpha=1e-3,
                             tol=1e-12, max_iter=3)  # fmt: skip
    assert not stats.converged.any()
    assert (stats.iterations == 3).all()
    assert (stats.residual > 1e-12).all()


@pytest.mark.parametrize("method", sorted(SOLVERS))
@torch.no_grad()
def test_per_sample_stopping_equals_solo_solves(method):
    """Easy (tiny injection) and hard samples mixed: each gets its solo answer and count."""
    op, bias = problem(seed=5, batch=8)
    bias = bias * torch.tensor([1e-3, 1, 1e-3, 3, 1, 1e-3, 2, 1], dtype=torch.float64)[:, None]
    alpha = get_solver(method).safe_alpha(op)
    kw = {"method": method, "alpha": alpha, "tol": 1e-6, "max_iter": 2000}
    z, stats = solve_forward(op, ReLU(), bias, **kw)
    assert stats.iterations.unique().numel() > 1  # the batch really is mixed
    for i in range(len(bias)):
        zi, si = solve_forward(op, ReLU(), bias[i : i + 1], **kw)
        assert si.iterations.item() == stats.iterations[i].item()
        torch.testing.assert_close(z[i : i + 1], zi, rtol=0, atol=1e-12)
        torch.testing.assert_close(stats.residual[i : i + 1], si.residual, rtol=1e-9, atol=0)


@pytest.mark.parametrize("method", sorted(SOLVERS))
@torch.no_grad()
def test_chunking_and_compaction_do_not_change_answers(method, monkeypatch):
    op, bias = problem(seed=6, batch=40)
    bias = bias * torch.linspace(1e-3, 3, 40, dtype=torch.float64)[:, None]
    alpha = get_solver(method).safe_alpha(op)
    kw = {"method": method, "alpha": alpha, "tol": 1e-7, "max_iter": 2000}
    monkeypatch.setattr(base, "CPU_CHUNK_BYTES", 1 << 40)
    monkeypatch.setattr(solvers, "COMPACT_SHARE", 2.0)  # never compact
    z0, s0 = solve_forward(op, ReLU(), bias, **kw)
    monkeypatch.setattr(solvers, "COMPACT_SHARE", 0.0)  # compact whenever anyone stops
    z1, s1 = solve_forward(op, ReLU(), bias, **kw)
    monkeypatch.setattr(base, "CPU_CHUNK_BYTES", 1)  # one-row chunks
    z2, s2 = solve_forward(op, ReLU(), bias, **kw)
    for z, s in ((z1, s1), (z2, s2)):
        torch.testing.assert_close(z, z0, rtol=0, atol=1e-12)
        assert torch.equal(s.iterations, s0.iterations)
        assert torch.equal(s.converged, s0.converged)


@pytest.mark.parametrize("method", sorted(SOLVERS))
@torch.no_grad()
def test_closed_form_first_steps_equal_the_generic_step(method):
    """The loop's first iteration skips W or the resolvent where the zero start allows it;
    it must return bit for bit what the generic step returns."""
    op, bias = problem(seed=7, batch=5)
    solver = get_solver(method)(op, 0.7)
    grad = torch.randn_like(bias)
    jac = (torch.randn_like(bias) > 0).to(bias.dtype)
    jac[0] = 0.0  # a sample whose backward problem is ũ = 0
    pairs = [
        (solver.first_forward(solver.init_forward(bias), ReLU()),
         solver.step_forward(solver.init_forward(bias), ReLU())),
        (solver.first_backward(solver.init_backward(grad, jac)),
         solver.step_backward(solver.init_backward(grad, jac))),
    ]  # fmt: skip
    for fast, slow in pairs:
        assert fast.keys() == slow.keys()
        for name in slow:
            assert torch.equal(fast[name], slow[name]), name
        assert fast["x"].abs().sum() > 0


def test_registry_and_errors():
    assert {"peaceman_rachford", "forward_backward"} <= set(SOLVERS)
    assert get_solver("peaceman_rachford") is SOLVERS["peaceman_rachford"]
    with pytest.raises(ValueError, match="peaceman_rachford"):
        get_solver("newton")
    op, bias = problem()
    with pytest.raises(ValueError, match="alpha"):
        solve_forward(op, ReLU(), bias, method="peaceman_rachford", alpha=0.0, tol=1e-3,
                      max_iter=10)  # fmt: skip


class DouglasRachford(PeacemanRachford):
    """Douglas–Rachford: PR's map averaged with the identity, ``u⁺ = u + z½ − z`` (backward
    ``u⁺ = u + z½ − ũ``). A whole new solver as one class: PR's start, residual and finish
    hold, since ``z½`` still comes from the resolvent."""

    name = "test_douglas_rachford"

    def step_forward(self, state, nonlin):
        z, u, bias = state["x"], state["u"], state["bias"]
        u_half = torch.lerp(u, z, 2.0)
        z_half = self.resolvent.inverse(torch.add(u_half, bias, alpha=self.alpha))
        u = u + z_half - z
        return {"x": nonlin(u), "u": u, "bias": bias, "z_half": z_half, "u_half": u_half}

    def step_backward(self, state):
        x, u = state["x"], state["u"]
        u_half = torch.lerp(u, x, 2.0)
        z_half = self.resolvent.inverse_transpose(u_half)
        u = u + z_half - x
        x = torch.addcmul(state["jg"], state["jac"], u)
        return {**state, "x": x, "u": u, "z_half": z_half, "u_half": u_half}


@pytest.fixture
def douglas_rachford():
    """``DouglasRachford`` registered for one test only."""
    register_solver(DouglasRachford)
    yield DouglasRachford.name
    del SOLVERS[DouglasRachford.name]


@torch.no_grad()
def test_a_registered_solver_is_one_class(douglas_rachford):
    """Registered, the class solves both problems to the dense answers, its closed-form
    first steps (inherited) equal its steps, and settings, a model, training and
    ``tune_alpha`` take it by name and ask its capabilities."""
    name = douglas_rachford
    assert get_solver(name) is DouglasRachford
    op, bias = problem(seed=1)
    kw = {"method": name, "alpha": 0.7, **TIGHT}
    z, stats = solve_forward(op, ReLU(), bias, **kw)
    ref, _ = solve_forward(op, ReLU(), bias, method="peaceman_rachford", alpha=1.0, **TIGHT)
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-8)
    assert stats.method == name and stats.converged.all()
    jac = (torch.randn(bias.shape, generator=torch.Generator().manual_seed(1)) > -0.5).double()
    grad = torch.randn(bias.shape, generator=torch.Generator().manual_seed(2), dtype=bias.dtype)
    out, bstats = solve_backward(op, jac, grad, **kw)
    assert bstats.converged.all()
    assert (dense_backward_residual(op, jac, grad, out) <= 1e-9).all()
    solver = DouglasRachford(op, 0.7)
    fast = solver.first_backward(solver.init_backward(grad, jac))
    slow = solver.step_backward(solver.init_backward(grad, jac))
    assert all(torch.equal(fast[k], slow[k]) for k in slow)

    model = build_model({"arch": "fc", "in_channels": 1, "image_size": 4, "hidden": 6,
                         "solver": {"method": name, "alpha": None}})  # fmt: skip
    assert model.solver_settings.solver is DouglasRachford
    assert model.solver_alpha() == DouglasRachford.default_alpha == 1.0
    x = torch.randn(4, 1, 4, 4)
    assert model.infer(x).stats.method == name
    with torch.enable_grad():
        model(x).sum().backward()
    assert model.deq.last_backward_stats.method == name
    result = tune_alpha(model, x, method=name, grid=3, refine=0)  # builds resolvents aside
    assert result.method == name and len(result.curve) == 3


def test_register_solver_refuses_what_cannot_be_a_solver(douglas_rachford):
    class Nameless(PeacemanRachford):
        name = ""

    class NoAlpha(ForwardBackward):
        name = "test_no_alpha"
        safe_alpha = SplittingMethod.safe_alpha

    class Impostor(PeacemanRachford):
        name = douglas_rachford

    with pytest.raises(TypeError, match="SplittingMethod subclass"):
        register_solver(dict)
    with pytest.raises(ValueError, match="non-empty name"):
        register_solver(Nameless)
    with pytest.raises(TypeError, match="default_alpha or a safe_alpha"):
        register_solver(NoAlpha)
    with pytest.raises(ValueError, match="'test_douglas_rachford' is taken by DouglasRachford"):
        register_solver(Impostor)
    assert register_solver(DouglasRachford) is DouglasRachford  # registering again is a no-op
    assert "test_no_alpha" not in SOLVERS and get_solver(douglas_rachford) is DouglasRachford


def test_capabilities_of_the_built_in_solvers():
    """What tuning, training and the service ask instead of a method's name."""
    op, _ = problem()
    pr, fb = get_solver("peaceman_rachford"), get_solver("forward_backward")
    assert (pr.needs_resolvent, pr.tunable_alpha, pr.default_alpha) == (True, True, 1.0)
    assert (fb.needs_resolvent, fb.tunable_alpha, fb.default_alpha) == (False, False, None)
    assert pr.safe_alpha(op) == 1.0
    norm = op.operator_norm_estimate()
    assert fb.safe_alpha(op) == pytest.approx(op.m / norm**2, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_border_relu_is_relu_inside_and_zero_on_the_border(dtype):
    """Both forms of σ (the one-pass clamp the solvers use and the autograd one) are
    ``max(v, 0)`` inside and 0 on the border, and the autograd one passes gradient only
    where σ is the identity."""
    mask = border_mask(6).expand(3, 6, 6)
    sigma = BorderReLU(mask[:1])
    v = torch.randn(4, 3, 6, 6, dtype=dtype, generator=torch.Generator().manual_seed(0))
    want = torch.relu(v) * mask.to(dtype)
    assert torch.equal(sigma(v), want)
    w = v.clone().requires_grad_(True)
    out = sigma(w)
    assert torch.equal(out.detach(), want)
    out.sum().backward()
    assert torch.equal(w.grad, ((v > 0) & (mask > 0)).to(dtype))
    assert torch.equal(sigma.derivative(v), ((v > 0) & (mask > 0)).to(dtype))


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_a_non_finite_row_stops_at_once_and_leaves_the_others_alone(method):
    """A NaN in one sample's injection (a diverged model, a NaN pixel) made that row run to
    max_iter on NaN: 300 wasted steps per sample in a diverged training run. It now stops on
    its first step, unconverged with a NaN residual; the other rows solve as without it."""
    op, bias = problem(seed=3, batch=5)
    alpha = 0.05 if method == "forward_backward" else 1.0
    bad = bias.clone()
    bad[2, 0] = float("nan")
    z, st = solve_forward(op, ReLU(), bad, method=method, alpha=alpha, tol=1e-6, max_iter=300)
    ref, ref_st = solve_forward(
        op, ReLU(), bias, method=method, alpha=alpha, tol=1e-6, max_iter=300
    )
    assert st.iterations[2].item() == 1
    assert not st.converged[2].item() and st.residual[2].isnan().item()
    keep = [0, 1, 3, 4]
    assert st.converged[keep].all()
    assert torch.equal(st.iterations[keep], ref_st.iterations[keep])
    assert torch.allclose(z[keep], ref[keep], rtol=0, atol=1e-12)


def test_a_zero_equilibrium_converges_at_once_under_forward_backward():
    """``U x + b ≤ 0`` everywhere makes ``z* = 0``. FB's first iterate is exactly 0 and its
    computed image is exactly 0, so the residual is 0 (docs/math.md §2, the zero case), not
    the rounding term over a zero denominator (which would never converge)."""
    torch.manual_seed(0)
    model = build_model({"arch": "fc", "in_channels": 1, "image_size": 4, "hidden": 6})
    with torch.no_grad():
        model.op.U.bias.fill_(-100.0)
    out = model.infer(torch.rand(3, 1, 4, 4), method="forward_backward", tol=1e-4)
    assert out.stats.iterations.tolist() == [1, 1, 1]
    assert out.stats.residual.tolist() == [0.0, 0.0, 0.0]
    assert out.stats.converged.tolist() == [True, True, True]


def _conv_problem(channels, seed=0, batch=5):
    """A float32 convolutional operator (``channels`` per tier, 8×8 images) and an image."""
    torch.manual_seed(seed)
    op = MultiTierOperator(3, channels, 8)
    return op, torch.randn(batch, 3, 8, 8)


@pytest.mark.parametrize("loop", ["compact", "masked"])
@pytest.mark.parametrize("channels", [[6], [4, 6]])
@torch.no_grad()
def test_the_first_step_from_the_image_gives_the_same_solve(channels, loop):
    # PR's first half step formed from the image (Resolvent.inverse_injection) instead of
    # from Ux + b: the same per-sample counts and flags, the point to float32 rounding.
    op, x = _conv_problem(channels)
    kw = dict(method="peaceman_rachford", alpha=1.0, tol=1e-4, max_iter=200,
              preactivation=True, bias_scale=op.injection_scale(x), loop=loop)  # fmt: skip
    z0, s0, _ = solve_forward(op, ReLU(), op.bias(x), **kw)
    z1, s1, _ = solve_forward(op, ReLU(), op.bias(x), image=x, **kw)
    assert torch.equal(s0.iterations, s1.iterations)
    assert torch.equal(s0.converged, s1.converged) and bool(s1.converged.all())
    assert int(s1.iterations.min()) > 1  # (the point is the later steps')
    torch.testing.assert_close(z1, z0, rtol=0, atol=1e-5 * float(z0.abs().max()))


@pytest.mark.parametrize("alpha", [1e-3, 1.0, 10.0])
@pytest.mark.parametrize("channels", [[6], [4, 6]])
@torch.no_grad()
def test_the_first_step_from_the_image_counts_its_rounding(channels, alpha):
    # A constant image of 1e4 with b = −Σ U: Ux + b cancels inside the image, so
    # ‖Ux + b‖ ≪ ‖|U||x| + |b|‖, the scale at which the composed step rounds. The residual's
    # p after one step must be within its stated rounding ρ of the exact W z + U x + b.
    op, _ = _conv_problem(channels)
    x = torch.full((3, 3, 8, 8), 1e4)
    x[1] *= -0.5
    op.U.bias.copy_(-op.U.weight.sum(dim=(1, 2, 3)) * 1e4)
    bias, scale = op.bias(x), op.injection_scale(x)
    assert bool((torch.linalg.vector_norm(bias[0].flatten()) < 0.5 * scale[0]).all())
    z, stats, pre = solve_forward(
        op, ReLU(), bias, method="peaceman_rachford", alpha=alpha, tol=1e-2, max_iter=1,
        preactivation=True, bias_scale=scale, image=x,
    )  # fmt: skip
    op64 = copy.deepcopy(op).double()
    exact = op64.multiply(z.double()) + op64.bias(x.double())
    err = torch.linalg.vector_norm((pre.double() - exact).flatten(1), dim=1)
    norms = [torch.linalg.vector_norm(t.flatten(1), dim=1) for t in (z, pre)]
    rho = rounding_error(*norms, torch.float32, stats.pre_scale)
    assert bool((err <= rho.double()).all()), (err, rho)
    # At u½ = 0 the resolvent's argument counts at the injection's scale, amplified (§2).
    amplified = (1.0 + alpha * op.weight_norm()) * scale
    assert bool((stats.pre_scale >= amplified).all())
