"""``mondeq`` as a real process: a Ctrl-C while it starts, and a reader that closes the pipe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MONDEQ = [sys.executable, "-m", "mondeq_cli"]
ROOT = Path(__file__).resolve().parents[2]


def test_ctrl_c_while_starting_is_one_line_and_130(tmp_path):
    # Torch and the commands import for about a second before any command runs; a Ctrl-C
    # then was a KeyboardInterrupt traceback from inside torch's import.
    # As in a terminal: a suite started in the background (`make test &`) has SIGINT
    # ignored, which the child would inherit (Python then installs no handler, and the
    # Ctrl-C never arrives). A handled signal is reset to its default by exec. (Not a
    # preexec_fn: it forces a full fork of this large process, slow enough under load for
    # the signal to land between fork and exec, where it is lost.)
    held = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [*MONDEQ, "train", "--preset", "fmnist-fc", "--out", str(tmp_path / "run")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, held)
    time.sleep(0.3)  # past the interpreter's own start, inside the imports
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, out, err) == (130, "", "interrupted\n")
    assert not (tmp_path / "run").exists()


def test_a_closed_pipe_is_quiet_and_141():
    # `mondeq eval … | head` closing early was a BrokenPipeError traceback and exit 1.
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([*MONDEQ, "presets"], cwd=ROOT, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "")
