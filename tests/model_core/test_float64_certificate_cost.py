"""What keeps the float64 certificate cheap (docs/math.md §2 "Certified again in float64",
§9), pinned to give the answers that computing everything would.

A float32 answer that float32's rounding leaves undecided is certified again in float64 at
its point (``MonDEQClassifier._float64_certificate``), during the solve and at the answer.
Three things keep that cheap, and each must leave every answer as it was:

* the certificate that stopped a row during the solve is the one its answer reports: the
  answer does not compute it again at the same point (``_HeldCertificates``), and a kept
  certificate serves only a point equal to its own bit for bit;
* under ``stop="tol"`` a row whose float64 residual is sure to be above ``tol`` is not
  offered the certificate (``_above_tol``): a necessary condition, checked here against the
  float64 residual itself at every point the solve offers;
* the certificate forms ``W r`` in float32 and adds that product's error to its bound
  (``bounds.product_error``; the claims it keeps are checked against an independent float64
  equilibrium in ``test_rounding_claims.py``, case 5).
"""

from __future__ import annotations

import pytest
import torch
from test_float64_certificate_hostile import CONFIGS, inputs, small

import model_core.models as models_module
from model_core.bounds import ROUNDING_ULPS, product_error

EPS32 = torch.finfo(torch.float32).eps


def answer(result) -> dict[str, list]:
    """Every field of an answer, as lists (NaN radii as -1 so that equal answers compare
    equal)."""
    return {
        "iterations": result.stats.iterations.tolist(),
        "residual": result.stats.residual.tolist(),
        "converged": result.stats.converged.tolist(),
        "logits": result.logits.tolist(),
        "error_bound": result.error_bound.tolist(),
        "logit_error_bound": result.logit_error_bound.tolist(),
        "label_proven": result.label_proven.tolist(),
        "certified_radius": result.certified_radius.nan_to_num(-1.0).tolist(),
        "certified_in_float64": result.certified_in_float64.tolist(),
    }


class CertificateCalls:
    """Wraps ``model._float64_certificate`` (an instance attribute) to record each call's
    rows, points and certificate, and whether the solve had returned (the answer's)."""

    def __init__(self, model):
        self.calls: list[tuple[torch.Tensor, object, bool]] = []
        self.solved = False
        self._inner = model._float64_certificate

    def __call__(self, x, z):
        cert = self._inner(x, z)
        self.calls.append((z.clone(), cert, self.solved))
        return cert

    @property
    def rows(self) -> int:
        return sum(len(z) for z, _, _ in self.calls)


def infer_counting(model, x, **kwargs):
    """``model.infer(x, **kwargs)``, its :class:`CertificateCalls` and the solver's ``z``."""
    calls = CertificateCalls(model)
    seen = {}
    solve = model.deq.solve

    def solve_and_mark(*args, **kw):
        out = solve(*args, **kw)
        calls.solved, seen["z"] = True, out[0]
        return out

    model._float64_certificate = calls  # instance attributes, deleted below
    model.deq.solve = solve_and_mark
    try:
        result = model.infer(x, **kwargs)
    finally:
        del model._float64_certificate, model.deq.solve
    return result, calls, seen["z"]


# ---- the answer reports the certificate that stopped the row --------------------------------


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize(
    "kwargs",
    [{"tol": 1e-5}, {"stop": "logits", "logit_tol": 1e-6, "check_every": 2}],
    ids=["tol", "logits"],
)
def test_a_row_stopped_by_its_certificate_is_not_certified_again(arch, kwargs):
    model, x = small(arch, seed=2), inputs(10, seed=4)
    result, calls, z = infer_counting(model, x, **kwargs)
    # Every row stops on its float64 certificate during the solve (at 16 or 32, not the
    # cap), and the answer computes none.
    assert result.certified_in_float64.all()
    assert set(result.stats.iterations.tolist()) <= {16, 32}
    assert [at_answer for _, _, at_answer in calls.calls] == [False] * len(calls.calls)
    # Each row's answer is the certificate computed at its returned point, number for number.
    for row in range(10):
        certs = [
            (cert, i)
            for points, cert, _ in calls.calls
            for i in range(len(points))
            if torch.equal(points[i], z[row])
        ]
        cert, i = certs[-1]
        assert result.stats.residual[row].item() == cert.residual[i].item()
        assert result.stats.converged[row].item()
        assert result.logits[row].tolist() == cert.logits[i].tolist()
        assert result.error_bound[row].item() == cert.error_bound[i].item()
        assert result.logit_error_bound[row].tolist() == cert.logit_bound[i].tolist()
        assert result.label_proven[row].item() == cert.proven[i].item()


def test_a_row_certified_again_at_another_point_is_certified_at_the_answer():
    # max_iter 17: every row is offered the certificate at 16 (not met at tol 1e-7; at 8
    # float32's own bound leaves none undecided), runs one more iteration and stops at the
    # cap: the answer certifies it at that new point.
    model, x = small("conv", seed=2), inputs(10, seed=4)
    result, calls, z = infer_counting(model, x, tol=1e-7, max_iter=17)
    assert result.stats.iterations.tolist() == [17] * 10
    during = [points for points, _, at_answer in calls.calls if not at_answer]
    assert sum(len(points) for points in during) == 10
    answer_rows = sum(len(points) for points, _, at_answer in calls.calls if at_answer)
    assert answer_rows == int(result.certified_in_float64.sum()) > 0
    assert all(
        not torch.equal(p[i], z[row]) for p in during for i in range(len(p)) for row in range(10)
    )


def test_a_kept_certificate_serves_only_its_own_point():
    model, x = small("fc", seed=2), inputs(3, seed=4)
    with torch.no_grad():
        z, _, _ = model.deq.solve(x, tol=1e-12, max_iter=20)
        cert = model._float64_certificate(x, z)
    held = models_module._HeldCertificates()
    assert held.take(torch.tensor([0, 1, 2]), z) == (None, None)
    held.keep(torch.tensor([0, 1, 2]), z, cert, torch.tensor([True, True, False]))
    moved = z.clone()
    moved[0, 3] = torch.nextafter(moved[0, 3], torch.tensor(1.0))  # one ulp
    # asked in another order: row 1 at its point, row 0 one ulp away, row 2 never kept
    kept, found = held.take(torch.tensor([1, 0, 2]), moved[[1, 0, 2]])
    assert found.tolist() == [True, False, False]
    assert kept.residual[0].item() == cert.residual[1].item()
    assert kept.logits[0].tolist() == cert.logits[1].tolist()
    # a later certificate of a sample replaces the earlier one
    later = models_module._Certificate(*(t[[0]].clone() for t in cert))
    later = later._replace(residual=later.residual * 2)
    held.keep(torch.tensor([1]), z[[0]], later, torch.tensor([True]))
    assert held.take(torch.tensor([1]), z[[1]]) == (None, None)  # (kept at z[0]'s point now)
    kept, found = held.take(torch.tensor([1]), z[[0]])
    assert found.tolist() == [True] and kept.residual.item() == 2 * cert.residual[0].item()


# ---- the tol filter ------------------------------------------------------------------------


TOLS = [1e-4, 3e-5, 1e-5, 1e-6]


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_the_tol_filter_skips_only_rows_float64_cannot_meet(arch):
    # At every point the solve offers (iterations 8, 16, 32, ...), every row the filter
    # marks has a float64 residual above tol: the filter is a necessary condition.
    model, x = small(arch, seed=2), inputs(10, seed=4)
    offered = []
    make = model._certifier

    def certifier(x_, stop, logit_tol, tol, held):
        inner = make(x_, stop, logit_tol, tol, held)

        def certify(out):
            offered.append(
                (
                    tol,
                    out["x"].clone(),
                    out["pre"].clone(),
                    out["pre_scale"].clone(),
                    out["row"].clone(),
                )
            )
            return inner(out)

        return certify

    model._certifier = certifier  # an instance attribute, deleted below
    try:
        for tol in TOLS:
            for method in ("peaceman_rachford", "forward_backward"):
                model.infer(x, tol=tol, method=method, max_iter=80)
    finally:
        del model._certifier
    marked = 0
    for tol, z, pre, scale, rows in offered:
        z_norm, gap, rho = model._rounding_terms(z, pre, scale)
        above = models_module._above_tol(z_norm, gap, rho, tol)
        if not bool(above.any()):
            continue
        with torch.no_grad():
            cert = model._float64_certificate(x[rows[above]], z[above])
        assert (cert.residual > tol).all(), (tol, cert.residual.tolist())
        marked += int(above.sum())
    assert marked > 0  # (the check above ran on some rows)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_the_tol_filter_changes_no_answer(arch, monkeypatch):
    model, x = small(arch, seed=2), inputs(10, seed=4)
    fewer = False
    for tol in TOLS:
        for method in ("peaceman_rachford", "forward_backward"):
            kwargs = {"tol": tol, "method": method, "max_iter": 80}
            got, calls, _ = infer_counting(model, x, **kwargs)
            with monkeypatch.context() as patch:
                never = lambda z_norm, *_: torch.zeros_like(z_norm, dtype=torch.bool)  # noqa: E731
                patch.setattr(models_module, "_above_tol", never)
                expected, unfiltered, _ = infer_counting(model, x, **kwargs)
            assert answer(got) == answer(expected), kwargs
            assert calls.rows <= unfiltered.rows, kwargs
            fewer |= calls.rows < unfiltered.rows
    # (The small conv model's offered rows are all within float64's reach here.)
    assert fewer == (arch == "fc")  # the filter skipped some row


def test_above_tol_at_its_edges():
    z_norm = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    gap = torch.tensor([2e-4, 2e-4, 5.0, float("nan"), 1.1e-4])
    rho = torch.tensor([0.5e-4, 1.5e-4, 0.0, 0.0, 0.0])
    # (gap − ρ)/‖z‖: 1.5e-4 above 1e-4; 0.5e-4 below; ‖z‖ = 0 and NaN: the certificate
    # decides; 1.1e-4 above by far more than the allowance.
    assert models_module._above_tol(z_norm, gap, rho, 1e-4).tolist() == [
        True,
        False,
        False,
        False,
        True,
    ]
    # within the norms' and tol's allowance of tol: not marked
    edge = torch.tensor([1e-4 * (1 + 60 * EPS32)])
    assert not models_module._above_tol(torch.ones(1), edge, torch.zeros(1), 1e-4).item()


# ---- the float32 product's error -----------------------------------------------------------


def test_product_error_is_the_rounding_model_of_a_product_plus_the_cast():
    # 16 eps (‖r‖ + ‖W r‖ + ‖W‖ ‖r‖) for the product, eps ‖W‖ ‖r‖ for r's cast to float32
    got = product_error(
        torch.tensor([2.0], dtype=torch.float64),
        torch.tensor([3.0], dtype=torch.float64),
        torch.float32,
        5.0,
    )
    expected = ROUNDING_ULPS * EPS32 * (2.0 + 3.0 + 10.0) + EPS32 * 10.0
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-15)


# ---- which answers are offered the certificate ------------------------------------------------


def test_every_label_that_float64_proves_at_the_answer_is_offered_it():
    # The paper's CIFAR conv model at initialisation on CIFAR-shaped noise, tol 1e-2: labels
    # whose float32 bound misses a proof by less than its own rounding term, a small share
    # of the bound (under FLOAT64_SHARE). The certificate at every unproven answer's point
    # proves some; each of those must be one the answer was certified with.
    torch.manual_seed(0)
    config = {"arch": "conv", "channels": 81, "in_channels": 3, "image_size": 32}
    model = models_module.build_model({**config, "num_classes": 10}).eval()
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result, calls, z = infer_counting(model, x)
    # unproven in float32: unproven now, or certified in float64 (which replaced the proof)
    unproven = (~result.label_proven | result.certified_in_float64).nonzero().squeeze(1)
    fresh = model._float64_certificate(x[unproven], z[unproven])
    provable = unproven[fresh.proven]
    assert len(provable) > 0  # the case exists: not a vacuous check
    assert result.certified_in_float64[provable].all()
    assert result.label_proven[provable].all()
    assert calls.rows == int(result.certified_in_float64.sum())
