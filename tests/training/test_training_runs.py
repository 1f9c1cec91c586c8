"""training: no result is replaced or shared unasked, and a stop signal stops every process.

Real processes throughout: `mondeq train` and `mondeq export` run as subprocesses, two runs
race for one folder, a run is stopped (SIGSTOP) while it holds its folder's lock or killed
with SIGKILL, and `--nproc 2` gets SIGTERM / SIGINT; what is left running afterwards is read
from /proc.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from training_support import MONDEQ, ROOT, mondeq, processes_naming, wait_for

from model_core import load_checkpoint

# A small synthetic run: FC on 1×28×28, 8 steps of 64 per epoch, 64 test samples.
SMOKE = ["--preset", "fmnist-fc", "--dataset", "synthetic", "--synthetic-size", "512",
         "--batch-size", "64", "--eval-limit", "64", "--no-progress",
         "--no-tune-alpha"]  # fmt: skip
# 32 steps per epoch, 4 epochs: long enough to be stopped part-way.
LONG = [*SMOKE, "--synthetic-size", "2048", "--epochs", "4"]
DDP_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [*MONDEQ, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kw,
    )  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def lock_held_by(out: Path, pid: int) -> bool:
    """The run writes its pid into ``.lock`` once it holds the lock."""
    try:
        return (out / ".lock").read_text().strip() == str(pid)
    except OSError:
        return False


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-epoch run (seed 3)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    mondeq("train", *SMOKE, "--epochs", "2", "--seed", "3", "--out", out)
    return out


def metadata_seed(path: Path) -> int:
    return load_checkpoint(path).metadata["seed"]


# ---- a run folder that holds a run --------------------------------------------------------


def test_fresh_run_onto_a_finished_run_is_refused_and_changes_nothing(finished_run):
    before = snapshot(finished_run)
    assert sorted(before) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl"]
    want = (
        f"mondeq train: {finished_run} already holds a run (last.pt, best.pt, metrics.jsonl, "
        f"curves.png); pass --resume {finished_run} to continue it or --overwrite to replace it"
    )
    for extra in ([], ["--nproc", "2"]):  # refused before any rank starts
        proc = mondeq("train", *SMOKE, "--epochs", "1", "--seed", "9", "--out", finished_run,
                      *extra, check=False, env=DDP_ENV)  # fmt: skip
        assert proc.returncode == 2
        assert one_line(proc.stderr) == want
        assert proc.stdout == ""
        assert snapshot(finished_run) == before  # byte for byte, and no .lock left behind


def test_overwrite_replaces_the_run_and_resume_continues_it(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    first = (out / "metrics.jsonl").read_text().splitlines()
    assert len(first) == 2

    proc = mondeq("train", "--resume", out, "--overwrite", check=False)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (
        "mondeq train: --resume continues a run and --overwrite replaces it; pass one"
    )

    mondeq("train", "--resume", out, "--epochs", "3")  # continues: one more epoch
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3 and rows[:2] == first
    assert metadata_seed(out / "last.pt") == 3

    mondeq("train", *SMOKE, "--epochs", "1", "--seed", "4", "--out", out, "--overwrite")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert metadata_seed(out / "last.pt") == metadata_seed(out / "best.pt") == 4
    assert load_checkpoint(out / "best.pt").metadata["epoch"] == 1
    assert not (out / ".lock").exists()


def test_overwrite_that_diverges_before_writing_leaves_the_previous_run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    proc = mondeq("train", *SMOKE, "--epochs", "1", "--lr", "1e30", "--out", out, "--overwrite",
                  check=False)  # fmt: skip
    assert proc.returncode == 3, proc.stderr  # diverged; was: the previous run deleted first
    assert proc.stderr.rstrip().splitlines()[-1].endswith(f"; {out}/last.pt is left as it was")
    assert snapshot(out) == before


# ---- two runs, one folder -----------------------------------------------------------------


def test_two_runs_started_together_on_one_folder_one_runs_one_is_refused(tmp_path):
    out = tmp_path / "run"
    procs = {
        seed: start("train", *SMOKE, "--epochs", "1", "--seed", seed, "--out", out)
        for seed in (5, 6)
    }
    results = {seed: (p.wait(timeout=300), p.stderr.read()) for seed, p in procs.items()}
    codes = sorted(code for code, _ in results.values())
    assert codes == [0, 2], results
    winner = next(seed for seed, (code, _) in results.items() if code == 0)
    loser_err = next(err for code, err in results.values() if code == 2)
    assert f"mondeq train: {out}" in one_line(loser_err)
    # Whichever way the race went, the folder holds the winner's run, whole.
    assert metadata_seed(out / "last.pt") == metadata_seed(out / "best.pt") == winner
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_run_holding_the_lock_refuses_a_second_one_naming_the_lock(tmp_path):
    out = tmp_path / "run"
    first = start("train", *SMOKE, "--epochs", "1", "--seed", "5", "--out", out)
    try:
        wait_for(lambda: lock_held_by(out, first.pid), first)
        first.send_signal(signal.SIGSTOP)  # holds the lock, has written no result yet
        second = mondeq("train", *SMOKE, "--epochs", "1", "--seed", "6", "--out", out,
                        check=False)  # fmt: skip
        assert second.returncode == 2
        assert one_line(second.stderr) == (
            f"mondeq train: {out} is in use by another run (pid {first.pid}, lock "
            f"{out / '.lock'}); wait for it to end or choose another --out"
        )
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert metadata_seed(out / "last.pt") == 5
    assert not (out / ".lock").exists()


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path):
    out = tmp_path / "run"
    first = start("train", *SMOKE, "--epochs", "1", "--seed", "5", "--out", out)
    wait_for(lambda: lock_held_by(out, first.pid), first)
    first.kill()
    first.communicate(timeout=60)
    assert (out / ".lock").read_text().strip() == str(first.pid)  # stale, but not locked
    mondeq("train", *SMOKE, "--epochs", "1", "--seed", "6", "--out", out)
    assert metadata_seed(out / "last.pt") == 6
    assert not (out / ".lock").exists()


# ---- export -------------------------------------------------------------------------------


def test_export_refuses_to_replace_a_published_version_unless_forced(finished_run, tmp_path):
    other = tmp_path / "other"
    mondeq("train", *SMOKE, "--epochs", "1", "--seed", "4", "--out", other)
    models = tmp_path / "models"
    args = ["--model-dir", models, "--name", "fmnist-fc", "--version", "1"]
    assert mondeq("export", finished_run, *args).stdout == f"wrote {models}/fmnist-fc/1\n"
    published = snapshot(models)
    card = json.loads((models / "fmnist-fc" / "1" / "card.json").read_text())
    assert card["seed"] == 3 and card["epochs"] == 2

    proc = mondeq("export", other, *args, check=False)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (
        f"mondeq export: {models}/fmnist-fc/1 is already published; pass --force to replace "
        "it or choose another --version"
    )
    assert snapshot(models) == published  # nothing written, no staging folder left

    inode = (models / "fmnist-fc" / "1").stat().st_ino
    mondeq("export", other, *args, "--force")
    card = json.loads((models / "fmnist-fc" / "1" / "card.json").read_text())
    assert card["seed"] == 4 and card["epochs"] == 1
    assert metadata_seed(models / "fmnist-fc" / "1" / "model.pt") == 4
    assert (models / "fmnist-fc" / "1").stat().st_ino != inode  # renamed in, not rewritten
    assert [p.name for p in (models / "fmnist-fc").iterdir()] == ["1"]
    assert sorted(p.name for p in (models / "fmnist-fc" / "1").iterdir()) == [
        "README.md", "card.json", "curves.png", "model.pt"
    ]  # fmt: skip


def test_an_input_the_ranks_refuse_is_said_once(tmp_path):
    # --eval-limit is checked against the data inside each rank: every rank printed it.
    out = tmp_path / "run"
    proc = mondeq("train", *SMOKE, "--eval-limit", "129", "--nproc", "2", "--out", out,
                  check=False, env=DDP_ENV)  # fmt: skip
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (
        "mondeq train: --eval-limit 129 is more than the 128 test samples of synthetic"
    )
    assert not out.exists()


def test_a_published_version_is_no_run_folder_even_with_overwrite(finished_run, tmp_path):
    models = tmp_path / "models"
    # --models: --model-dir's former name, still accepted.
    mondeq("export", finished_run, "--models", models, "--name", "fmnist-fc", "--version", "1")
    version = models / "fmnist-fc" / "1"
    published = snapshot(models)
    for extra in ([], ["--overwrite"]):  # --overwrite replaced the version's curves.png
        proc = mondeq("train", *SMOKE, "--epochs", "1", "--out", version, *extra, check=False)
        assert proc.returncode == 2
        assert one_line(proc.stderr) == (
            f"mondeq train: --out {version} is a published model version (model.pt, "
            "card.json); train into a run folder and `mondeq export` it"
        )
        assert snapshot(models) == published


def test_import_locuslab_refuses_to_replace_a_checkpoint(finished_run, tmp_path):
    dst = tmp_path / "model.pt"
    shutil.copyfile(finished_run / "best.pt", dst)
    before = dst.read_bytes()
    proc = mondeq("import-locuslab", tmp_path / "any.pt", "--hidden", "87", "--out", dst,
                  check=False)  # fmt: skip
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (
        f"mondeq import-locuslab: {dst} exists; pass --force to replace it"
    )
    assert dst.read_bytes() == before


# ---- signals ------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_nproc_2_stops_every_rank_after_a_resumable_checkpoint(tmp_path, signum):
    out = tmp_path / "run"
    proc = start("train", *LONG, "--seed", "7", "--nproc", "2", "--out", out, env=DDP_ENV)
    wait_for(lambda: (out / "metrics.jsonl").exists(), proc, timeout=240)  # inside epoch 2
    assert len(processes_naming(out)) == 3  # the launcher and two ranks
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, err
    # Nothing outlives the launcher, and nothing writes after it has returned.
    assert processes_naming(out) == []
    stamp = (out / "last.pt").stat()
    name = signal.Signals(signum).name
    assert err.count(f"mondeq train: interrupted by {name}; resume from {out}/last.pt") == 1
    assert "Traceback" not in err
    state = load_checkpoint(out / "last.pt").training_state["progress"]
    assert state["epoch"] in (1, 2, 3), state  # stopped part-way through 4 epochs
    assert not (out / ".lock").exists()
    time.sleep(1.0)
    assert (out / "last.pt").stat().st_mtime_ns == stamp.st_mtime_ns
    if signum == signal.SIGTERM:
        resumed = mondeq("train", "--resume", out, "--nproc", "2", env=DDP_ENV)
        assert json.loads(resumed.stdout.splitlines()[-1])["epoch"] == 4
        assert len(resumed.stdout.splitlines()) == 1  # the summary, from rank 0 only
        assert load_checkpoint(out / "last.pt").metadata["epoch"] == 4


# SIGHUP (a closed terminal or ssh session) killed the run at once, losing the epoch so far.
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_a_single_process_run_stops_at_a_step_with_a_resumable_checkpoint(
    tmp_path, signum
):
    out = tmp_path / "run"
    proc = start("train", *LONG, "--seed", "7", "--out", out)
    wait_for(lambda: (out / "metrics.jsonl").exists(), proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert processes_naming(out) == []
    assert err.rstrip().splitlines()[-1] == (
        f"mondeq train: interrupted by {signal.Signals(signum).name}; resume from {out}/last.pt"
    )
    assert "Traceback" not in err
    last = load_checkpoint(out / "last.pt")
    state = last.training_state["progress"]
    assert state["epoch"] in (1, 2, 3), state  # stopped part-way through 4 epochs
    weights = last.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (out / ".lock").exists()


def test_a_second_signal_aborts_at_once_with_the_signal_s_exit_status(tmp_path):
    out = tmp_path / "run"
    proc = start("train", *LONG, "--seed", "7", "--out", out)
    wait_for(lambda: (out / "metrics.jsonl").exists(), proc)
    first = (out / "last.pt").read_bytes()  # epoch 1's
    # Both pending while stopped, so both arrive within one step: SIGINT's handler runs
    # first (lower number) and stops the run, SIGTERM's aborts it. Was: exit 130 after
    # SIGTERM, and a bare "interrupted".
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.rstrip().splitlines()[-1] == (
        f"mondeq train: aborted by a second SIGTERM; resume from {out}/last.pt"
    )
    assert "Traceback" not in err
    assert processes_naming(out) == []
    assert (out / "last.pt").read_bytes() == first
    assert not (out / ".lock").exists()
