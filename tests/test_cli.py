"""The `mondeq` console script as installed: help, bench, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def mondeq(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("mondeq", path=str(__import__("pathlib").Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "model_core.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_subcommands():
    run = mondeq("--help")
    assert run.returncode == 0
    assert "import-locuslab" in run.stdout and "bench" in run.stdout


def test_no_command_prints_help_and_fails():
    run = mondeq()
    assert run.returncode == 2 and "usage: mondeq" in run.stdout


@pytest.mark.slow
def test_bench_json_on_a_small_batch():
    run = mondeq("bench", "--models", "cifar-multitier", "--batch", "2", "--repeats", "1", "--json")
    assert run.returncode == 0, run.stderr
    (row,) = json.loads(run.stdout)
    assert row["model"] == "cifar-multitier" and row["params"] == 170_194
    assert row["batch"] == 2 and row["tol"] == 0.01
    assert row["fwd_iters"] >= 1 and row["train_bwd_iters"] >= 1
    assert row["label_agreement_vs_tol1e-6"] == 1.0
    assert row["ref_infer_ms"] == 1700 and row["infer_speedup"] > 0


def test_bench_rejects_unknown_models():
    run = mondeq("bench", "--models", "resnet", "--batch", "2")
    assert run.returncode == 2 and "unknown model" in run.stderr
