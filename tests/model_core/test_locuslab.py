"""Import of the paper's reference FC state dict, via the library and the real CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from problems import reference_state_dict

from model_core import load_checkpoint
from model_core.locuslab import import_locuslab

HIDDEN, M = 9, 1.0


def dense_logits(sd: dict, x: torch.Tensor, m: float) -> torch.Tensor:
    """Logits computed densely, in float64, from the reference weights alone."""
    sd = {k: v.double() for k, v in sd.items()}
    a, b = sd["mon.linear_module.A.weight"], sd["mon.linear_module.B.weight"]
    n = a.shape[0]
    w = (1 - m) * torch.eye(n, dtype=torch.float64) - a.T @ a + b - b.T
    inj = x.reshape(x.shape[0], -1).double() @ sd["mon.linear_module.U.weight"].T
    inj = inj + sd["mon.linear_module.U.bias"]
    # Dense PR with V formed by torch.linalg.inv: independent of the package's solvers.
    alpha = 1.0
    v = torch.linalg.inv(torch.eye(n, dtype=torch.float64) * (1 + alpha) - alpha * w)
    z = u = torch.zeros_like(inj)
    for _ in range(2000):
        u_half = 2 * z - u
        z_half = (u_half + alpha * inj) @ v.T
        u = 2 * z_half - u_half
        z = torch.relu(u)
    assert torch.allclose(z, torch.relu(z @ w.T + inj), atol=1e-12)
    return z @ sd["Wout.weight"].T + sd["Wout.bias"]


def test_import_reproduces_dense_logits():
    sd = reference_state_dict()
    model = import_locuslab(sd, hidden=HIDDEN, m=M, in_shape=(1, 6, 6), mean=[0.1], std=[0.3])
    x = torch.randn(5, 1, 6, 6)
    got = model.double().infer(x.double(), tol=1e-12, max_iter=5000).logits
    torch.testing.assert_close(got, dense_logits(sd, x, M), rtol=1e-9, atol=1e-9)
    assert model.input_spec["mean"] == [0.1] and model.input_spec["std"] == [0.3]


def test_import_rejects_mismatched_shapes_and_keys():
    from model_core import CheckpointError

    sd = reference_state_dict()
    with pytest.raises(CheckpointError, match="shape"):
        import_locuslab(sd, hidden=HIDDEN + 1, in_shape=(1, 6, 6))
    with pytest.raises(CheckpointError, match="missing"):
        import_locuslab({"foo": torch.zeros(1)}, hidden=HIDDEN, in_shape=(1, 6, 6))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mondeq_cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_converts_a_legacy_format_file(tmp_path):
    sd = reference_state_dict(seed=1)
    src = tmp_path / "mon_fc.pt"
    torch.save(sd, src, _use_new_zipfile_serialization=False)  # as the 2020 code saved it
    out = tmp_path / "models" / "mnist-fc" / "1" / "model.pt"
    run = _cli(
        "import-locuslab", str(src), "--arch", "fc", "--hidden", str(HIDDEN), "--m", "1.0",
        "--in-shape", "1,6,6", "--mean", "0.1307", "--std", "0.3081", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout
    model = load_checkpoint(out)
    assert model.input_spec["mean"] == [0.1307]
    assert model.metadata["source"] == "locuslab/monotone_op_net"
    x = torch.randn(4, 1, 6, 6)
    torch.testing.assert_close(
        model.double().infer(x.double(), tol=1e-12, max_iter=5000).logits,
        dense_logits(sd, x, 1.0),
        rtol=1e-6,
        atol=1e-6,
    )


def test_cli_reports_bad_input_without_traceback(tmp_path):
    src = tmp_path / "sd.pt"
    torch.save(reference_state_dict(), src)
    run = _cli("import-locuslab", str(src), "--hidden", "5", "--in-shape", "1,6,6",
               "--out", str(tmp_path / "o.pt"))  # fmt: skip
    assert run.returncode == 2
    assert "shape" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o.pt").exists()
    run = _cli("import-locuslab", str(tmp_path / "missing.pt"), "--hidden", "5",
               "--out", str(tmp_path / "o.pt"))  # fmt: skip
    assert run.returncode == 2 and "no such file" in run.stderr
    names = "0,1,2,3,4,,6,7,8,9"  # was written as a class named ''
    run = _cli("import-locuslab", str(src), "--hidden", str(HIDDEN), "--in-shape", "1,6,6",
               "--class-names", names, "--out", str(tmp_path / "o.pt"))  # fmt: skip
    assert (run.returncode, run.stderr) == (
        2,
        f"mondeq import-locuslab: --class-names holds an empty name: {names.split(',')}\n",
    )
    text = tmp_path / "notes.pt"  # was a KeyError traceback from torch's pickle reader
    text.write_text("hello\n")
    run = _cli("import-locuslab", str(text), "--hidden", "5", "--out", str(tmp_path / "o.pt"))
    assert (run.returncode, run.stderr) == (
        2,
        f"mondeq import-locuslab: {text}: not a readable PyTorch state dict (the reader failed "
        "with KeyError: 101)\n",
    )
