"""The `mondeq` console script as installed: help, bench, errors."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys

import pytest

from mondeq_cli.main import build_parser, missing_extra


def mondeq(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("mondeq", path=str(__import__("pathlib").Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "mondeq_cli"]
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
    run = mondeq(
        "bench", "--models", "cifar-multitier", "--batch-size", "2", "--repeats", "1", "--json"
    )
    assert run.returncode == 0, run.stderr
    (row,) = json.loads(run.stdout)
    assert row["model"] == "cifar-multitier" and row["params"] == 170_194
    assert row["batch"] == 2 and row["tol"] == 0.01
    assert row["fwd_iters"] >= 1 and row["train_bwd_iters"] >= 1
    assert row["label_agreement_vs_tol1e-6"] == 1.0
    # no reference code ran beside it: no reference figure, no ratio
    assert not [k for k in row if k.startswith("ref_") or k.endswith(("_ratio", "_speedup"))]
    assert row["machine_probe"]["before"]["gemm_gflops"] > 0


def test_bench_rejects_unknown_models():
    run = mondeq("bench", "--models", "resnet", "--batch-size", "2")
    assert run.returncode == 2 and "unknown model" in run.stderr


def test_bench_batch_size_keeps_its_old_name_out_of_help():
    run = mondeq("bench", "--help")
    assert run.returncode == 0
    assert "--batch-size BATCH_SIZE" in run.stdout and "--batch " not in run.stdout
    parser = build_parser()
    assert parser.parse_args(["bench"]).batch_size == 64
    assert parser.parse_args(["bench", "--batch-size", "3"]).batch_size == 3
    assert parser.parse_args(["bench", "--batch", "5"]).batch_size == 5


def test_no_extra_is_named_when_every_one_is_installed():
    """This venv has every extra: a missing module there is a bug, re-raised, not a hint
    (tests/model_core/test_floor.py runs the commands where the extras are missing)."""
    assert missing_extra("train", "training.cli") is None
    assert missing_extra("serve", "service.cli") is None
    assert missing_extra("bench", "mondeq_cli.commands") is None


ALLOCATOR_PROBE = """
import resource, torch
from model_core.runtime import tune_allocator
flags = (tune_allocator(), tune_allocator())
def touch():
    t = torch.ones(16 << 20)  # 64 MiB, written
    del t
touch(); touch()
faults = []
for _ in range(7):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(*flags, sorted(faults)[3])  # the median touch
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.parametrize("env", ["1", "0"])
def test_allocator_tuning_keeps_freed_blocks_for_reuse(env):
    """The entry points' allocator setting: a freed 64 MiB block is reused without a page
    fault per 4 KiB page (glibc unmaps it by default); MONDEQ_TUNE_MALLOC=0 leaves glibc be."""
    run = subprocess.run(
        [sys.executable, "-c", ALLOCATOR_PROBE],
        env={**os.environ, "MONDEQ_TUNE_MALLOC": env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    applied, again, faults = run.stdout.split()
    if env == "1":
        assert (applied, again) == ("True", "True")
        assert int(faults) < 100
    else:
        assert (applied, again) == ("False", "False")
        assert int(faults) > 1000  # 16,384 pages without huge pages
