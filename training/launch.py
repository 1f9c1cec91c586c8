"""``mondeq train --nproc N``: N ranks on this machine that start, stop and fail as one job.

The ranks are ``python -m training ARGS`` with torch.distributed's ``env://`` rendezvous on
loopback (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), the
variables ``torchrun --standalone`` sets. The launcher is this module rather than torchrun
because a stop signal must reach each rank exactly once and the job's exit status must be the
ranks' own: torchrun answers SIGTERM with a traceback and exit status 1, kills ranks that take
more than 30 s to write their checkpoint, and, since a terminal's Ctrl-C reaches it and it
forwards the signal again, makes every rank see two SIGINTs, which means "abort".

Each rank runs in its own session, so only the launcher receives a terminal's signals; it
forwards SIGINT, SIGTERM and SIGHUP to every rank (each finishes its step, rank 0 writes a
resumable ``last.pt``), and returns only when every rank has exited. A second signal is
forwarded too (the ranks abort at once), a third kills them. If the launcher itself is
killed, the kernel sends each rank SIGTERM (``PR_SET_PDEATHSIG``), so no rank trains on
unattended.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # the ranks' STOP_SIGNALS
FAILURE_GRACE_S = 60.0  # after a rank fails, how long the others get to exit before SIGKILL
_POLL_S = 0.05
_PR_SET_PDEATHSIG = 1


def launch(argv: list[str], nproc: int) -> int:
    """Run ``python -m training ARGV`` as ranks ``0 .. nproc-1`` and wait for all of them.

    Args:
        argv: ``mondeq train`` arguments, without ``--nproc``.
        nproc: number of ranks (>= 1).

    Returns:
        0 if every rank exits 0; otherwise the exit status of the first rank that did not
        (``128 + N`` for a rank ended by signal N), e.g. 143 after SIGTERM, once every rank has
        exited.
    """
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
    }
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N ranks would oversubscribe the cores
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        sig = signal.SIGKILL if len(received) >= 3 else signum
        _send(procs, sig)

    old = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        # Held back while the ranks start, so that each one gets every signal exactly once.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            for rank in range(nproc):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "training", *argv],
                        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                        start_new_session=True,
                        preexec_fn=_in_rank(os.getpid()),
                    )
                )
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        return _wait(procs, received)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _send(procs, signal.SIGKILL)  # only ranks still running: after an error in this function
        for p in procs:
            p.wait()


def _wait(procs: list[subprocess.Popen], received: list[int]) -> int:
    first_failure: int | None = None
    kill_at = None
    while True:
        running = False
        for p in procs:
            if p.returncode is None and p.poll() is None:
                running = True
            elif p.returncode != 0 and first_failure is None:
                first_failure = p.returncode
                if not received:  # a rank crashed: the others may wait on it in a collective
                    _send(procs, signal.SIGTERM)
                    kill_at = time.monotonic() + FAILURE_GRACE_S
        if not running:
            break
        if kill_at is not None and time.monotonic() > kill_at:
            _send(procs, signal.SIGKILL)
            kill_at = None
        time.sleep(_POLL_S)
    if first_failure is None:
        return 0
    return 128 - first_failure if first_failure < 0 else first_failure


def _send(procs: list[subprocess.Popen], sig: int) -> None:
    """Signal the ranks not yet reaped (a reaped rank's pid may belong to another process)."""
    for p in procs:
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)


def _in_rank(launcher: int):
    libc = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL(None, use_errno=True)  # loaded here: no dlopen after fork

    def setup() -> None:  # runs in the child between fork and exec
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != launcher:  # the launcher died before prctl took effect
                os._exit(128 + signal.SIGTERM)

    return setup


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["launch"]
