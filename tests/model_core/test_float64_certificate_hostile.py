"""The float64 certificate of float32 answers (docs/math.md §2 "Certified again in float64",
§9), attacked from the edges a hostile caller reaches.

A float32 answer whose own test is stuck at its rounding floor is certified again in float64
at its point (``MonDEQClassifier._float64_certificate``), during the solve and at the answer,
and cast back to float32. These tests pin what must survive that round trip:

* a logit whose float64 value lies beyond float32's range casts to ``inf``; its bound must
  then say so (a finite bound on ``|inf − l*|`` is a false claim);
* ``infer`` called under ``torch.inference_mode()``, PyTorch's recommended inference
  context, must give the same answer as under ``no_grad`` (the float64 copy of the model is
  built inside the call);
* an empty batch is answered with empty results, as the solver loop already does;
* the compacting, masked and graphed loops (and CPU chunking, which offsets the rows the
  certificate indexes) give identical iterations and flags, at ``max_iter`` on either side of
  the first certification (8) and with ``check_every`` 2 and 3;
* the float64 copy follows weights written in place, through ``.data`` included;
* a NaN, infinite or zero batchmate changes no other row's certified answer, and claims
  nothing itself.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import model_core.operators.base as operators_base
from model_core import build_model

CONFIGS = {
    "fc": {"arch": "fc", "in_channels": 1, "image_size": 6, "hidden": 12},
    "conv": {"arch": "conv", "in_channels": 1, "image_size": 6, "channels": 2},
}


def small(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(CONFIGS[arch])


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


def flags(result) -> dict[str, list]:
    """What must agree exactly between two solves of the same batch."""
    return {
        "iterations": result.stats.iterations.tolist(),
        "converged": result.stats.converged.tolist(),
        "label_proven": result.label_proven.tolist(),
        "certified_in_float64": result.certified_in_float64.tolist(),
    }


# ---- a logit past float32's range ----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs", [{"tol": 1e-5}, {"stop": "logits", "logit_tol": 1e33}], ids=["tol", "logits"]
)
def test_a_logit_beyond_float32s_range_does_not_get_a_finite_bound(kwargs):
    # Class 0's exact logit is 3.41e38 and 3.71e38, past float32's largest 3.40e38: the float64
    # certificate's logits cast to inf there. The float32 path reports an infinite bound for
    # such a logit (its rounding term grows with |l|); the float64 one returned 3.5e31, a
    # claim |inf − l*| ≤ 3.5e31 about a finite l*.
    model = small("fc")
    with torch.no_grad():
        model.head.weight[0] = 3e37
        model.head.bias[0] = 3e38
    x = inputs(2)
    exact = copy.deepcopy(model).double().infer(x.double(), tol=1e-10, max_iter=2000)
    assert exact.stats.converged.all()
    assert exact.logits[:, 0].min().item() > torch.finfo(torch.float32).max
    assert exact.labels.tolist() == [0, 0]
    result = model.infer(x, **kwargs)
    assert result.certified_in_float64.tolist() == [True, True]
    assert result.logits[:, 0].tolist() == [math.inf, math.inf]
    error = (result.logits.double() - exact.logits).abs()
    held = bool((error <= result.logit_error_bound.double()).all())
    assert held, (
        f"|l0 − l*0| {error[:, 0].tolist()} > bound {result.logit_error_bound[:, 0].tolist()}"
    )


# ---- torch.inference_mode ------------------------------------------------------------------


def test_infer_under_inference_mode_gives_the_no_grad_answer():
    # The float64 copy built inside inference_mode holds inference tensors, and its weights
    # key reads their version counter, which inference tensors do not have: RuntimeError
    # 'Inference tensors do not track version counter' from the first certificate on.
    x = inputs(4)
    expected = small("fc").infer(x, tol=1e-5)
    assert expected.certified_in_float64.all() and expected.stats.converged.all()
    model = small("fc")
    with torch.inference_mode():
        first = model.infer(x, tol=1e-5)
        again = model.infer(x, tol=1e-5)
    for result in (first, again):
        assert flags(result) == flags(expected)
        assert torch.equal(result.logits, expected.logits)
        assert torch.equal(result.logit_error_bound, expected.logit_error_bound)


# ---- an empty batch ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("stop", ["tol", "label"])
def test_an_empty_batch_gets_an_empty_answer(arch, stop):
    # iterate answers a batch of 0 with empty outputs; infer raised RuntimeError 'cannot
    # reshape tensor of 0 elements into shape [0, -1]' from U x + b's flatten (fc) or the
    # injection's rounding scale (conv), before and after the float64 certificate.
    result = small(arch).infer(inputs(1)[:0], tol=1e-5, stop=stop)
    assert result.logits.shape == (0, 10)
    assert result.logit_error_bound.shape == (0, 10)
    for name in ("certified_radius", "error_bound", "label_proven", "certified_in_float64"):
        assert getattr(result, name).shape == (0,), name
    assert result.stats.iterations.shape == result.stats.converged.shape == (0,)


# ---- the loops agree -----------------------------------------------------------------------


# Per setting: the ten rows' iterations (one number: the same for each) and how many of them
# were certified in float64 (each architecture has a setting where some rows are and others
# are not; these follow the bound on ‖W‖ the rounding terms read, MonotoneOperator.weight_norm).
# The certificate is first offered at check 8: iteration 8 under tol, 16 with check_every 2,
# 24 with 3; max_iter 8 offers none during the solve (the answer's certificate still runs).
LOOP_CASES = {
    "fc": [
        ({"tol": 1e-5, "max_iter": 8}, 8, 10),
        ({"tol": 1e-5, "max_iter": 9}, 9, 10),
        ({"tol": 1e-6, "max_iter": 40}, 16, 10),
        ({"tol": 7e-5}, [16, 11, 12, 13, 13, 11, 11, 11, 16, 11], 2),
        ({"stop": "logits", "logit_tol": 1e-6, "check_every": 2}, 16, 10),
        ({"stop": "logits", "logit_tol": 3e-7, "check_every": 3}, 24, 10),
    ],
    "conv": [
        ({"tol": 1e-5, "max_iter": 8}, 8, 0),
        ({"tol": 1e-5, "max_iter": 10}, 10, 9),
        ({"tol": 1e-6, "max_iter": 40}, 32, 10),
        ({"tol": 3e-5}, [32, 16, 32, 32, 32, 16, 32, 32, 32, 16], 10),
        ({"stop": "logits", "logit_tol": 1e-6, "check_every": 2}, 32, 10),
        ({"stop": "logits", "logit_tol": 3e-7, "check_every": 3}, 24, 10),
    ],
}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_every_loop_and_chunking_give_the_same_certified_answers(arch, monkeypatch):
    model, x = small(arch, seed=2), inputs(10, seed=4)
    z, _, _ = model.deq.solve(x, tol=1e-3)
    scale = 1.0 + model.op.weight_norm() / model.op.m
    floor = torch.finfo(torch.float32).eps * z.flatten(1).norm(dim=1) * scale
    for kwargs, iterations, certified in LOOP_CASES[arch]:
        base = model.infer(x, loop="compact", **kwargs)
        expected = iterations if isinstance(iterations, list) else [iterations] * 10
        assert base.stats.iterations.tolist() == expected, kwargs
        assert int(base.certified_in_float64.sum()) == certified, kwargs
        runs = {
            f"{loop}/{sync_every}": model.infer(x, loop=loop, sync_every=sync_every, **kwargs)
            for loop, sync_every in [("masked", 1), ("masked", 7), ("graphed", 4)]
        }
        with monkeypatch.context() as patch:
            # chunks of a row or two: the certificate reads each chunk's rows at an offset
            patch.setattr(operators_base, "CPU_CHUNK_BYTES", 200)
            runs["chunked"] = model.infer(x, loop="compact", **kwargs)
        for name, other in runs.items():
            assert flags(other) == flags(base), (kwargs, name)
            torch.testing.assert_close(other.logits, base.logits, rtol=1e-5, atol=1e-6)
            # A batch of another shape may sum a GEMM in another order (MKL on AMD EPYC
            # does, on rows 8-9 of this batch): the float32 point moves by an ulp, and a
            # bound at float32's floor, or a float64 one at that point, by up to its
            # rounding level eps‖z‖(1 + ‖W‖/m) (measured: a tenth of it).
            moved = (other.error_bound - base.error_bound).abs()
            allowed = 1e-5 * base.error_bound + floor
            assert bool((moved <= allowed).all()), (kwargs, name, (moved / allowed).max())


# ---- weights written in place --------------------------------------------------------------


MUTATIONS = {
    "head weight through .data": lambda m: m.head.weight.data.copy_(m.head.weight.data.flip(0)),
    "head bias": lambda m: m.head.bias.add_(3.0),
    "A through .data": lambda m: m.op.A.weight.data.mul_(1.3),
    "U bias through .data": lambda m: m.op.U.bias.data.add_(0.5),
    "m": lambda m: setattr(m.op, "m", 2.0),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_float64_copy_follows_weights_written_in_place(mutation):
    x = inputs(6)
    model = small("fc")
    assert model.infer(x, tol=1e-5).certified_in_float64.all()  # builds the float64 copy
    fresh = small("fc")
    with torch.no_grad():
        MUTATIONS[mutation](model)
        MUTATIONS[mutation](fresh)
    for kwargs in ({"tol": 1e-5}, {"tol": 1e-6, "max_iter": 40}):
        got, expected = model.infer(x, **kwargs), fresh.infer(x, **kwargs)
        assert got.certified_in_float64.all()
        assert flags(got) == flags(expected)
        for name in ("logits", "error_bound", "logit_error_bound"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name
        radius, radius_fresh = got.certified_radius, expected.certified_radius
        assert torch.equal(radius.nan_to_num(-1.0), radius_fresh.nan_to_num(-1.0))
        assert torch.equal(got.stats.residual, expected.stats.residual)


# ---- NaN, infinite and zero batchmates -----------------------------------------------------


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("loop", ["compact", "masked"])
def test_a_non_finite_batchmate_changes_no_certified_answer(arch, loop):
    model = small(arch)
    x = inputs(6)
    x[1, 0, 2, 3] = math.nan
    x[2, 0, 1, 1] = math.inf
    x[3] = 0.0
    x[4] = -math.inf
    result = model.infer(x, tol=1e-5, loop=loop)
    for row in (1, 2, 4):  # claims nothing
        assert not result.stats.converged[row] and not result.label_proven[row]
        assert not result.certified_in_float64[row]
        assert math.isnan(result.certified_radius[row])
        assert result.error_bound[row].item() == math.inf
    for row in (0, 3, 5):  # the same answer as alone
        alone = model.infer(x[row : row + 1], tol=1e-5, loop=loop)
        mine = {name: values[row] for name, values in flags(result).items()}
        assert mine == {name: values[0] for name, values in flags(alone).items()}, row
        torch.testing.assert_close(result.logits[row], alone.logits[0], rtol=1e-5, atol=1e-6)
    assert result.certified_in_float64[[0, 5]].all() and result.stats.converged[[0, 5]].all()
