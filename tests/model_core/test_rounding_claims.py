"""``infer``'s claims hold in the model's own (float32) precision, adversarial inputs included.

Every answer of :meth:`MonDEQClassifier.infer` makes claims about the *exact* equilibrium
``z*`` of the model's weights and input (docs/math.md §2, §7, §9):

* ``converged`` means the true relative residual (§2, eq. 5) of the solver's returned point
  ``z``, ``‖z − σ(W z + U x + b)‖ / ‖z‖``, is at most ``tol``;
* ``error_bound`` bounds ``‖ĉ − z*‖``, ``ĉ`` the point the logits are read at (§9, eq. 15),
  and ``logit_error_bound`` bounds ``|l_i − l*_i|`` (eq. 16);
* ``label_proven`` means the returned label is the exact equilibrium's (eq. 17);
* ``lipschitz`` (``lipschitz_bound()``) is at least ``‖W_out‖₂ · ‖pool‖ · ‖U‖₂ / m`` (§7),
  so the certified radius is not overstated.

The computation runs in float32, so each claim must count its own rounding. These tests check
the claims against a reference computed independently in float64: the model's weights and
the input *as the model sees it* (cast to the model's dtype) are promoted to float64, ``W`` is
assembled densely (``problems.dense_w_fc`` / ``dense_w_multitier``, space-domain, not the
Fourier code), ``z*`` comes from Peaceman–Rachford on the dense ``W`` followed by a
semismooth-Newton polish on its active set (the reference's own residual is asserted at
rounding level), and the residual, distance and labels are evaluated in float64 at the
points ``infer`` used. The point ``z`` is taken from the solver's return and ``ĉ`` from the
error bound's, by wrapping the two calls (the logits are checked to be read at ``ĉ``).

The adversarial cases each pin one rounding term the model once missed: an input in ``U``'s
null space scaled to 1e6..1e10 (the rounding of ``U x`` scales with ``‖U‖ ‖x‖``, not with
``‖p‖``), ``‖I − W‖ ≫ m`` with a small PR α (the resolvent identity for ``p`` amplifies the
resolvent's rounding by ``1/α``), two near-duplicate head rows of size ~1e3 (the head's own
rounding), fmnist-fc's ``‖U‖₂`` in float32, and ``r`` near ``W``'s null space (the
float64 certificate forms ``W r`` in float32, whose rounding is then a percent of ``‖W r‖``).
The benign controls run the same checks on ordinary inputs. Also: a half or bfloat16 model
is refused with a clear ``ValueError``.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import pytest
import torch
from problems import circ_conv, dense_of, dense_w_fc, dense_w_multitier

import model_core.bounds as bounds_module
import model_core.models as models_module
from model_core import build_model, load_checkpoint

CONFIGS = {
    "fc": {"arch": "fc", "in_channels": 1, "image_size": 6, "hidden": 12},
    "conv": {"arch": "conv", "in_channels": 1, "image_size": 6, "channels": 2},
    "multi_tier": {"arch": "multi_tier", "in_channels": 1, "image_size": 6, "channels": [2, 3]},
}
PR, FB = "peaceman_rachford", "forward_backward"
REPO = Path(__file__).resolve().parents[2]


# ---- the float64 reference ----------------------------------------------------------------


def model64(model):
    """A float64 copy of ``model`` with its caches dropped."""
    m = copy.deepcopy(model).double()
    m.op.clear_cache()
    return m


def exact_equilibrium(model, x: torch.Tensor, iters: int = 300) -> dict:
    """``z*`` in float64 for ``x`` as the model sees it (cast to its dtype first).

    Peaceman–Rachford (α = 1) on the dense ``W`` finds the active set; a semismooth-Newton
    polish then solves ``(I − D W) z = D b`` on it exactly (``D`` the active units).
    Returns the float64 model, ``U x + b``, ``z*`` and the exact logits.
    """
    dtype = next(model.parameters()).dtype
    xs = x.to(dtype).double()
    m = model64(model)
    op, nl = m.op, m.deq.nonlin
    with torch.no_grad():
        bias = op.bias(xs)
        shape, batch = bias.shape, bias.shape[0]
        w = dense_w_fc(op) if m.arch == "fc" else dense_w_multitier(op)
        n = w.shape[0]
        b = bias.reshape(batch, n)
        eye = torch.eye(n, dtype=torch.float64)
        v = torch.linalg.inv(2 * eye - w)
        z = u = torch.zeros_like(b)
        for _ in range(iters):
            uh = 2 * z - u
            zh = (uh + b) @ v.T
            u = 2 * zh - uh
            z = nl(u.reshape(shape)).reshape_as(u)
        zs = nl((z @ w.T + b).reshape(shape)).reshape_as(b)
        # σ is a ReLU (on a border mask for the conv operators): 1 where a unit may be active
        inside = nl(torch.ones((1, *shape[1:]), dtype=torch.float64)).reshape(1, n)
        for _ in range(50):
            d = ((zs @ w.T + b) > 0).to(torch.float64) * inside
            new = torch.stack(
                [torch.linalg.solve(eye - d[i][:, None] * w, d[i] * b[i]) for i in range(batch)]
            )
            if torch.equal(new, zs):
                break
            zs = new
        zs = zs.reshape(shape)
        residual = true_residual(m, bias, zs)
        logits = m.head(m.features(zs))
    assert float(residual.max()) < 1e-12, f"reference not solved: residual {residual}"
    return {"model": m, "bias": bias, "z": zs, "logits": logits}


def true_residual(m64, bias64: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """§2 eq. (5) in float64 at ``z``: ``‖z − σ(W z + U x + b)‖ / ‖z‖`` (``‖σ(U x + b)‖``
    as the denominator where ``z = 0``)."""
    z = z.double()
    nl = m64.deq.nonlin
    with torch.no_grad():
        f = nl(m64.op.multiply(z) + bias64)
        zero_f = nl(bias64)
    batch = z.shape[0]
    zn = z.reshape(batch, -1).norm(dim=1)
    denom = torch.where(zn > 0, zn, zero_f.reshape(batch, -1).norm(dim=1))
    return (z - f).reshape(batch, -1).norm(dim=1) / denom.clamp_min(1e-300)


def lipschitz64(model) -> float:
    """``‖W_out‖₂ · ‖pool‖ · ‖U‖₂ / m`` in float64, ``‖U‖₂`` from the dense ``U`` (for the
    conv operators: its circular convolution on the padded grid, space-domain)."""
    m = model64(model)
    u = m.op.U.weight.detach()
    if m.arch == "fc":
        u_norm = torch.linalg.matrix_norm(u, ord=2)
    else:
        size, c_in = m.op.sizes[0], u.shape[1]
        dense = dense_of(lambda t: circ_conv(t, u), c_in * size * size, (c_in, size, size))
        u_norm = torch.linalg.matrix_norm(dense, ord=2)
    w_norm = torch.linalg.matrix_norm(m.head.weight.detach(), ord=2)
    return float(w_norm * m.pool_norm() * u_norm / m.op.m)


# ---- infer, with the points it used --------------------------------------------------------


def infer_with_points(model, x, monkeypatch, **kwargs):
    """``model.infer(x, **kwargs)`` and the points behind it: the solver's returned ``z``
    and the centre ``ĉ`` the logits are read at (the last error-bound evaluation)."""
    seen = {}
    solve = model.deq.solve
    bound = models_module.equilibrium_error_bound

    def solve_and_keep(*args, **kw):
        out = solve(*args, **kw)
        seen["z"] = out[0]
        return out

    def bound_and_keep(op, nonlin, z, *args, **kw):
        out = bound(op, nonlin, z, *args, **kw)
        seen.setdefault("centres", []).append((z, out[0]))  # (the point, its centre)
        return out

    model.deq.solve = solve_and_keep  # an instance attribute, deleted below
    try:
        with monkeypatch.context() as patch:
            patch.setattr(models_module, "equilibrium_error_bound", bound_and_keep)
            result = model.infer(x, **kwargs)
    finally:
        del model.deq.solve
    # The centre of every row: the float32 bound's, then the float64 one's for the rows
    # certified again in float64 (their logits are read there, in float64).
    # (The stopping rules' checks evaluate the bound too, in float32 and, for rows at the
    # rounding floor, in float64, before the answer's: the last float32 evaluation, then,
    # for each row certified again, the last float64 one at its returned point. That one
    # ran during the solve where the certificate stopped the row there, and the answer
    # reports it rather than computing it again; else at the answer.)
    dtype = result.logits.dtype
    first = [c for _, c in seen["centres"] if c.dtype == dtype][-1]
    refined = result.certified_in_float64.nonzero().squeeze(1).tolist()
    again = bool(refined)
    centre = first.double() if again else first
    wide = [(point, c) for point, c in seen["centres"] if c.dtype != dtype]
    for row in refined:
        point = seen["z"][row].double()
        at = [c[i] for zs, c in wide for i in range(len(zs)) if torch.equal(zs[i], point)]
        assert at, f"row {row}: no float64 certificate at its returned point"
        centre[row] = at[-1]
    with torch.no_grad():
        read = torch.nn.functional.linear(
            model.features(centre.to(first.dtype)).double()
            if not again
            else model.features(centre),  # (the features are a pool or a slice: any dtype)
            model.head.weight.double(),
            model.head.bias.double(),
        )
    # the captured centre is the point the logits were read at
    torch.testing.assert_close(read.to(result.logits.dtype), result.logits, rtol=1e-5, atol=1e-5)
    return result, seen["z"], centre


def claim_violations(model, result, z, centre, ref) -> list[str]:
    """Each broken claim of ``result``, with its margin (empty: all hold)."""
    bad = []
    m64 = ref["model"]
    batch = z.shape[0]
    tol = result.stats.tol
    res = true_residual(m64, ref["bias"], z)
    conv = result.stats.converged
    wrong = conv & ~(res <= tol)
    if wrong.any():
        bad.append(
            f"converged at tol {tol:g} with true residual {res[wrong].max().item():.3g} "
            f"({res[wrong].max().item() / tol:.3g}x tol; reported {result.stats.residual.tolist()})"
        )
    dist = (centre.double() - ref["z"]).reshape(batch, -1).norm(dim=1)
    eb = result.error_bound.double()
    over = dist > eb
    if over.any():
        ratio = (dist[over] / eb[over]).max().item()
        bad.append(
            f"‖ĉ − z*‖ {dist[over].tolist()} > error_bound {eb[over].tolist()} ({ratio:.3g}x)"
        )
    logit_err = (result.logits.double() - ref["logits"]).abs()
    lb = result.logit_error_bound.double()
    if (logit_err > lb).any():
        ratio = (logit_err / lb)[logit_err > lb].max().item()
        bad.append(f"|l − l*| above logit_error_bound ({ratio:.3g}x)")
    exact_labels = ref["logits"].argmax(dim=1)
    false = result.label_proven & (result.labels != exact_labels)
    if false.any():
        bad.append(
            f"label_proven for labels {result.labels[false].tolist()}, "
            f"exact labels {exact_labels[false].tolist()}"
        )
    return bad


def assert_claims(model, x, monkeypatch, ref=None, **kwargs):
    ref = exact_equilibrium(model, x) if ref is None else ref
    result, z, centre = infer_with_points(model, x, monkeypatch, **kwargs)
    bad = claim_violations(model, result, z, centre, ref)
    assert not bad, "; ".join(bad)
    return result


# ---- benign controls -----------------------------------------------------------------------


@functools.cache
def control(arch: str):
    torch.manual_seed(3)
    model = build_model(CONFIGS[arch])
    x = torch.randn(
        6, CONFIGS[arch]["in_channels"], 6, 6, generator=torch.Generator().manual_seed(7)
    )
    return model, x, exact_equilibrium(model, x)


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize(
    "method, stop, tol",
    [
        (PR, "tol", 1e-2),
        (PR, "tol", 1e-5),
        (FB, "tol", 1e-3),
        (PR, "label", 1e-2),
        (FB, "label", 1e-2),
    ],
)
def test_claims_hold_on_ordinary_inputs(arch, method, stop, tol, monkeypatch):
    model, x, ref = control(arch)
    result = assert_claims(
        model, x, monkeypatch, ref=ref, method=method, stop=stop, tol=tol, max_iter=300
    )
    # An honest bound must still let ordinary inputs through: float32's floor on these
    # models is far below 1e-3 (docs/math.md §2), and every label here is clear.
    if stop == "label":
        assert result.label_proven.all()
    elif tol >= 1e-3:
        stats = result.stats
        assert stats.converged.all(), (
            f"not converged: iterations {stats.iterations.tolist()}, "
            f"residual {stats.residual.tolist()}"
        )
        assert not result.certified_in_float64.any()
    else:
        # 1e-5 is under float32's floor here: every sample stalls there, and the float64
        # certificate at its point finds it converged at the next iteration 2^j that offers
        # it (16 or 32, not the cap 300; its claims checked above).
        assert set(result.stats.iterations.tolist()) <= {16, 32}
        assert result.certified_in_float64.all() and result.stats.converged.all()


def test_the_float64_certificate_draws_nothing_from_the_random_stream():
    # Its float64 copy of the model is built from the config, whose init draws weights.
    model, x, _ = control("conv")
    model._float64 = None
    torch.manual_seed(11)
    state = torch.get_rng_state()
    assert model.infer(x, tol=1e-6, max_iter=20).certified_in_float64.any()
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_lipschitz_bound_is_not_below_its_float64_value(arch):
    model = control(arch)[0]
    assert model.lipschitz_bound() >= lipschitz64(model)


# ---- case 1: an input in U's null space, scaled up ----------------------------------------


@functools.cache
def null_space_case():
    """fc, float32, default init; ``v`` a unit vector with ``U v ≈ 0`` (float64 SVD)."""
    torch.manual_seed(0)
    model = build_model(CONFIGS["fc"])
    _, _, vh = torch.linalg.svd(model.op.U.weight.detach().double())
    return model, vh[-1]


@pytest.mark.parametrize("scale", [1e6, 1e8, 1e10])
@pytest.mark.parametrize("stop", ["tol", "label"])
def test_claims_hold_for_a_huge_input_in_the_null_space_of_u(scale, stop, monkeypatch):
    # U x + b = b exactly, but the float32 product U x is off by about eps ‖U‖ ‖x‖, far
    # above a rounding term in ‖z‖ + ‖p‖ (at 1e10, the proven label was not z*'s).
    model, v = null_space_case()
    x = (scale * v).float().reshape(1, 1, 6, 6)
    assert_claims(model, x, monkeypatch, stop=stop, tol=1e-2)


# ---- case 2: ‖I − W‖ ≫ m, PR with a small α ----------------------------------------------


def test_converged_is_true_when_the_operator_norm_dwarfs_m(monkeypatch):
    # W = (1 − m) I − AᵀA with A = 100 I, m = 1: I − W = 10001 I, every unit active. PR's
    # p = ((1 + α) z½ − u½) / α carries the resolvent's rounding times 1/α.
    torch.manual_seed(0)
    model = build_model({**CONFIGS["fc"], "m": 1.0})
    with torch.no_grad():
        model.op.A.weight.copy_(100 * torch.eye(12))
        model.op.B.weight.zero_()
        model.op.U.weight.mul_(0.01)
        model.op.U.bias.fill_(1e4)
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    ref = exact_equilibrium(model, x)
    failures = []
    for method, alpha in [(PR, 1e-4), (PR, 1.0), (FB, None)]:
        result, z, centre = infer_with_points(
            model, x, monkeypatch, method=method, alpha=alpha, tol=1e-5, max_iter=2000
        )
        bad = claim_violations(model, result, z, centre, ref)
        failures += [f"{method} α={alpha}: {b}" for b in bad]
    assert not failures, "; ".join(failures)


# ---- case 3: near-duplicate head rows -----------------------------------------------------


def test_label_proven_counts_the_heads_rounding(monkeypatch):
    # Rows 0 and 1 of the head are ~1e3 in size and differ by 1e-2 in one entry; the exact
    # equilibrium's class 1 wins by a hair. The margin's float32 rounding (~eps ‖w‖ ‖ĉ‖)
    # does not shrink with ‖w_0 − w_1‖, so the rival slack alone cannot cover it.
    torch.manual_seed(0)
    model = build_model(CONFIGS["fc"])
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    ref = exact_equilibrium(model, x)
    k = int(ref["z"][0].argmax())
    delta = 1e-2
    gap = delta * float(ref["z"][0, k])
    failures = []
    for trial in range(24):
        w = (torch.randn(12, generator=torch.Generator().manual_seed(trial)) * 1e3).float()
        w1 = w.clone()
        w1[k] += delta
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.fill_(-1e6)
            model.head.weight[0] = w
            model.head.weight[1] = w1
            model.head.bias[0] = gap * (1 - 1e-3)  # exact margin l*_0 − l*_1 < 0
            model.head.bias[1] = 0.0
        m64 = model64(model)
        trial_ref = {**ref, "model": m64, "logits": m64.head(m64.features(ref["z"])).detach()}
        assert int(trial_ref["logits"].argmax()) == 1
        result, z, centre = infer_with_points(model, x, monkeypatch, stop="label")
        bad = claim_violations(model, result, z, centre, trial_ref)
        if bad:
            failures.append(f"trial {trial}: " + "; ".join(bad))
    assert not failures, f"{len(failures)} of 24 trials: " + " | ".join(failures[:3])


# ---- case 4: fmnist-fc's ‖U‖₂ ------------------------------------------------------------


def test_lipschitz_bound_of_fmnist_fc_is_not_below_its_float64_value():
    model = load_checkpoint(REPO / "models" / "fmnist-fc" / "1" / "model.pt")
    lip, lip64 = model.lipschitz_bound(), lipschitz64(model)
    assert lip >= lip64, f"L {lip!r} < float64 {lip64!r} ({(lip64 - lip) / lip64:.3g} relative)"
    u64 = torch.linalg.matrix_norm(model.op.U.weight.detach().double(), ord=2).item()
    assert model.op.injection_norm() >= u64


# ---- case 5: the float64 certificate's float32 W r, with r near W's null space ------------


def test_the_float64_certificate_counts_the_rounding_of_its_float32_product(monkeypatch):
    # The float64 certificate forms W r in float32 (docs/math.md §9, "W r in a lower
    # precision"). With m = 1 − 2⁻²⁰ and A = B = 0, W = 2⁻²⁰ I: ‖W r‖ is 2⁻²⁰ ‖r‖ while the
    # float32 product's rounding is about eps ‖r‖, a percent of it; every unit is active, so
    # the ball of eq. 15 is tight (z* on its edge). PR at α = 0.01 (its p amplifies
    # float32's rounding a hundredfold) stalls each row at float32's floor, and each is
    # certified in float64 at tol 1e-9.
    torch.manual_seed(0)
    model = build_model({**CONFIGS["fc"], "m": 1.0 - 2.0**-20})
    with torch.no_grad():
        model.op.A.weight.zero_()
        model.op.B.weight.zero_()
        model.op.U.bias.fill_(4.0)
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    ref = exact_equilibrium(model, x)
    kwargs = {"tol": 1e-9, "max_iter": 400, "alpha": 1e-2}
    result = assert_claims(model, x, monkeypatch, ref=ref, **kwargs)
    assert result.certified_in_float64.all()
    # Such rows take W r in float64 after all (their float32 error would pass the bound's
    # relative slack): the bound is within a few 1e-3 of an all-float64 certificate's.
    with monkeypatch.context() as patch:
        patch.setattr(models_module, "_ieee_float32_products", lambda device: False)
        wide = model.infer(x, **kwargs)
    ratio = result.error_bound.double() / wide.error_bound.double()
    assert ratio.max().item() <= 1.003, ratio.tolist()
    # Without the product's error (so with every W r in float32, uncounted) the claims
    # fail: the term is what holds them here.
    with monkeypatch.context() as patch:
        patch.setattr(bounds_module, "product_error", lambda norm, *_: torch.zeros_like(norm))
        uncounted, z, centre = infer_with_points(model, x, monkeypatch, **kwargs)
    bad = claim_violations(model, uncounted, z, centre, ref)
    assert any("error_bound" in b for b in bad), bad


# ---- precisions infer does not support -----------------------------------------------------


@pytest.mark.parametrize("cast, name", [("half", "float16"), ("bfloat16", "bfloat16")])
def test_infer_refuses_half_precision_naming_the_dtype(cast, name):
    # (torch's own 'linalg.inv: Low precision dtypes not supported' is not a clear error)
    torch.manual_seed(0)
    model = getattr(build_model(CONFIGS["fc"]), cast)()
    with pytest.raises(ValueError) as info:
        model.infer(torch.randn(1, 1, 6, 6))
    message = str(info.value)
    assert name in message
    assert "float32" in message and "float64" in message


def test_claims_hold_in_float64(monkeypatch):
    # the same adversarial null-space input, in float64: its rounding is 2⁻²⁹ of float32's
    model, v = null_space_case()
    model = model64(model)
    x = (1e6 * v).reshape(1, 1, 6, 6)
    result = assert_claims(model, x, monkeypatch, stop="tol", tol=1e-6)
    assert not result.certified_in_float64.any()  # (only float32 answers are certified again)
    assert math.isfinite(model.lipschitz_bound())
