"""training: a rank of `mondeq train --nproc 2` that fails on its own stops the run cleanly.

Real processes on the offline Fashion-MNIST data: rank 1 is SIGKILLed, SIGTERMed, stopped
(SIGSTOP), raises, or finds its data unreadable, at a fixed optimizer step of epoch 2, and a
Ctrl-C reaches the launcher's process group. The fault is planted in rank 1 alone by a
``sitecustomize`` on its PYTHONPATH (each signal is a real one, sent by the rank to itself or
to the launcher's group). Each case ends with one line that names what happened, the status
of the rank that failed, no process left behind, only whole files in the run folder, and a
``last.pt`` that ``--resume`` continues to the same weights as a run that never failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from training_support import MONDEQ, ROOT, mondeq, processes_naming

from model_core import load_checkpoint
from training.runfolder import RUN_FILES

# 20 steps of 64 per epoch, 2 epochs; the fault comes at optimizer step 25 (epoch 2, step 5).
RUN = ["--preset", "fmnist-fc", "--batch-size", "64", "--steps-per-epoch", "20",
       "--eval-limit", "64", "--epochs", "2", "--seed", "5", "--no-progress",
       "--no-tune-alpha", "--nproc", "2"]  # fmt: skip
FAULT_STEP = 25
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# Rank 1 only (or the ranks in MONDEQ_TEST_RANKS): at its FAULT_STEP-th Adam step, before the
# update, do MONDEQ_TEST_FAULT.
SITECUSTOMIZE = """
import os, signal
fault = os.environ.get("MONDEQ_TEST_FAULT", "")
if fault and os.environ.get("RANK") in os.environ.get("MONDEQ_TEST_RANKS", "1").split(","):
    kind, _, at = fault.partition("@")
    if kind == "late":  # a rank that starts seconds after the others, as on a busy machine
        import time
        time.sleep(float(at))
    elif kind == "slowwrite":  # rank 0's epoch-end files take seconds (a busy disk)
        import time, training.runfolder
        write = training.runfolder.RunFolder.write_curves
        def slow_write(self, *args, **kwargs):
            time.sleep(float(at))
            return write(self, *args, **kwargs)
        training.runfolder.RunFolder.write_curves = slow_write
    elif kind == "unreadable":
        import training.data, training.setup
        def load_dataset(*args, **kwargs):
            message = "cannot read train-images-idx3-ubyte.gz: Permission denied"
            raise training.data.DataError(message)
        training.setup.load_dataset = load_dataset
    else:
        import torch
        step, calls = torch.optim.Adam.step, [0]
        def faulty_step(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == int(at):
                if kind == "raise":
                    raise OSError(5, "Input/output error", "/mnt/scratch/shard-1")
                if kind == "pgint":  # Ctrl-C: SIGINT to the launcher's process group
                    os.killpg(os.getpgid(os.getppid()), signal.SIGINT)
                else:
                    os.kill(os.getpid(), getattr(signal, kind))
            return step(self, *args, **kwargs)
        torch.optim.Adam.step = faulty_step
"""


@pytest.fixture(scope="module")
def fault_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fault")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The weights of the same run, never interrupted."""
    out = tmp_path_factory.mktemp("whole") / "run"
    mondeq("train", *RUN, "--out", out, env=ENV)
    return load_checkpoint(out / "last.pt").state_dict()


def run_with_fault(
    out: Path, fault: str, fault_path: Path, *extra, ranks: str = "1"
) -> tuple[int, str]:
    """``mondeq train RUN`` with ``fault`` planted in ``ranks``; (exit status, stderr)."""
    env = {**ENV, "MONDEQ_TEST_FAULT": fault, "MONDEQ_TEST_RANKS": ranks,
           "PYTHONPATH": str(fault_path)}  # fmt: skip
    proc = subprocess.run(
        [*MONDEQ, "train", *RUN, "--out", str(out), *extra], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
        start_new_session=True,  # a Ctrl-C to the launcher's group stays out of pytest's
    )  # fmt: skip
    return proc.returncode, proc.stderr


def check_stopped_cleanly(out: Path, expected_progress: dict) -> None:
    """Nothing left running, only whole run files, and last.pt where the run stopped."""
    assert processes_naming(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)  # no .tmp, no .lock
    progress = load_checkpoint(out / "last.pt").training_state["progress"]
    assert {k: progress[k] for k in ("epoch", "step")} == expected_progress


def check_resumes_to_the_whole_run(out: Path, uninterrupted: dict) -> None:
    resumed = mondeq("train", "--resume", out, "--nproc", "2", env=ENV)
    assert json.loads(resumed.stdout)["epoch"] == 2
    weights = load_checkpoint(out / "last.pt").state_dict()
    assert weights.keys() == uninterrupted.keys()
    for k, v in uninterrupted.items():
        assert torch.equal(weights[k], v), k


def lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_a_rank_killed_mid_epoch_is_named_in_one_line(tmp_path, fault_path, uninterrupted):
    # Was: exit 137 after rank 0's 25-line gloo traceback ("Connection closed by peer") and
    # a "SIGTERM: finishing this step" notice for a step that could not finish.
    out = tmp_path / "run"
    code, err = run_with_fault(out, f"SIGKILL@{FAULT_STEP}", fault_path)
    assert code == 128 + signal.SIGKILL, err
    assert lines(err)[2:] == [
        "mondeq train: rank 1 of 2 was killed by SIGKILL (another process or the kernel's "
        f"out-of-memory killer); the run stopped; --resume {out} continues from the end of "
        "epoch 1"
    ]
    assert lines(err)[1].startswith("epoch 1/2: ")
    check_stopped_cleanly(out, {"epoch": 1, "step": 0})
    check_resumes_to_the_whole_run(out, uninterrupted)


def test_two_of_three_ranks_killed_are_both_named(tmp_path, fault_path):
    # Was: "rank 1 of 3 was killed by SIGKILL …", as if rank 2 had only lost its peer.
    out = tmp_path / "run"
    three = ["--nproc", "3", "--batch-size", "96"]  # the later flags win
    code, err = run_with_fault(out, f"SIGKILL@{FAULT_STEP}", fault_path, *three, ranks="1,2")
    assert code == 128 + signal.SIGKILL, err
    assert lines(err)[2:] == [
        "mondeq train: ranks 1, 2 of 3 were killed by SIGKILL (another process or the kernel's "
        f"out-of-memory killer); the run stopped; --resume {out} continues from the end of "
        "epoch 1"
    ]
    check_stopped_cleanly(out, {"epoch": 1, "step": 0})


def test_a_rank_that_raises_is_named_after_its_own_traceback(tmp_path, fault_path, uninterrupted):
    out = tmp_path / "run"
    code, err = run_with_fault(out, f"raise@{FAULT_STEP}", fault_path)
    assert code == 1, err
    assert lines(err)[-1] == (
        "mondeq train: rank 1 of 2 crashed (exit 1, traceback above): OSError: [Errno 5] "
        "Input/output error: '/mnt/scratch/shard-1'; the run stopped; --resume "
        f"{out} continues from the end of epoch 1"
    )
    assert err.count("Traceback") == 1  # rank 1's own; rank 0 says nothing
    assert "gloo" not in err
    check_stopped_cleanly(out, {"epoch": 1, "step": 0})
    check_resumes_to_the_whole_run(out, uninterrupted)


def test_a_rank_whose_data_is_unreadable_is_named_once(tmp_path, fault_path):
    # Was: nothing from rank 1 (only rank 0 reported data errors), and rank 0's gloo
    # traceback.
    out = tmp_path / "run"
    code, err = run_with_fault(out, "unreadable", fault_path)
    assert code == 2, err
    assert lines(err) == [
        "mondeq train: rank 1 of 2 failed (exit 2): cannot read train-images-idx3-ubyte.gz: "
        "Permission denied; the run stopped; no epoch had finished, so there is nothing to "
        "resume: start it again"
    ]
    assert not out.exists()  # nothing written: the same command starts it again
    assert processes_naming(out) == []


def test_a_hung_rank_times_out_is_killed_and_named(tmp_path, fault_path, uninterrupted):
    # Was: rank 0 waited in its collective for gloo's default 30 minutes.
    out = tmp_path / "run"
    code, err = run_with_fault(out, f"SIGSTOP@{FAULT_STEP}", fault_path, "--dist-timeout", "2")
    assert code == 124, err
    assert lines(err)[2:] == [
        "mondeq train: rank 1 of 2 stopped answering (stopped by a signal such as SIGSTOP): a "
        "collective waited --dist-timeout 2 s for it, so it was killed; the run stopped; "
        f"--resume {out} continues from the end of epoch 1"
    ]
    check_stopped_cleanly(out, {"epoch": 1, "step": 0})
    check_resumes_to_the_whole_run(out, uninterrupted)


def test_a_rank_that_starts_late_is_not_taken_for_hung(tmp_path, fault_path):
    # Was: with --dist-timeout 2, rank 0 gave up on the rendezvous before rank 1 (3 s late)
    # arrived: exit 4, "the 2 ranks lost contact with each other" after 32 lines of c10d
    # stack. The timeout watches the training steps, where the ranks meet in lockstep.
    out = tmp_path / "run"
    code, err = run_with_fault(out, "late@3", fault_path, "--dist-timeout", "2")
    assert code == 0, err
    assert [line.split(":")[0] for line in lines(err)] == ["fmnist-fc", "epoch 1/2", "epoch 2/2"]
    assert processes_naming(out) == []


def test_a_slow_epoch_end_on_rank_0_is_not_taken_for_hung(tmp_path, fault_path):
    # Was: with --dist-timeout 2, rank 1 gave up in the barrier while rank 0 wrote epoch 1's
    # curves for 3 s: exit 4, "the 2 ranks lost contact with each other". On a busy machine
    # the plain writes took that long, and the hung-rank case below failed so now and then.
    out = tmp_path / "run"
    code, err = run_with_fault(out, "slowwrite@3", fault_path, "--dist-timeout", "2", ranks="0")
    assert code == 0, err
    assert [line.split(":")[0] for line in lines(err)] == ["fmnist-fc", "epoch 1/2", "epoch 2/2"]
    assert processes_naming(out) == []
    progress = load_checkpoint(out / "last.pt").training_state["progress"]
    assert {k: progress[k] for k in ("epoch", "step")} == {"epoch": 2, "step": 0}


def test_a_sigterm_to_one_rank_stops_every_rank_at_a_step(tmp_path, fault_path, uninterrupted):
    # Was: "interrupted by SIGTERM", as if the whole job had been sent it.
    out = tmp_path / "run"
    code, err = run_with_fault(out, f"SIGTERM@{FAULT_STEP}", fault_path)
    assert code == 128 + signal.SIGTERM, err
    assert lines(err)[2:] == [
        f"mondeq train: interrupted by SIGTERM to rank 1 of 2; resume from {out}/last.pt"
    ]
    # Rank 1 finishes the step it was in (the 25th, epoch 2's 5th); every rank stops there.
    check_stopped_cleanly(out, {"epoch": 1, "step": FAULT_STEP - 20})
    check_resumes_to_the_whole_run(out, uninterrupted)


def test_ctrl_c_to_the_launcher_s_group_stops_at_a_step(tmp_path, fault_path, uninterrupted):
    out = tmp_path / "run"
    code, err = run_with_fault(out, f"pgint@{FAULT_STEP}", fault_path)
    assert code == 128 + signal.SIGINT, err
    assert lines(err)[2:] == [
        "SIGINT: finishing this step, then writing a resumable checkpoint (send again to abort)",
        f"mondeq train: interrupted by SIGINT; resume from {out}/last.pt",
    ]
    assert processes_naming(out) == []
    progress = load_checkpoint(out / "last.pt").training_state["progress"]
    assert progress["epoch"] == 1 and FAULT_STEP - 20 <= progress["step"] < 20, progress
    check_resumes_to_the_whole_run(out, uninterrupted)
