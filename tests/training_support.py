"""What the training tests share: the ``mondeq`` command as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MONDEQ = [sys.executable, "-m", "mondeq_cli"]


def mondeq(*args, check=True, timeout=1200, **kw) -> subprocess.CompletedProcess:
    """Run ``mondeq ARGS`` in the repository root; with ``check``, a non-zero exit raises
    ``AssertionError`` carrying both streams."""
    proc = subprocess.run(
        [*MONDEQ, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        **kw,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll ``predicate()`` every 20 ms until true, while ``proc`` runs.

    Raises:
        AssertionError: ``proc`` ended first (its stderr attached), or ``timeout`` seconds
            passed (a hang guard, not a speed check).
    """
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.02)


def processes_naming(path: Path) -> list[int]:
    """Pids of live processes whose command line mentions ``path`` (zombies excluded)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path) in cmdline and state != "Z":
            pids.append(int(d.name))
    return pids
