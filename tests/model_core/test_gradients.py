"""Implicit gradients (Theorems 2 and 3) against a dense implicit-function solve and finite
differences, for both backward solvers, in float64."""

from __future__ import annotations

import pytest
import torch
from problems import dense_of, dense_w_fc, dense_w_multitier

from model_core import build_model

BACKWARD = ["peaceman_rachford", "forward_backward"]
FC = {"arch": "fc", "in_channels": 1, "image_size": 3, "hidden": 10, "num_classes": 4, "m": 0.5}
CONV = {"arch": "multi_tier", "in_channels": 1, "image_size": 4, "channels": [2, 2],
        "num_classes": 3, "m": 0.5}  # fmt: skip
CONV1 = {"arch": "conv", "in_channels": 2, "image_size": 3, "channels": 3, "num_classes": 3,
         "m": 0.5}  # fmt: skip
# Above float64's certified floor for these weights (ρ/‖z‖ 1e-13 to 3.3e-13, docs/math.md §2):
# below it every solve would run to max_iter.
TIGHT = {"tol": 1e-12, "max_iter": 50_000}


def make(config, backward):
    torch.manual_seed(0)
    model = build_model(config).double()
    with torch.no_grad():
        for p in model.deq.op.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.set_solver(**TIGHT, backward_method=backward, backward_alpha=None)
    return model


def loss_fn(model, x, r):
    return (model(x) * r).sum()


@pytest.mark.parametrize("backward", BACKWARD)
def test_fc_gradients_match_a_dense_implicit_function_solve(backward):
    model = make(FC, backward)
    op = model.deq.op
    x = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, dtype=torch.float64)
    loss_fn(model, x, r).backward()
    stats = model.deq.last_backward_stats
    assert stats.iterations.shape == (3,) and stats.converged.all()
    assert stats.method == backward and stats.direction == "backward"

    # Dense: z* from the solve, J = 1[Wz + Ux + b > 0], v = (I − J W)⁻ᵀ Jᵀ g ... per sample.
    with torch.no_grad():
        w = dense_w_fc(op)
        xf = x.detach().flatten(1)
        z, _, _ = model.deq.solve(x.detach())
        pre = z @ w.T + xf @ op.U.weight.T + op.U.bias
        torch.testing.assert_close(z, torch.relu(pre), rtol=0, atol=1e-10)
        g = r @ model.head.weight  # ∂L/∂z
    params = {"A": op.A.weight, "B": op.B.weight, "U": op.U.weight, "b": op.U.bias}
    want = {k: torch.zeros_like(p) for k, p in params.items()}
    want_x = torch.zeros_like(xf)
    n = w.shape[0]
    for i in range(len(xf)):
        jac = (pre[i] > 0).double()
        v = torch.linalg.solve((torch.eye(n, dtype=torch.float64) - jac[:, None] * w).T, g[i])
        # L depends on θ through ẑ = J(W(θ) z* + U x + b): differentiate v · ẑ.
        leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
        xi = xf[i].clone().requires_grad_(True)
        a, b = leaves["A"], leaves["B"]
        w_t = (1 - op.m) * torch.eye(n, dtype=torch.float64) - a.T @ a + b - b.T
        z_hat = jac * (w_t @ z[i] + leaves["U"] @ xi + leaves["b"])
        grads = torch.autograd.grad(v @ z_hat, [*leaves.values(), xi])
        for k, gk in zip(leaves, grads, strict=False):
            want[k] += gk
        want_x[i] = grads[-1]
    for k, p in params.items():
        torch.testing.assert_close(p.grad, want[k], rtol=1e-7, atol=1e-9, msg=k)
    torch.testing.assert_close(x.grad.flatten(1), want_x, rtol=1e-7, atol=1e-9)
    with torch.no_grad():
        feats = model.deq.solve(x.detach())[0]
    torch.testing.assert_close(model.head.weight.grad, r.T @ feats, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(model.head.bias.grad, r.sum(0), rtol=1e-12, atol=1e-12)


def _finite_difference(model, x, r, tensor, index, eps=1e-6):
    def value():
        with torch.no_grad():
            return (model.infer(x.detach()).logits * r).sum().item()

    with torch.no_grad():
        old = tensor[index].item()
        tensor[index] = old + eps
        up = value()
        tensor[index] = old - eps
        down = value()
        tensor[index] = old
    return (up - down) / (2 * eps)


@pytest.mark.parametrize("backward", BACKWARD)
@pytest.mark.parametrize("config", [FC, CONV1, CONV], ids=["fc", "conv", "multi_tier"])
def test_gradients_match_finite_differences(config, backward):
    model = make(config, backward)
    x = torch.randn(2, config["in_channels"], config["image_size"], config["image_size"],
                    dtype=torch.float64, requires_grad=True)  # fmt: skip
    r = torch.randn(2, config["num_classes"], dtype=torch.float64)
    loss_fn(model, x, r).backward()
    gen = torch.Generator().manual_seed(1)
    checked = 0
    named = dict(model.named_parameters())
    for name, p in [*named.items(), ("x", x)]:
        for _ in range(2):
            flat = int(torch.randint(p.numel(), (1,), generator=gen))
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), p.shape))
            # In place on the parameter itself (not .data), so the version counter moves and
            # the cached spectra and resolvents are rebuilt.
            fd = _finite_difference(model, x, r, p, index)
            got = p.grad[index].item()
            assert got == pytest.approx(fd, rel=1e-5, abs=1e-7), (name, index)
            checked += 1
    assert checked >= 2 * (len(named) + 1)


@pytest.mark.parametrize("backward", BACKWARD)
def test_multi_tier_input_gradient_matches_dense_ift(backward):
    model = make(CONV, backward)
    op = model.deq.op
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, dtype=torch.float64)
    loss_fn(model, x, r).backward()
    with torch.no_grad():
        w = dense_w_multitier(op)
        n = w.shape[0]
        u_mat = dense_of(lambda v: op.bias(v) - op.bias(torch.zeros_like(v)), 16, (1, 4, 4))
        z, _, _ = model.deq.solve(x.detach())
        zf = z.reshape(2, -1)
        pre = zf @ w.T + op.bias(x.detach()).reshape(2, -1)
        mask = op.border_mask().expand(op.z_shape).reshape(-1).double()
        torch.testing.assert_close(zf, mask * torch.relu(pre), rtol=0, atol=1e-10)
        feats_grad = torch.autograd.functional.vjp(
            lambda zz: model.head(model.features(zz.reshape(2, *op.z_shape))), z, r
        )[1].reshape(2, -1)
        for i in range(2):
            jac = mask * (pre[i] > 0).double()
            v = torch.linalg.solve(
                (torch.eye(n, dtype=torch.float64) - jac[:, None] * w).T, feats_grad[i]
            )
            want = u_mat.T @ (jac * v)
            torch.testing.assert_close(x.grad[i].flatten(), want, rtol=1e-7, atol=1e-9)
