"""Each monotone operator against its dense matrix, built independently (tests/problems.py).

float64, tiny sizes, exact answers: W and Wᵀ, strong monotonicity, the resolvent
(I + α(I − W))⁻¹ and its transpose, the FFT multiply against direct circular convolution,
the injection, and the resolvent cache.
"""

from __future__ import annotations

import math

import pytest
import torch
from problems import circ_conv, dense_of, dense_w_fc, dense_w_multitier, randomize_

from model_core.operators import FCOperator, MultiTierOperator, base, spectral
from model_core.operators.spectral import (
    crop_spectrum,
    from_spectrum,
    from_spectrum_adjoint,
    lift_spectrum,
    to_spectrum,
)

ALPHAS = [0.05, 0.5, 1.0, 3.0, 20.0]


def fc(m=1.0, seed=0):
    torch.manual_seed(seed)
    op = FCOperator(7, 9, m=m).double()
    with torch.no_grad():
        op.B.weight.mul_(3.0)  # a strong skew part
    return op


def tiers(channels, size, m=1.0, seed=0, in_channels=2):
    torch.manual_seed(seed)
    return randomize_(MultiTierOperator(in_channels, channels, size, m=m).double(), seed)


OPERATORS = {
    "fc": lambda m=1.0: (fc(m), None),
    "conv-even": lambda m=1.0: (tiers([3], 4, m), None),
    "conv-odd": lambda m=1.0: (tiers([2], 5, m), None),
    "2-tier": lambda m=1.0: (tiers([2, 3], 4, m), None),
    "2-tier-odd-input": lambda m=1.0: (tiers([2, 2], 6, m, in_channels=1), None),
    "3-tier": lambda m=1.0: (tiers([1, 2, 2], 4, m), None),  # grids 6, 4, 3
}


def dense_w(op) -> torch.Tensor:
    return dense_w_fc(op) if isinstance(op, FCOperator) else dense_w_multitier(op)


def n_of(op) -> int:
    return int(torch.Size(op.z_shape).numel())


@pytest.fixture(params=list(OPERATORS), ids=list(OPERATORS))
def op(request):
    return OPERATORS[request.param]()[0]


@torch.no_grad()
def test_multiply_and_transpose_equal_the_dense_matrix(op):
    w = dense_w(op)
    n = n_of(op)
    torch.testing.assert_close(dense_of(op.multiply, n, op.z_shape), w, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        dense_of(op.multiply_transpose, n, op.z_shape), w.T, rtol=0, atol=1e-12
    )


@torch.no_grad()
def test_transpose_is_the_adjoint(op):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, *op.z_shape, generator=g, dtype=torch.float64)
    b = torch.randn(3, *op.z_shape, generator=g, dtype=torch.float64)
    lhs = (op.multiply(a) * b).flatten(1).sum(1)
    rhs = (a * op.multiply_transpose(b)).flatten(1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [0.1, 1.0])
@pytest.mark.parametrize("name", list(OPERATORS))
@torch.no_grad()
def test_strongly_monotone(name, m):
    op, _ = OPERATORS[name](m)
    k = torch.eye(n_of(op), dtype=torch.float64) - dense_w(op)
    eig = torch.linalg.eigvalsh((k + k.T) / 2)
    assert eig.min().item() >= m - 1e-10
    assert eig.min().item() <= m + 5.0  # non-trivial weights: not m·I plus nothing


@pytest.mark.parametrize("alpha", ALPHAS)
@torch.no_grad()
def test_resolvent_inverts_i_plus_alpha_i_minus_w(op, alpha):
    n = n_of(op)
    a_mat = (1 + alpha) * torch.eye(n, dtype=torch.float64) - alpha * dense_w(op)
    res = op.resolvent(alpha)
    v = dense_of(res.inverse, n, op.z_shape)
    vt = dense_of(res.inverse_transpose, n, op.z_shape)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(v @ a_mat, eye, rtol=0, atol=1e-8)
    torch.testing.assert_close(a_mat @ v, eye, rtol=0, atol=1e-8)
    torch.testing.assert_close(vt @ a_mat.T, eye, rtol=0, atol=1e-8)
    torch.testing.assert_close(vt, v.T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("alpha", [0.05, 1.0, 20.0])
@torch.no_grad()
def test_inverse_injection_is_the_resolvent_of_the_scaled_injection(op, alpha):
    # PR's first half step V(α(Ux + b)) from the image: the convolutions form it as
    # (α T₁⁻¹ Û) x̂ + α T₁⁻¹ b̂ without the injection; against the dense V on α·bias(x).
    n = n_of(op)
    torch.manual_seed(1)
    shape = (3, 7) if isinstance(op, FCOperator) else (3, op.U.in_channels, *[op.sizes[0] - 2] * 2)
    x = torch.randn(*shape, dtype=torch.float64)
    op.U.bias.add_(0.7)  # a bias that matters: the zero frequency of every tier-1 channel
    a_mat = (1 + alpha) * torch.eye(n, dtype=torch.float64) - alpha * dense_w(op)
    want = torch.linalg.solve(a_mat, alpha * op.bias(x).reshape(3, n).T).T
    got = op.resolvent(alpha).inverse_injection(x)
    assert got.shape == (3, *op.z_shape)
    torch.testing.assert_close(got.reshape(3, n), want, rtol=0, atol=1e-10)


@torch.no_grad()
def test_inverse_injection_follows_a_changed_injection():
    # U and b are weights of the operator: the resolvent's composed V U is rebuilt with them.
    op = tiers([2, 3], 4)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    first = op.resolvent(0.7).inverse_injection(x)
    op.U.weight.mul_(-2.0)
    op.U.bias.add_(1.5)
    again = op.resolvent(0.7).inverse_injection(x)
    want = op.resolvent(0.7).inverse(0.7 * op.bias(x))
    torch.testing.assert_close(again, want, rtol=0, atol=1e-12)
    assert (again - first).abs().max() > 0.1


@torch.no_grad()
def test_resolvent_cache_reuses_and_rebuilds_on_weight_change():
    op = tiers([2, 2], 4)
    first = op.resolvent(0.7)
    assert op.resolvent(0.7) is first
    cached = dict(op._resolvents)
    aside = op.resolvent(0.3, cache=False)  # an α search: built aside, cache untouched
    assert aside.alpha == 0.3 and dict(op._resolvents) == cached
    op.A[0].add_(0.3 * torch.randn_like(op.A[0]))  # in place: same storage, new version
    fresh = op.resolvent(0.7)
    assert fresh is not first
    n = n_of(op)
    a_mat = 1.7 * torch.eye(n, dtype=torch.float64) - 0.7 * dense_w(op)
    v = dense_of(fresh.inverse, n, op.z_shape)
    torch.testing.assert_close(v @ a_mat, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-8)
    stale = dense_of(first.inverse, n, op.z_shape)
    assert (stale @ a_mat - torch.eye(n, dtype=torch.float64)).abs().max() > 1e-4
    # Writes through .data bypass the version counter; the cache compares values.
    op.B[1].data.mul_(-2.0)
    again = op.resolvent(0.7)
    assert again is not fresh and not fresh.is_current() and again.is_current()
    a_mat = 1.7 * torch.eye(n, dtype=torch.float64) - 0.7 * dense_w(op)
    v = dense_of(again.inverse, n, op.z_shape)
    torch.testing.assert_close(v @ a_mat, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(dense_of(op.multiply, n, op.z_shape), dense_w(op), rtol=0,
                               atol=1e-12)  # fmt: skip
    assert op.resolvent(0.7) is again  # unchanged values: a hit
    key = op._weights_key()
    op.h.data[0] = float("nan")  # bit patterns are compared: a NaN still matches its copy
    assert op._weights_key() != key and op._weights_key() == op._weights_key()


@pytest.mark.parametrize("size", [4, 5, 7])
@torch.no_grad()
def test_fft_multiply_equals_direct_circular_convolution(size):
    """Single tier: W z = (1 − m) z − Aᵀ(A z) + B z − Bᵀ z with circular 3×3 convolutions."""
    op = tiers([3], size, m=0.5)
    (a,), (b,), _ = op.weights()
    z = torch.randn(2, *op.z_shape, dtype=torch.float64)

    def conv_t(x, w):  # adjoint of circular conv: correlate with the flipped, transposed kernel
        return circ_conv(x, w.flip(-1, -2).transpose(0, 1))

    direct = 0.5 * z - conv_t(circ_conv(z, a), a) + circ_conv(z, b) - conv_t(z, b)
    torch.testing.assert_close(op.multiply(z), direct, rtol=0, atol=1e-12)


@pytest.mark.parametrize("r", [2, 3, 4, 5, 9, 17])
@torch.no_grad()
def test_lift_spectrum_is_the_zero_pad_in_space(r):
    """The multi-tier embedding P kept in the frequency domain: on the spectrum of a real
    r × r image it gives the spectrum of that image with a zero row and column appended."""
    x = torch.randn(3, 2, r, r, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1))
    torch.testing.assert_close(
        lift_spectrum(to_spectrum(x), r), to_spectrum(padded), rtol=0, atol=1e-12
    )
    back = from_spectrum(lift_spectrum(to_spectrum(x), r), r + 1)
    torch.testing.assert_close(back, padded, rtol=0, atol=1e-12)
    assert back[..., r, :].abs().max() < 1e-12 and back[..., :, r].abs().max() < 1e-12


@pytest.mark.parametrize("r", [4, 8, 9, 15, 17])
def test_crop_spectrum_is_the_crop_in_space_and_the_adjoint_of_the_lift(r):
    """The multi-tier Pᵀ kept in the frequency domain: on the spectrum of a real (r+1) × (r+1)
    image it gives the spectrum of its first r rows and columns, and it is the adjoint of
    lift_spectrum for the real inner product of the images."""
    x = torch.randn(3, 2, r + 1, r + 1, dtype=torch.float64)
    cropped = crop_spectrum(to_spectrum(x), r)
    want = to_spectrum(x[..., :r, :r].contiguous())
    torch.testing.assert_close(cropped, want, rtol=0, atol=1e-12)
    y = torch.randn(3, 2, r, r, dtype=torch.float64)
    lifted = from_spectrum(lift_spectrum(to_spectrum(y), r), r + 1)
    back = from_spectrum(cropped, r)
    torch.testing.assert_close((lifted * x).sum(), (y * back).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_to_spectrum_with_padded_samples_equals_rfft2(dtype, monkeypatch):
    """Samples whose transformed rows span a multiple of 4 KiB are written one cache line
    apart (a batched GEMM into a padded buffer): the spectrum is still rfft2's, and an input
    that needs a gradient takes the plain path."""
    n, s, b = (16, 30, 3) if dtype == torch.float64 else (32, 30, 3)  # 120 KiB per sample
    assert n * s * 2 * (s // 2 + 1) * torch.finfo(dtype).bits // 8 % 4096 == 0
    x = torch.randn(b, n, s, s, dtype=dtype, generator=torch.Generator().manual_seed(0))
    want = torch.fft.rfft2(x.double(), norm="ortho").reshape(b, n, -1).permute(2, 1, 0)
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or real_bmm(*a, **k))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    got = to_spectrum(x)
    assert len(calls) == 1  # the padded path ran
    torch.testing.assert_close(got.to(want.dtype), want, rtol=0, atol=tol)
    monkeypatch.setattr(spectral, "PAD_ALIASED_ROWS", False)
    torch.testing.assert_close(to_spectrum(x), got, rtol=0, atol=tol)
    monkeypatch.setattr(spectral, "PAD_ALIASED_ROWS", True)
    xg = x.clone().requires_grad_()
    to_spectrum(xg).abs().sum().backward()
    assert len(calls) == 1 and xg.grad is not None and xg.grad.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_from_spectrum_with_padded_columns_inverts_to_spectrum(dtype, monkeypatch):
    """Where ``n·B`` spectrum values span a multiple of 4 KiB, the row transform runs per
    column frequency into a padded buffer: the result is still the inverse transform."""
    n, b, s = (16, 32, 6) if dtype == torch.float64 else (16, 32, 7)  # 4 KiB = n·B·16 or ·8
    x = torch.randn(b, n, s, s, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y = to_spectrum(x)
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or real_bmm(*a, **k))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    got = from_spectrum(y, s)
    assert len(calls) == 1  # the padded path ran
    torch.testing.assert_close(got, x, rtol=0, atol=tol)
    monkeypatch.setattr(spectral, "PAD_ALIASED_ROWS", False)
    torch.testing.assert_close(from_spectrum(y, s), got, rtol=0, atol=tol)
    monkeypatch.setattr(spectral, "PAD_ALIASED_ROWS", True)
    yg = y.clone().requires_grad_()
    from_spectrum(yg, s).sum().backward()  # autograd takes the plain path
    assert len(calls) == 1 and yg.grad is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 7, 8])
def test_transforms_in_pieces_equal_the_whole_batch(rows, dtype):
    """``rows`` samples at a time into one result: every column as in one transform of the
    batch, up to the last bits a GEMM's row tail may round differently (float64 pieces of 1
    and 3 rows: 4e-16 here)."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(7, 3, 10, 10, generator=g, dtype=dtype)
    eps = torch.finfo(dtype).eps
    whole = to_spectrum(x)
    pieces = to_spectrum(x, rows)
    assert pieces.shape == whole.shape == (10 * 6, 3, 7) and pieces.dtype == whole.dtype
    torch.testing.assert_close(pieces, whole, rtol=0, atol=8 * eps)
    back = from_spectrum(whole, 10, rows)
    assert back.shape == x.shape and back.dtype == x.dtype
    torch.testing.assert_close(back, from_spectrum(whole, 10), rtol=0, atol=8 * eps)
    adj = from_spectrum_adjoint(x, rows)
    torch.testing.assert_close(adj, from_spectrum_adjoint(x), rtol=0, atol=16 * eps)
    xg = x.clone().requires_grad_()
    from_spectrum(to_spectrum(xg, rows), 10, rows).sum().backward()  # autograd through slices
    torch.testing.assert_close(xg.grad, torch.ones_like(x))  # a unitary round trip


def test_one_tier_chunks_hold_the_resolvent():
    """One tier: a solver chunk holds at least the resolvent's bytes of iterate (the
    81-channel CIFAR resolvent, 32 MB, is 85 samples), with transforms in half-budget
    pieces; the 32-channel Fashion-MNIST operator keeps the plain budget; several tiers
    twice the budget."""
    cifar = MultiTierOperator(3, [81], 32)
    assert cifar.chunk_scale == pytest.approx(34 * 18 * 81 * 81 * 8 / base.CPU_CHUNK_BYTES)
    z = torch.zeros(64, 81, 34, 34)
    assert base.chunk_rows(z, cifar.chunk_scale) == 64  # the batch in one chunk
    assert base.chunk_rows(torch.zeros(128, 81, 34, 34), cifar.chunk_scale) == 64
    assert cifar.transform_rows(z) == 8
    fmnist = MultiTierOperator(1, [32], 28)
    assert fmnist.chunk_scale == 1.0 and fmnist.transform_rows(torch.zeros(64, 32, 30, 30)) is None
    multi = MultiTierOperator(3, [16, 32, 60], 32)
    assert multi.chunk_scale == 2.0
    assert multi.transform_rows(torch.zeros(64, *multi.z_shape)) is None


@torch.no_grad()
def test_one_tier_resolvent_and_multiply_are_the_same_in_pieces(monkeypatch):
    """A chunk larger than the budget transforms in pieces: the resolvent, its transpose and
    ``W z`` equal the whole-batch transforms (float32, the served dtype)."""
    torch.manual_seed(0)
    op = MultiTierOperator(2, [6], 8)  # s = 10: a resolvent of 60·6·6 complex64 = 17 KB
    z = torch.randn(9, *op.z_shape)
    monkeypatch.setattr(base, "CPU_CHUNK_BYTES", 4096)  # 2,400 B a sample: pieces of 1 row
    assert op.chunk_scale > 1 and op.transform_rows(z) == 1
    res = op.resolvent(0.7, cache=False)
    got = (res.inverse(z), res.inverse_transpose(z), op.multiply(z), op.multiply_transpose(z))
    monkeypatch.setattr(MultiTierOperator, "transform_rows", lambda self, z: None)
    want = (res.inverse(z), res.inverse_transpose(z), op.multiply(z), op.multiply_transpose(z))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dft_matmul", [True, False], ids=["dft-gemm", "fft"])
@pytest.mark.parametrize("s", [2, 3, 4, 5, 6, 7])
@torch.no_grad()
def test_from_spectrum_adjoint_is_the_adjoint(s, dft_matmul, monkeypatch):
    """Σ x·from_spectrum(Y) = Re Σ conj(adj x)·Y for any half spectrum Y, including ones
    whose self-mirrored columns are not Hermitian (their imaginary parts are dropped)."""
    monkeypatch.setattr(spectral, "USE_DFT_MATMUL_ON_CPU", dft_matmul)
    g = torch.Generator().manual_seed(s)
    x = torch.randn(3, 2, s, s, generator=g, dtype=torch.float64)
    y = torch.randn(s * (s // 2 + 1), 2, 3, generator=g, dtype=torch.complex128)
    lhs = (x * from_spectrum(y, s)).sum()
    rhs = torch.vdot(from_spectrum_adjoint(x).reshape(-1), y.reshape(-1)).real
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("name", [k for k in OPERATORS if k != "fc"])
def test_multiply_known_has_the_gradient_of_multiply(name, chunked, monkeypatch):
    """Training's last layer application takes W z* from the solve and forms the parameter
    gradient in the frequency domain: equal to autograd through W z, parameter by parameter."""
    if chunked:
        monkeypatch.setattr(base, "CPU_CHUNK_BYTES", 1)  # one sample per chunk
    op = OPERATORS[name]()[0]
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, *op.z_shape, generator=g, dtype=torch.float64)
    v = torch.randn(3, *op.z_shape, generator=g, dtype=torch.float64)
    named = [(k, p) for k, p in op.named_parameters() if not k.startswith("U.")]
    want = torch.autograd.grad((op.multiply(z) * v).sum(), [p for _, p in named])
    with torch.no_grad():
        wz = op.multiply(z)
    out = op.multiply_known(z, wz)
    assert torch.equal(out, wz)
    got = torch.autograd.grad((out * v).sum(), [p for _, p in named])
    for (k, _), a, b in zip(named, got, want, strict=True):
        assert b.abs().max() > 1e-3, k  # every weight matters here
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=k)


@torch.no_grad()
def test_injection_is_u_x_plus_b():
    op = fc()
    x = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(op.bias(x), x @ op.U.weight.T + op.U.bias, rtol=0, atol=1e-12)
    conv = tiers([2, 3], 4, in_channels=2)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    u = conv.bias(x)
    assert u.shape == (3, *conv.z_shape)
    first = conv.split(u)[0]  # U is a 3×3 conv on the zero-padded image, into tier 1 only
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (2, 2, 2, 2)), conv.U.weight,
                                      conv.U.bias)  # fmt: skip
    torch.testing.assert_close(first, want, rtol=0, atol=1e-12)
    assert all(t.abs().max() == 0 for t in conv.split(u)[1:])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@torch.no_grad()
def test_cuda_matches_cpu():
    for name in OPERATORS:
        op, _ = OPERATORS[name]()
        z = torch.randn(3, *op.z_shape, dtype=torch.float64)
        want = (op.multiply(z), op.multiply_transpose(z), op.resolvent(0.9).inverse(z))
        op = op.cuda()
        zc = z.cuda()
        got = (op.multiply(zc), op.multiply_transpose(zc), op.resolvent(0.9).inverse(zc))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.cpu(), w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pieces_on_the_padded_transform_equal_the_whole_batch(dtype, monkeypatch):
    """A piece of ``rows`` samples whose ``n · rows`` complex values span a multiple of 4 KiB
    takes the padded row transform of :func:`from_spectrum`, which views the piece as one
    block: the piece is strided in the whole batch's spectrum (float64 multiplies of the
    fmnist-conv operator at batch 300 raised 'view size is not compatible')."""
    monkeypatch.setattr(spectral, "USE_DFT_MATMUL_ON_CPU", True)
    monkeypatch.setattr(spectral, "PAD_ALIASED_ROWS", True)
    rows = 256 // torch.empty((), dtype=dtype).element_size()  # 32 (float64), 64 (float32)
    n = 8  # n · rows · complex size = 4 KiB
    x = torch.randn(2 * rows + 3, n, 6, 6, generator=torch.Generator().manual_seed(0), dtype=dtype)
    whole = to_spectrum(x)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(
        from_spectrum(whole, 6, rows), from_spectrum(whole, 6), rtol=0, atol=8 * eps
    )
    torch.testing.assert_close(from_spectrum(whole, 6, rows), x, rtol=0, atol=64 * eps)


@pytest.mark.parametrize("m", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("name", list(OPERATORS))
def test_weight_norm_bounds_w_and_i_minus_w_from_above(name, m):
    # Both of weight_norm's bounds against the dense matrices' exact norms: never below
    # either (the rounding terms rely on it), and the tight bound exact where it claims to
    # be (fc; one conv tier) and never above the cheap one.
    op = OPERATORS[name](m)[0]
    w = dense_w(op)
    eye = torch.eye(w.shape[0], dtype=w.dtype)
    exact = max(torch.linalg.matrix_norm(w, ord=2), torch.linalg.matrix_norm(eye - w, ord=2))
    tight = op.weight_norm()
    with op.weights_in_training():
        op.clear_cache()
        cheap = op.weight_norm()
        assert op.weight_norm() == cheap  # cached
    assert op.weight_norm() == tight  # outside the scope: the tight one again
    assert exact.item() <= tight <= cheap
    if name == "fc":  # both matrices' norms, exactly
        assert tight == pytest.approx(exact.item(), rel=1e-9)
    elif op.tiers == 1:
        # max(m, |1 − m|) + ‖L − B + Bᵀ‖, the second norm exact
        k_minus = torch.linalg.matrix_norm(eye - w - op.m * eye, ord=2).item()
        assert tight == pytest.approx(max(op.m, abs(1.0 - op.m)) + k_minus, rel=1e-9)


def test_weight_norm_follows_the_weights_and_a_tight_bound_serves_training():
    op = tiers([2, 3], 4)
    tight = op.weight_norm()
    with op.weights_in_training():
        assert op.weight_norm() == tight  # held for these weights: as good, and free
        with torch.no_grad():
            op.log_g.add_(2.0)  # A_i = √g A0/‖A0‖ grows e-fold
        cheap = op.weight_norm()
    w = dense_w(op)
    assert torch.linalg.matrix_norm(w, ord=2).item() <= cheap != tight
    assert cheap >= op.weight_norm() > tight


@pytest.mark.parametrize("m", [0.3, 1.0])
def test_a_wide_fc_layer_bounds_w_from_the_weights_alone_in_training(m):
    # Above EXACT_NORM_MAX a training step takes the O(n²) bound, never below the exact one.
    torch.manual_seed(0)
    op = FCOperator(5, 300, m=m).double()
    w = dense_w_fc(op)
    eye = torch.eye(300, dtype=w.dtype)
    exact = max(torch.linalg.matrix_norm(w, ord=2), torch.linalg.matrix_norm(eye - w, ord=2))
    with op.weights_in_training():
        cheap = op.weight_norm()
    assert exact.item() <= op.weight_norm() <= cheap
    assert op.weight_norm() == pytest.approx(exact.item(), rel=1e-9)
    a, b = op.A.weight.detach(), op.B.weight.detach()
    one_inf = [(x.abs().sum(0).max() * x.abs().sum(1).max()).sqrt().item() for x in (a, b)]
    assert cheap == pytest.approx(max(m, 1 - m) + one_inf[0] ** 2 + 2 * one_inf[1], rel=1e-9)


@pytest.mark.parametrize("name", ["fc", "conv-even", "2-tier"])
@pytest.mark.parametrize("training", [False, True])
def test_weight_norm_of_non_finite_weights_is_inf(name, training):
    # A diverged step's NaN reaches the bound as inf (every rounding term then reads inf),
    # not as an eigensolver's "failed to converge".
    op = OPERATORS[name]()[0]
    with torch.no_grad():
        next(p for n, p in op.named_parameters() if n.startswith("B")).view(-1)[0] = math.nan
    if training:
        with op.weights_in_training():
            assert op.weight_norm() == math.inf
    else:
        assert op.weight_norm() == math.inf
