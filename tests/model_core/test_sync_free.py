"""The GPU's solver loops give today's answers: the masked loop (no host sync inside the
iteration) and the graphed one (bucketed buffers, CUDA graphs on a GPU) against the
compacting loop, on the CPU and, where there is one, on CUDA.

Equal means: per-sample iteration counts, converged flags, labels and label_proven exactly;
points, residuals and bounds to float rounding (a compacted batch changes the shapes the
operators sum over, so its bits may differ in the last place).
"""

from __future__ import annotations

import threading

import pytest
import torch
from problems import dense_w_fc

from model_core import build_model, cuda_graphs
from model_core.nonlinearity import ReLU
from model_core.solvers import (
    LOOPS,
    SOLVERS,
    default_loop,
    get_solver,
    solve_backward,
    solve_forward,
)

MASKED = ("masked", "graphed")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def mixed_problem(batch=12, seed=5, device="cpu"):
    """An FC problem in float64 whose rows stop at many different iterations."""
    torch.manual_seed(seed)
    from model_core.operators import FCOperator

    op = FCOperator(5, 12, m=0.5).double()
    with torch.no_grad():
        op.A.weight.mul_(2.0)
        op.B.weight.mul_(2.0)
    x = torch.randn(batch, 5, dtype=torch.float64)
    scale = torch.logspace(-3, 0.5, batch, dtype=torch.float64)[:, None]
    op = op.to(device)
    return op, (op.bias(x.to(device)) * scale.to(device)).detach()


def assert_same_solve(a, b, *, rtol=1e-9, atol=1e-12):
    """``(point, stats)`` pairs: counts and flags exactly, values to rounding."""
    (za, sa), (zb, sb) = a, b
    assert torch.equal(sa.iterations.cpu(), sb.iterations.cpu())
    assert torch.equal(sa.converged.cpu(), sb.converged.cpu())
    torch.testing.assert_close(zb.cpu(), za.cpu(), rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(
        sb.residual.cpu(), sa.residual.cpu(), rtol=1e-6, atol=atol, equal_nan=True
    )


@pytest.mark.parametrize("loop", MASKED)
@pytest.mark.parametrize("method", sorted(SOLVERS))
@torch.no_grad()
def test_forward_answers_equal_the_compact_loop(method, loop):
    op, bias = mixed_problem()
    alpha = get_solver(method).safe_alpha(op)
    kw = {"method": method, "alpha": alpha, "tol": 1e-7, "max_iter": 2000}
    ref = solve_forward(op, ReLU(), bias, **kw, loop="compact")
    assert ref[1].iterations.unique().numel() >= 4  # rows really stop at different times
    got = solve_forward(op, ReLU(), bias, **kw, loop=loop)
    assert_same_solve(ref, got)
    assert got[1].extra["loop"] == {"masked": "masked", "graphed": "bucketed"}[loop]
    assert ref[1].extra["loop"] == "compact"


@pytest.mark.parametrize("loop", MASKED)
@pytest.mark.parametrize("method", sorted(SOLVERS))
@torch.no_grad()
def test_backward_answers_equal_the_compact_loop(method, loop):
    op, bias = mixed_problem(seed=8)
    torch.manual_seed(1)
    jac = (torch.rand_like(bias) > 0.3).double()
    grad = torch.randn_like(bias) * torch.logspace(-3, 1, len(bias), dtype=bias.dtype)[:, None]
    alpha = get_solver(method).safe_alpha(op)
    kw = {"method": method, "alpha": alpha, "tol": 1e-8, "max_iter": 2000}
    ref = solve_backward(op, jac, grad, **kw, loop="compact")
    assert ref[1].iterations.unique().numel() >= 2
    assert_same_solve(ref, solve_backward(op, jac, grad, **kw, loop=loop))


@pytest.mark.parametrize("loop", MASKED)
@torch.no_grad()
def test_each_row_keeps_its_solo_answer_and_count(loop):
    """A stopped row's state is frozen at the iteration it stopped: its answer is its solo
    solve's, whatever the rows beside it still do."""
    op, bias = mixed_problem(batch=7, seed=2)
    kw = {"method": "peaceman_rachford", "alpha": 1.0, "tol": 1e-9, "max_iter": 500}
    z, st = solve_forward(op, ReLU(), bias, **kw, loop=loop)
    for i in range(len(bias)):
        zi, si = solve_forward(op, ReLU(), bias[i : i + 1], **kw, loop="compact")
        assert st.iterations[i].item() == si.iterations.item()
        torch.testing.assert_close(z[i : i + 1], zi, rtol=0, atol=1e-12)
    w = dense_w_fc(op)
    assert ((z - torch.relu(z @ w.T + bias)).norm(dim=1) <= 1e-8 * z.norm(dim=1)).all()


@pytest.mark.parametrize("loop", MASKED)
@torch.no_grad()
def test_the_cap_and_non_finite_rows_as_in_the_compact_loop(loop):
    """max_iter: unconverged rows report the cap and their true residual; a NaN row stops on
    its first step with a NaN residual, the others are untouched."""
    op, bias = mixed_problem(batch=6, seed=3)
    bias[2, 0] = float("nan")
    for max_iter in (1, 2, 3, 40):
        kw = {"method": "forward_backward", "alpha": 0.05, "tol": 1e-6, "max_iter": max_iter}
        ref = solve_forward(op, ReLU(), bias, **kw, loop="compact")
        got = solve_forward(op, ReLU(), bias, **kw, loop=loop)
        assert_same_solve(ref, got)
        assert got[1].iterations[2].item() == 1 and got[1].residual[2].isnan().item()
    assert (got[1].iterations[[0, 1, 3, 4, 5]] == 40).any()  # the cap was reached


@pytest.mark.parametrize("sync_every", [1, 2, 3, 7, 1000])
@torch.no_grad()
def test_sync_every_changes_no_answer(sync_every):
    """The host reads "anyone still running" every sync_every iterations; the iterations
    run past a row's stop are masked out, bit for bit."""
    op, bias = mixed_problem(seed=4)
    kw = {"method": "peaceman_rachford", "alpha": 0.5, "tol": 1e-8, "max_iter": 300}
    base = solve_forward(op, ReLU(), bias, **kw, loop="masked", sync_every=1)
    for loop in MASKED:
        z, st = solve_forward(op, ReLU(), bias, **kw, loop=loop, sync_every=sync_every)
        assert torch.equal(st.iterations, base[1].iterations)
        assert torch.equal(z, base[0]) and torch.equal(st.residual, base[1].residual)


@torch.no_grad()
def test_buckets_pad_and_are_reused_across_batch_sizes():
    """Batches of 1 to 13 rows through the buckets 1…16, a smaller batch after a larger one
    in the same bucket (its padding rows held the earlier start): each equals the masked
    loop's answer on its rows alone."""
    cuda_graphs.clear()
    op, bias = mixed_problem(batch=13, seed=6)
    kw = {"method": "peaceman_rachford", "alpha": 1.0, "tol": 1e-8, "max_iter": 300}
    for rows in (13, 1, 5, 12, 3, 13, 2):
        ref = solve_forward(op, ReLU(), bias[:rows], **kw, loop="masked")
        got = solve_forward(op, ReLU(), bias[:rows], **kw, loop="graphed")
        assert got[1].extra["loop"] == "bucketed"
        assert_same_solve(ref, got)  # (padded to the bucket: the GEMMs' rounding may differ)
    assert cuda_graphs.bucket_for(13, 8) == 16 and cuda_graphs.bucket_for(5, 8) == 6
    assert cuda_graphs.bucket_for(1025, 8) is None
    assert cuda_graphs.bucket_for(1000, cuda_graphs.MAX_BUCKET_BYTES // 512) is None


def small_models():
    torch.manual_seed(0)
    fc = build_model({"arch": "fc", "in_channels": 1, "image_size": SIZE, "hidden": 40}).eval()
    conv = build_model({"arch": "conv", "in_channels": 1, "image_size": SIZE, "channels": 4})
    return {"fc": fc, "conv": conv.eval()}


SIZE = 12  # image side of the small models
INFER_RULES = [
    ("tol", {"tol": 1e-4}),
    ("tol", {"tol": "floor"}),  # under float32's floor (UNDER_FLOOR): the float64 certificate
    ("label", {}),
    ("label", {"check_every": 2}),
    ("logits", {"logit_tol": 0.5}),
]


# A tol under float32's floor on each small model at which the float64 certificate stops some
# rows at iteration 16 and others at 32.
UNDER_FLOOR = {"fc": 1e-6, "conv": 3e-6}


def assert_same_inference(a, b):
    assert torch.equal(a.stats.iterations.cpu(), b.stats.iterations.cpu())
    assert torch.equal(a.stats.converged.cpu(), b.stats.converged.cpu())
    assert torch.equal(a.labels.cpu(), b.labels.cpu())
    assert torch.equal(a.label_proven.cpu(), b.label_proven.cpu())
    assert torch.equal(a.certified_in_float64.cpu(), b.certified_in_float64.cpu())
    torch.testing.assert_close(b.logits.cpu(), a.logits.cpu(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.error_bound.cpu(), a.error_bound.cpu(), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(b.stats.residual.cpu(), a.stats.residual.cpu(), rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(
        b.certified_radius.cpu(), a.certified_radius.cpu(), rtol=1e-3, atol=1e-6, equal_nan=True
    )


@pytest.mark.parametrize("stop,extra", INFER_RULES)
@pytest.mark.parametrize("arch", ["fc", "conv"])
def test_infer_answers_equal_under_every_loop(arch, stop, extra):
    """Float32 models, rows proven or converged at different iterations: every loop gives
    the compact loop's counts, flags, labels, proofs, and its bounds to rounding."""
    model = small_models()[arch]
    torch.manual_seed(1)
    x = torch.randn(12, 1, SIZE, SIZE) * torch.logspace(-2, 1, 12)[:, None, None, None]
    extra = {"max_iter": 60, **extra}  # (a near-tie is never proven: it runs to the cap)
    floor = extra.get("tol") == "floor"
    if floor:
        extra["tol"] = UNDER_FLOOR[arch]
    ref = model.infer(x, stop=stop, loop="compact", **extra)
    assert ref.stats.iterations.unique().numel() >= 2
    if floor:  # every row stopped by the certificate, at 16 or 32, converged
        assert ref.certified_in_float64.all() and ref.stats.converged.all()
        assert set(ref.stats.iterations.tolist()) == {16, 32}
    for loop in MASKED:
        got = model.infer(x, stop=stop, loop=loop, **extra)
        assert_same_inference(ref, got)


def test_loops_and_sync_every_are_checked():
    op, bias = mixed_problem(batch=2)
    kw = {"method": "peaceman_rachford", "alpha": 1.0, "tol": 1e-6, "max_iter": 10}
    with pytest.raises(ValueError, match="loop must be one of compact, masked, graphed"):
        solve_forward(op, ReLU(), bias, **kw, loop="fast")
    with pytest.raises(ValueError, match="sync_every must be >= 1, got 0"):
        solve_forward(op, ReLU(), bias, **kw, loop="masked", sync_every=0)
    assert LOOPS == ("compact", "masked", "graphed")
    assert default_loop(torch.device("cpu")) == "compact"
    assert default_loop(torch.device("cuda")) == "masked"
    model = small_models()["fc"]
    assert model.infer(torch.randn(2, 1, SIZE, SIZE)).stats.extra["loop"] == "compact"  # CPU


# ---- CUDA: the same answers with captured graphs (skipped without a GPU) ---------------


def graphed_infer(model, x, **kw):
    """Solve until the graphs are captured and replayed (the CAPTURE_AFTER_USES-th use)."""
    for _ in range(cuda_graphs.CAPTURE_AFTER_USES):
        res = model.infer(x, **kw)
    return res


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("stop,extra", INFER_RULES)
@pytest.mark.parametrize("arch", ["fc", "conv"])
def test_cuda_graphs_give_the_compact_loops_answers(arch, stop, extra):
    if extra.get("tol") == "floor":  # (the certificate runs between the graphs' replays)
        extra = {**extra, "tol": UNDER_FLOOR[arch]}
    cuda_graphs.clear()
    model = small_models()[arch].cuda()
    torch.manual_seed(1)
    x = torch.randn(37, 1, SIZE, SIZE, device="cuda")
    x = x * torch.logspace(-2, 1, 37, device="cuda")[:, None, None, None]
    ref = model.infer(x, stop=stop, loop="compact", **extra)
    first = model.infer(x, stop=stop, **extra)  # the default on CUDA: graphed
    assert first.stats.extra["loop"] == "masked"  # the first use runs without graphs
    got = graphed_infer(model, x, stop=stop, **extra)
    assert got.stats.extra["loop"] == "cuda_graphs"
    assert_same_inference(ref, first)
    assert_same_inference(ref, got)
    for rows in (1, 5, 37):  # other buckets, and a smaller batch in a used one
        sub = graphed_infer(model, x[:rows], stop=stop, **extra)
        assert sub.stats.extra["loop"] == "cuda_graphs"
        assert_same_inference(model.infer(x[:rows], stop=stop, loop="compact", **extra), sub)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("method", sorted(SOLVERS))
@torch.no_grad()
def test_cuda_loops_equal_on_dense_problems(method):
    cuda_graphs.clear()
    op, bias = mixed_problem(device="cuda")
    alpha = get_solver(method).safe_alpha(op)
    kw = {"method": method, "alpha": alpha, "tol": 1e-7, "max_iter": 2000}
    ref = solve_forward(op, ReLU(), bias, **kw, loop="compact")
    for loop in ("masked", "graphed", "graphed", "graphed"):
        assert_same_solve(ref, solve_forward(op, ReLU(), bias, **kw, loop=loop))
    assert solve_forward(op, ReLU(), bias, **kw)[1].extra["loop"] == "cuda_graphs"
    jac = (torch.rand_like(bias) > 0.3).double()
    grad = torch.randn_like(bias)
    bkw = {**kw, "tol": 1e-8}
    ref = solve_backward(op, jac, grad, **bkw, loop="compact")
    for _ in range(3):
        got = solve_backward(op, jac, grad, **bkw)
        assert_same_solve(ref, got)
    assert got[1].extra["loop"] == "cuda_graphs"


@pytest.mark.cuda
@CUDA
@torch.no_grad()
def test_cuda_graphs_follow_changed_weights():
    """New weights (in place, as an optimizer step; or a replaced .data of the stopping
    rule's head) are solved with them, never with a stale graph."""
    cuda_graphs.clear()
    model = small_models()["conv"].cuda()
    x = torch.randn(9, 1, SIZE, SIZE, device="cuda")
    graphed_infer(model, x, stop="label")
    for change in (
        lambda: model.op.A.weight.mul_(0.9) if hasattr(model.op, "A") else None,
        lambda: next(model.op.parameters()).mul_(0.9),
        lambda: setattr(model.head.weight, "data", model.head.weight.data * 1.5),
    ):
        change()
        got = graphed_infer(model, x, stop="label")
        assert got.stats.extra["loop"] == "cuda_graphs"
        assert_same_inference(model.infer(x, stop="label", loop="compact"), got)


@pytest.mark.cuda
@CUDA
@torch.no_grad()
def test_cuda_graphs_are_not_shared_by_threads_at_once():
    """Two threads solving the same problem in one bucket: one replays the graphs, the
    other runs the masked loop meanwhile; both get their own answers."""
    cuda_graphs.clear()
    model = small_models()["conv"].cuda()
    torch.manual_seed(2)
    xs = [torch.randn(8, 1, SIZE, SIZE, device="cuda") for _ in range(2)]
    graphed_infer(model, xs[0])
    refs = [model.infer(x, loop="compact") for x in xs]
    results: dict[int, object] = {}
    barrier = threading.Barrier(2)

    def solve(i):
        barrier.wait()
        for _ in range(5):
            results[i] = model.infer(xs[i], between=lambda: None)

    threads = [threading.Thread(target=solve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert_same_inference(refs[i], results[i])
