"""A diverged run stops at once (exit 3) and keeps its last good files; non-finite weights are
never saved, loaded, evaluated, exported or served; failing solves are warned about.

The runs are real (`mondeq train` in subprocesses or `train()` in-process) on small synthetic
data: FC on 1×28×28, batch 64.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from service_support import FC_CONFIG, LiveServer, make_checkpoint, v2_body

from model_core import CheckpointError, load_checkpoint, save_checkpoint
from model_core.checkpoint import checkpoint_payload, read_checkpoint
from training.loop import (
    RESIDUAL_WARN_FACTOR,
    UNCONVERGED_WARN_SHARE,
    Diverged,
    _solver_warning,
    train,
)
from training.options import TrainOptions

ROOT = Path(__file__).resolve().parents[2]
MONDEQ = [sys.executable, "-m", "mondeq_cli"]
SMOKE = ["--preset", "fmnist-fc", "--dataset", "synthetic", "--synthetic-size", "512",
         "--batch-size", "64", "--no-progress"]  # fmt: skip
TINY = {
    "preset": "fmnist-fc",
    "dataset": "synthetic",
    "synthetic_size": 256,
    "batch_size": 64,
    "steps_per_epoch": 2,
    "eval_limit": 32,
    "tune_alpha": False,
    "progress": False,
}


def mondeq(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MONDEQ, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ---- divergence stops the run ---------------------------------------------------------------


def test_lr_1e30_stops_at_the_first_nan_loss_with_exit_3(tmp_path):
    out = tmp_path / "run"
    proc = mondeq("train", *SMOKE, "--epochs", "2", "--lr", "1e30", "--out", out)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    # The first step is finite and throws the weights to ~1e30; the second one's loss is NaN.
    assert last_line(proc.stderr) == (
        "mondeq train: diverged at epoch 1/2, step 2/8: the training loss is nan; start a new "
        "run with a lower --lr (this one: 1e+30); no checkpoint was written"
    )
    assert proc.stdout == ""
    assert not out.exists() or list(out.iterdir()) == []


@pytest.fixture()
def one_good_epoch(tmp_path) -> Path:
    out = tmp_path / "run"
    train(TrainOptions(out=str(out), epochs=1, **TINY))
    return out


def _set_saved_lr(last: Path, lr: float) -> None:
    """Rewrite the learning rate a resumed run will take (a run going on at a new rate)."""
    payload = read_checkpoint(last)
    payload["training_state"]["options"]["lr"] = lr
    torch.save(payload, last)


def test_divergence_in_a_later_epoch_leaves_the_last_good_files(one_good_epoch):
    out = one_good_epoch
    _set_saved_lr(out / "last.pt", 1e30)
    before = snapshot(out)
    assert sorted(before) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl"]
    proc = mondeq("train", "--resume", out, "--epochs", "3", "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert last_line(proc.stderr) == (
        "mondeq train: diverged at epoch 2/3, step 2/2: the training loss is nan; start a new "
        f"run with a lower --lr (this one: 1e+30); {out / 'last.pt'} is left as it was"
    )
    assert snapshot(out) == before  # every file byte for byte, nothing added
    assert load_checkpoint(out / "last.pt").metadata["epoch"] == 1


def test_diverged_is_raised_in_process_and_nothing_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Diverged) as err:
        train(TrainOptions(out=str(out), epochs=1, lr=1e30, **TINY))
    assert err.value.where == "epoch 1/1, step 2/2"
    assert err.value.what == "the training loss is nan"
    assert err.value.kept is None
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


# ---- non-finite weights are no result ------------------------------------------------------


def _nan_payload(tmp_path: Path) -> dict:
    make_checkpoint(tmp_path / "ok.pt", FC_CONFIG)
    payload = read_checkpoint(tmp_path / "ok.pt")
    payload["state_dict"]["deq.op.U.bias"][0] = float("nan")
    return payload


def test_non_finite_weights_are_refused_on_save(tmp_path):
    model = load_checkpoint(make_checkpoint(tmp_path / "m.pt", FC_CONFIG))
    before = (tmp_path / "m.pt").read_bytes()
    with torch.no_grad():
        model.head.bias[3] = float("inf")
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(model, tmp_path / "m.pt")
    assert str(err.value) == (
        f"{tmp_path / 'm.pt'}: refusing to save: non-finite weights (NaN or inf) in head.bias; "
        "a diverged model is no result"
    )
    assert (tmp_path / "m.pt").read_bytes() == before  # the old file stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary left
    with pytest.raises(CheckpointError, match="non-finite weights"):
        checkpoint_payload(model)


def test_non_finite_weights_are_refused_on_load_eval_and_export(tmp_path):
    path = tmp_path / "run" / "last.pt"
    path.parent.mkdir()
    torch.save(_nan_payload(tmp_path), path)
    message = (
        f"{path}: non-finite weights (NaN or inf) in deq.op.U.bias; a diverged model is no result"
    )
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == message
    # Before: "accuracy 10.70%" and exit 0 (every NaN logit row is class 0).
    proc = mondeq("eval", path, "--dataset", "synthetic", "--json")
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"mondeq eval: {message}\n")
    proc = mondeq("export", path.parent, "--model-dir", tmp_path / "models", "--name", "x")
    assert (proc.returncode, proc.stderr) == (2, f"mondeq export: {message}\n")
    assert not (tmp_path / "models").exists()


def test_server_reports_a_non_finite_checkpoint_as_a_failed_version(tmp_path):
    root = tmp_path / "models"
    make_checkpoint(root / "good/1/model.pt", FC_CONFIG)
    (root / "nan/1").mkdir(parents=True)
    torch.save(_nan_payload(tmp_path), root / "nan/1/model.pt")
    server = LiveServer(model_dir=root, tune_at_load=False).start()
    try:
        with server.client() as c:
            models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
            assert models["good"]["status"] == "ready"
            bad = models["nan"]
            assert bad["status"] == "failed" and bad["default_version"] is None
            assert bad["error"] == (
                f"{root / 'nan/1/model.pt'}: non-finite weights (NaN or inf) in deq.op.U.bias; "
                "a diverged model is no result"
            )
            body = v2_body(torch.full((1, 1, 8, 8), 0.5))
            assert c.post("/v2/models/nan/infer", json=body).status_code == 503
            assert c.post("/v2/models/good/infer", json=body).status_code == 200
    finally:
        server.stop()


# ---- failing solves are warned about -------------------------------------------------------


def test_solver_warning_bounds():
    tol = 1e-2
    healthy = {"train_fwd_unconverged_share": UNCONVERGED_WARN_SHARE,
               "train_bwd_unconverged_share": 0.0,
               "train_fwd_residual_mean": RESIDUAL_WARN_FACTOR * tol}  # fmt: skip
    assert _solver_warning(healthy, tol) is None  # at the bounds: no warning
    failing = {**healthy, "train_fwd_unconverged_share": 0.88, "test_fwd_residual_mean": 0.63}
    assert _solver_warning(failing, tol) == (
        "unconverged solves: train forward 88% (bound 5%); mean residual: test forward 0.63 "
        "(bound 10 × tol = 0.1); lower --lr"
    )
    assert "mean residual: train forward nan" in _solver_warning(
        {"train_fwd_residual_mean": float("nan")}, tol
    )


def test_unconverged_solves_warn_in_the_progress_line_and_the_log(tmp_path):
    # --lr 1e3: from the second step on, forward solves stop at the 300-iteration cap.
    out = tmp_path / "run"
    proc = mondeq("train", *SMOKE[:-1], "--epochs", "1", "--steps-per-epoch", "3",
                  "--eval-limit", "32", "--no-tune-alpha", "--lr", "1e3", "--out", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.replace("\r", "\n").splitlines()
    step_warnings = [s for s in lines if s.startswith("warning: epoch 1/1, step ")]
    assert len(step_warnings) == 1  # once per epoch, at the first step past a bound
    assert step_warnings[0].startswith("warning: epoch 1/1, step 2/3: unconverged solves: train ")
    assert any("unconverged=" in s for s in lines)  # the progress bar's postfix
    (epoch_warning,) = [s for s in lines if s.startswith("warning: epoch 1/1: ")]
    assert "test forward 100% (bound 5%)" in epoch_warning and epoch_warning.endswith("lower --lr")
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row["solver_warning"] == epoch_warning.removeprefix("warning: epoch 1/1: ")
    assert row["test_converged_share"] == 0.0
    assert row["train_fwd_unconverged_share"] > UNCONVERGED_WARN_SHARE
