"""training: presets, data, the loop's files, resume, signals, DDP and the CLI.

Real data: Fashion-MNIST from Debian's dataset-fashion-mnist (installed by `make test`).
Processes are real: `mondeq train` runs in subprocesses that receive real signals, and the
DDP test runs 2 gloo processes under torchrun.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from training_support import MONDEQ, ROOT, mondeq, wait_for

from model_core import CheckpointError, load_checkpoint
from model_core.config import InputSpec
from training.cli import preset_rows, read_config
from training.data import (
    DEBIAN_FASHION_MNIST,
    DataError,
    augment,
    load_dataset,
    read_idx,
    synthetic,
)
from training.presets import PRESETS, Schedule

needs_fmnist = pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed (make test installs it)",
)

# A small synthetic run: FC on 1×28×28, 8 steps of 64 per epoch.
SMOKE = ["--preset", "fmnist-fc", "--dataset", "synthetic", "--synthetic-size", "512",
         "--batch-size", "64", "--no-progress"]  # fmt: skip


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict()


# ---- presets ------------------------------------------------------------------------------


def test_presets_cover_the_paper_with_table_e1_counts():
    rows = {r["name"]: r for r in preset_rows()}
    expected = {
        "mnist-fc": 84_313,
        "mnist-multitier": 81_394,
        "svhn-conv": 172_218,
        "svhn-multitier": 170_194,
        "cifar-conv": 172_218,
        "cifar-multitier": 170_194,
        "cifar-conv-lg": 853_612,
        "cifar-multitier-lg": 1_014_546,
    }
    for name, count in expected.items():
        assert rows[name]["parameters"] == count, name
    assert {"mnist-conv", "fmnist-fc", "fmnist-conv", "fmnist-multitier"} <= set(rows)
    assert len(rows) == 12
    assert rows["cifar-conv-lg"]["augment"] and not rows["cifar-conv"]["augment"]


def test_presets_command_prints_a_row_per_preset():
    out = mondeq("presets").stdout.splitlines()
    assert out[0].split()[:4] == ["NAME", "DATASET", "ARCHITECTURE", "PARAMETERS"]
    assert len(out) == 1 + len(PRESETS)
    row = next(line for line in out if line.startswith("cifar-multitier-lg "))
    assert "1,014,546" in row and "one-cycle" in row


def test_schedules():
    step = Schedule("step", step_epochs=10)
    assert step.at(1e-3, 9.99, 40) == (1e-3, None)
    assert step.at(1e-3, 10.0, 40)[0] == pytest.approx(1e-4)
    assert step.at(1e-3, 25.0, 40)[0] == pytest.approx(1e-5)
    one = Schedule("onecycle", pct=0.3, div=25.0, final_div=1e4)
    assert one.at(1e-2, 0.0, 10) == (pytest.approx(4e-4), pytest.approx(0.95))
    assert one.at(1e-2, 3.0, 10) == (pytest.approx(1e-2), pytest.approx(0.85))
    assert one.at(1e-2, 10.0, 10) == (pytest.approx(1e-6), pytest.approx(0.95))
    lr_mid, beta_mid = one.at(1e-2, 1.5, 10)
    assert 4e-4 < lr_mid < 1e-2 and 0.85 < beta_mid < 0.95
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("cosine").at(1e-3, 0, 1)


def test_config_files(tmp_path):
    (tmp_path / "a.toml").write_text('preset = "fmnist-fc"\nbatch-size = 32\nlr = 0.01\n')
    (tmp_path / "a.yaml").write_text("preset: fmnist-fc\nbatch_size: 32\nlr: 0.01\n")
    want = {"preset": "fmnist-fc", "batch_size": 32, "lr": 0.01}
    assert read_config(tmp_path / "a.toml") == want
    assert read_config(tmp_path / "a.yaml") == want
    (tmp_path / "bad.toml").write_text("preset = \n")
    with pytest.raises(ValueError, match="does not parse"):
        read_config(tmp_path / "bad.toml")


# ---- data ---------------------------------------------------------------------------------


@needs_fmnist
def test_fashion_mnist_from_debian():
    data = load_dataset("fmnist")
    assert data.source == str(DEBIAN_FASHION_MNIST)
    assert data.train_x.shape == (60_000, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (10_000, 1, 28, 28)
    assert torch.equal(torch.bincount(data.train_y), torch.full((10,), 6000))
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    mean, std = data.channel_stats()  # the published Fashion-MNIST statistics
    assert mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert std[0] == pytest.approx(0.3530, abs=1e-4)


@needs_fmnist
def test_batches_are_normalised_by_the_input_spec_as_before_bit_for_bit():
    # Training, `mondeq eval` and the server normalise through InputSpec.normalize; training
    # and eval used their own (x / 255 - mean) / std before, whose bits this must keep.
    data = load_dataset("fmnist")
    mean, std = data.channel_stats()
    spec = InputSpec(data.shape, mean, std, data.class_names)
    x = data.train_x[:512]
    m, s = (torch.tensor(v).view(1, -1, 1, 1) for v in (mean, std))
    before = (x.to(torch.float32) / 255.0 - m) / s
    assert torch.equal(spec.normalize(x), before)
    assert spec.normalize(x).dtype == torch.float32


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path):
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") * 2
    good = tmp_path / "good-idx3-ubyte.gz"
    good.write_bytes(gzip.compress(header + bytes(range(18))))
    assert read_idx(good).shape == (2, 3, 3) and read_idx(good)[1, 2, 2] == 17
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(header + bytes(10))
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(DataError, match="not an unsigned-byte IDX"):
        read_idx(foreign)


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fashion_dir(root: Path, **replace: np.ndarray) -> Path:
    """IDX files of 4 training and 2 test 28×28 images, with ``replace`` swapped in."""
    files = {
        "train_images": np.zeros((4, 28, 28)), "train_labels": np.array([0, 1, 2, 9]),
        "t10k_images": np.zeros((2, 28, 28)), "t10k_labels": np.array([3, 4]),
    } | replace  # fmt: skip
    root.mkdir()
    for key, array in files.items():
        split, kind = key.split("_")
        _idx(root / f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte", array)
    return root


@pytest.mark.parametrize(
    "replace,message",
    [
        # Each trained or evaluated without a word, or failed mid-run with a traceback.
        ({"train_labels": np.array([0, 1, 10, 9])}, "training split: label 10 is outside 0..9"),
        ({"t10k_labels": np.array([255, 4])}, "test split: label 255 is outside 0..9"),
        ({"train_labels": np.array([0, 1, 2])}, "training split: 4 images but labels of shape "
         "[3] (one per image)"),
        ({"train_images": np.zeros((4, 27, 27)), "t10k_images": np.zeros((2, 27, 27))},
         "training split: images are 1x27x27, fashion-mnist has 1x28x28"),
    ],
)  # fmt: skip
def test_data_files_that_disagree_are_refused(tmp_path, replace, message):
    root = _fashion_dir(tmp_path / "data", **replace)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", root)
    assert str(err.value) == f"fashion-mnist from {root}, {message}"


def test_idx_files_of_the_wrong_rank_are_refused(tmp_path):
    root = _fashion_dir(tmp_path / "data", train_labels=np.zeros((4, 1)))
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", root)
    assert str(err.value) == f"{root}/train-labels-idx1-ubyte holds a 2-d array, not labels (N,)"


def test_constant_training_images_are_refused_not_reported_as_divergence(tmp_path):
    root = _fashion_dir(tmp_path / "data")  # all-black images: std 0
    proc = mondeq("train", "--preset", "fmnist-fc", "--data-dir", root, "--batch-size", "2",
                  "--no-progress", "--out", tmp_path / "run", check=False)  # fmt: skip
    assert (proc.returncode, proc.stderr) == (
        2,  # was 3, "diverged at epoch 1/1, step 1/2: the training loss is nan; ... lower --lr"
        f"mondeq train: fashion-mnist from {root}: channel 0 of the training images is constant "
        "(std 0), so it cannot be normalised\n",
    )
    assert not (tmp_path / "run").exists()


def test_missing_data_says_what_to_pass(tmp_path):
    with pytest.raises(DataError, match=r"--data-dir DIR holding .*--download"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match=r"not found under .*cifar-10-batches-py.*--download"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    proc = mondeq("train", "--preset", "mnist-fc", "--out", tmp_path / "run", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "dataset 'mnist' not found: pass --data-dir" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_augment_crops_and_flips_per_sample():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    out = augment(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):  # every output is a (possibly flipped) 6×6 window of the padded image
        windows = [
            padded[b, :, i : i + 6, j : j + 6].flip(-1) if f else padded[b, :, i : i + 6, j : j + 6]
            for i in range(5)
            for j in range(5)
            for f in (False, True)
        ]
        assert any(torch.equal(out[b], w) for w in windows)
    # Shards of a global batch are augmented exactly as the whole batch.
    xs = torch.randint(0, 255, (8, 1, 5, 5), dtype=torch.uint8)
    whole = augment(xs, torch.Generator().manual_seed(3))
    for rank in range(2):
        pos = torch.arange(rank, 8, 2)
        part = augment(xs[pos], torch.Generator().manual_seed(3), positions=pos, global_batch=8)
        assert torch.equal(part, whole[pos])


def test_synthetic_is_deterministic_and_learnable_shape():
    a, b = synthetic((3, 32, 32), 64, 16, seed=1), synthetic((3, 32, 32), 64, 16, seed=1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape == (64, 3, 32, 32) and a.test_x.shape == (16, 3, 32, 32)


# ---- a run's files ------------------------------------------------------------------------


def test_train_writes_checkpoints_metrics_and_curves(tmp_path):
    out = tmp_path / "run"
    proc = mondeq("train", *SMOKE, "--epochs", "2", "--seed", "3", "--out", out)
    assert "epoch 2/2" in proc.stderr
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        assert r["steps"] == 8
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["train_fwd_iterations"] >= 1
        assert r["alpha"] > 0 and len(r["alphas_tuned"]) == 2  # early and mid-epoch
        assert r["backward_alpha"] > 0  # tuned apart, on the backward problem
        assert len(r["backward_alphas_tuned"]) == 2
        # A healthy run: every solve converged, no warning (see test_training_divergence).
        assert r["train_fwd_unconverged_share"] == r["train_bwd_unconverged_share"] == 0.0
        assert r["test_converged_share"] == 1.0 and r["solver_warning"] is None
    assert final["test_accuracy"] == lines[-1]["test_accuracy"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = load_checkpoint(out / "last.pt")
    meta = last.metadata
    assert meta["preset"] == "fmnist-fc" and meta["seed"] == 3 and meta["epoch"] == 2
    assert meta["command"].startswith("mondeq train --preset fmnist-fc")
    assert meta["metrics"]["test_accuracy"] == final["test_accuracy"]
    assert meta["package_version"] == "0.1.0"
    assert meta["alpha"] == last.deq.settings.alpha == lines[-1]["alpha"]
    assert meta["backward_alpha"] == last.deq.settings.backward_alpha
    assert meta["backward_alpha"] == lines[-1]["backward_alpha"]
    assert last.calibration.shape == (64, 1, 28, 28) and last.calibration.dtype == torch.uint8
    assert last.input_spec.shape == (1, 28, 28) and len(last.input_spec.mean) == 1
    assert set(last.training_state) == {"options", "optimizer", "progress"}
    # Exported into a model repository, with its card.
    proc = mondeq("export", out, "--model-dir", tmp_path / "models", "--name", "smoke")
    folder = tmp_path / "models" / "smoke" / "1"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "card.json", "curves.png", "model.pt"
    ]  # fmt: skip
    card = json.loads((folder / "card.json").read_text())
    assert card["test_accuracy"] == final["test_accuracy"]
    assert card["solver"]["backward_alpha"] == meta["backward_alpha"]
    assert f"(backward {meta['backward_alpha']:.3g})" in (folder / "README.md").read_text()
    assert load_checkpoint(folder / "model.pt").deq.settings == last.deq.settings
    best = load_checkpoint(out / "best.pt")
    assert "train" not in best.metadata
    best_epoch = max(lines, key=lambda r: r["test_accuracy"])["epoch"]
    assert best.metadata["epoch"] == best_epoch
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".*"))


def test_bad_options_fail_cleanly(tmp_path):
    proc = mondeq("train", *SMOKE, "--batch-size", "100000", "--out", tmp_path, check=False)
    assert proc.returncode == 2 and "cannot fill a batch" in proc.stderr
    proc = mondeq("train", "--preset", "nope", "--out", tmp_path, check=False)
    assert proc.returncode == 2
    assert "--preset must be one of mnist-fc, " in proc.stderr
    assert "got the string 'nope'" in proc.stderr
    proc = mondeq("train", "--resume", tmp_path / "missing", check=False)
    assert proc.returncode == 2 and "cannot resume" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- resume, signals, kill -9 -------------------------------------------------------------

LONG = [*SMOKE, "--synthetic-size", "2048", "--epochs", "4", "--seed", "5", "--no-tune-alpha"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted ones must reproduce exactly."""
    out = tmp_path_factory.mktemp("reference")
    mondeq("train", *LONG, "--out", out)
    return out


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*MONDEQ, "train", *LONG, "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_a_resumable_checkpoint_and_resume_is_exact(tmp_path, reference_run, signum):
    out = tmp_path / "run"
    proc = _start(out)
    wait_for(lambda: (out / "metrics.jsonl").exists(), proc)  # inside epoch 2
    time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"interrupted by {signal.Signals(signum).name}; resume from" in err
    assert "Traceback" not in err
    state = load_checkpoint(out / "last.pt").training_state["progress"]
    assert state["epoch"] >= 1, state  # stopped after at least one epoch
    assert state["epoch"] < 4, state  # and before the last
    resumed = mondeq("train", "--resume", out, "--no-progress")
    assert json.loads(resumed.stdout.splitlines()[-1])["epoch"] == 4
    _assert_same_weights(out / "last.pt", reference_run / "last.pt")
    ref_lines = (reference_run / "metrics.jsonl").read_text().splitlines()
    got_lines = (out / "metrics.jsonl").read_text().splitlines()
    for ref, got in zip(ref_lines, got_lines, strict=True):
        r, g = json.loads(ref), json.loads(got)
        for k in ("train_loss", "train_accuracy", "test_accuracy", "train_fwd_iterations"):
            assert g[k] == pytest.approx(r[k], rel=1e-12), k


def test_kill_9_loses_at_most_the_current_epoch(tmp_path, reference_run):
    out = tmp_path / "run"
    proc = _start(out)
    wait_for(lambda: (out / "metrics.jsonl").exists(), proc)
    proc.kill()
    proc.communicate(timeout=60)
    state = load_checkpoint(out / "last.pt").training_state["progress"]  # not corrupt
    assert state["epoch"] >= 1 and state["step"] == 0
    mondeq("train", "--resume", out, "--no-progress")
    _assert_same_weights(out / "last.pt", reference_run / "last.pt")


def test_resume_refuses_changed_options_and_reports_truncated_files(tmp_path, reference_run):
    proc = mondeq("train", "--resume", reference_run, "--lr", "0.5", check=False)
    assert proc.returncode == 2 and "cannot change ['lr']" in proc.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (reference_run / "last.pt").read_bytes()
    (broken / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(broken / "last.pt")
    proc = mondeq("train", "--resume", broken, check=False)
    assert proc.returncode == 2 and "cannot resume" in proc.stderr


# ---- DDP ----------------------------------------------------------------------------------


def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    args = [*SMOKE, "--epochs", "2", "--seed", "7", "--eval-limit", "64"]
    mondeq("train", *args, "--out", tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = mondeq("train", *args, "--nproc", "2", "--out", tmp_path / "two", env=env)
    assert "over 2 processes" in proc.stderr
    one, two = weights(tmp_path / "one" / "last.pt"), weights(tmp_path / "two" / "last.pt")
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6), k
    m1 = [json.loads(s) for s in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(s) for s in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1, m2, strict=True):  # metrics reduced over ranks = the global ones
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["train_accuracy"] == pytest.approx(a["train_accuracy"], abs=1e-9)
        assert b["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=1e-9)
        assert b["alpha"] == a["alpha"]
        assert b["backward_alpha"] == a["backward_alpha"]


# ---- the real thing: 2 epochs of fmnist-fc, then mondeq eval -------------------------------


@needs_fmnist
def test_two_epochs_of_fmnist_fc_reach_86_percent(tmp_path):
    out = tmp_path / "fc"
    run = mondeq("train", "--preset", "fmnist-fc", "--epochs", "2", "--no-progress", "--out", out)
    assert "warning:" not in run.stderr  # the solves converge: no convergence warning
    proc = mondeq("eval", out / "last.pt", "--dataset", "fashion-mnist", "--json")
    m = json.loads(proc.stdout)
    assert m["samples"] == 10_000
    assert m["accuracy"] >= 0.86
    assert m["iterations_p50"] >= 1, m
    assert m["iterations_p99"] >= m["iterations_p50"], m
    assert m["iterations_p99"] <= 300, m
    assert m["iterations_mean"] < 30 and 0 < m["residual_mean"] < 0.1
    assert m["lipschitz"] > 0
    cert = m["certified"]
    assert list(cert) == ["0.05", "0.1", "0.25", "0.5"]
    assert m["accuracy"] >= cert["0.05"] >= cert["0.1"] >= cert["0.25"] >= cert["0.5"] >= 0
    text = mondeq("eval", out / "last.pt", "--dataset", "fmnist", "--eval-limit", "500").stdout
    assert "500 test samples" in text and "certified accuracy" in text
    proc = mondeq("eval", out / "last.pt", "--dataset", "cifar10", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
