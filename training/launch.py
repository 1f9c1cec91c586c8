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

A rank that fails on its own (killed, e.g. by the out-of-memory killer; an exception; its
data unreadable) breaks the others' next collective, and they exit with
:data:`EXIT_PEER_LOST`, silently. One that hangs makes the others' collective time out
(``--dist-timeout``); those still running :data:`HANG_GRACE_S` after a rank lost its peers
are killed as hung. The launcher then prints one line naming the rank, what happened to it
and where ``--resume`` continues (:func:`resume_hint`), and exits with that rank's status
(``128 + N`` for signal N, 124 for a hung rank). Ranks still running
:data:`FAILURE_GRACE_S` after a rank failed are killed; files are only replaced by rename,
so that cannot leave half a checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # the ranks' STOP_SIGNALS
FAILURE_GRACE_S = 30.0  # after a rank fails, how long the others get to exit before SIGKILL
# After a rank exits with EXIT_PEER_LOST and none has failed otherwise: the ranks its
# collective timed out on. The others in that collective fail within milliseconds of it.
HANG_GRACE_S = 5.0
EXIT_PEER_LOST = 4  # a rank whose collective failed because another rank failed or hung
EXIT_HUNG = 124  # the launcher's status when a hung rank was the cause (as timeout(1))
REPORT_ENV = "MONDEQ_LAUNCH_REPORTS"  # folder where a rank leaves its one-line error
_POLL_S = 0.05
_PR_SET_PDEATHSIG = 1


def launch(
    argv: list[str], nproc: int, *, out: Path | None = None, timeout_s: float | None = None
) -> int:
    """Run ``python -m training ARGV`` as ranks ``0 .. nproc-1`` and wait for all of them.

    Args:
        argv: ``mondeq train`` arguments, without ``--nproc``.
        nproc: number of ranks (>= 1).
        out: the run folder, for the line that says where ``--resume`` continues.
        timeout_s: the ranks' ``--dist-timeout``, for the line that names a hung rank.

    Returns:
        0 if every rank exits 0; after a rank failed on its own, its status (``128 + N`` for
        signal N, :data:`EXIT_HUNG` for a hung one), with one line on stderr; otherwise the
        status of the first rank that did not exit 0, e.g. 143 after SIGTERM. Only once every
        rank has exited.
    """
    reports = tempfile.mkdtemp(prefix="mondeq-ranks-")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        REPORT_ENV: reports,
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
        ranks = _wait(procs, received)
        status = ranks.status()
        if received:
            return status
        if ranks.failed_alone():
            line = _failure_line(ranks, Path(reports), timeout_s)
            print(f"mondeq train: {line}; the run stopped; {resume_hint(out)}", file=sys.stderr)
        elif status == 2:  # every rank refused the same input
            failed = next(r for r in ranks.order if ranks.codes[r])
            message = _read_report(Path(reports), failed)
            if message:
                print(f"mondeq train: {message}", file=sys.stderr)
        return status
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _send(procs, signal.SIGKILL)  # only ranks still running: after an error in this function
        for p in procs:
            p.wait()
        for f in Path(reports).iterdir():
            f.unlink()
        os.rmdir(reports)


class _Ranks:
    """How each rank ended: its exit status (``-N``: signal N) and whether the launcher
    killed it as hung (``stopped``: it was in the stopped state, e.g. after SIGSTOP)."""

    def __init__(self, n: int):
        self.codes: list[int | None] = [None] * n
        self.hung: dict[int, bool] = {}  # rank -> was stopped
        self.killed: set[int] = set()  # still running FAILURE_GRACE_S after a rank failed
        self.order: list[int] = []  # ranks in the order their exit was seen

    def failed_alone(self) -> bool:
        """Some rank failed while others did not fail the same way (they lost it, or hung,
        or were killed), so no rank's own message tells the whole story."""
        codes = [c for c in self.codes if c is not None]
        return bool(self.hung) or EXIT_PEER_LOST in codes or any(c < 0 for c in codes)

    def causes(self) -> list[int]:
        """The ranks that failed on their own (not by losing a peer, not killed by the
        launcher as hung or after the grace), in the order their exit was seen."""
        return [
            r
            for r in self.order
            if self.codes[r] not in (0, EXIT_PEER_LOST)
            and r not in self.hung
            and r not in self.killed
        ]

    def cause(self) -> int | None:
        """The first rank to fail on its own, whose status the launcher exits with."""
        causes = self.causes()
        return causes[0] if causes else None

    def status(self) -> int:
        cause = self.cause()
        if cause is None and self.hung:
            return EXIT_HUNG
        failed = [r for r in self.order if self.codes[r] != 0]
        rank = cause if cause is not None else (failed[0] if failed else None)
        if rank is None:
            return 0
        code = self.codes[rank]
        return 128 - code if code < 0 else code


def _wait(procs: list[subprocess.Popen], received: list[int]) -> _Ranks:
    ranks = _Ranks(len(procs))
    kill_at = None
    while True:
        for rank, p in enumerate(procs):
            if ranks.codes[rank] is None and p.poll() is not None:
                ranks.codes[rank] = p.returncode
                ranks.order.append(rank)
        running = [r for r, c in enumerate(ranks.codes) if c is None]
        if not running:
            return ranks
        if kill_at is None and not received and any(c for c in ranks.codes):
            grace = FAILURE_GRACE_S if ranks.cause() is not None else HANG_GRACE_S
            kill_at = time.monotonic() + grace
        if kill_at is not None and (
            time.monotonic() > kill_at
            # A stopped rank (SIGSTOP) will not exit on its own: no grace for it.
            or (ranks.cause() is None and all(_stopped(procs[r].pid) for r in running))
        ):
            if ranks.cause() is None:  # a peer's collective timed out on these
                ranks.hung = {r: _stopped(procs[r].pid) for r in running}
            else:
                ranks.killed = set(running)
            _send(procs, signal.SIGKILL)
            kill_at = float("inf")
        time.sleep(_POLL_S)


def _stopped(pid: int) -> bool:
    """The process is in the stopped state (SIGSTOP, SIGTSTP; a debugger's stop)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")


def _failure_line(ranks: _Ranks, reports: Path, timeout_s: float | None) -> str:
    """What happened to the ranks that brought the run down, in one clause per outcome:
    ranks that failed alike (the same signal, or the same status and message) are named
    together, e.g. ``ranks 1, 2 of 3 were killed by SIGKILL``."""
    world = len(ranks.codes)
    cause = ranks.cause()
    if cause is None and ranks.hung:
        names = ", ".join(str(r) for r in sorted(ranks.hung))
        which = f"rank {names} of {world}" if len(ranks.hung) == 1 else f"ranks {names} of {world}"
        stopped = " (stopped by a signal such as SIGSTOP)" if any(ranks.hung.values()) else ""
        wait = f"{timeout_s:g}" if timeout_s is not None else f"{_default_timeout():g}"
        return (
            f"{which} stopped answering{stopped}: a collective waited --dist-timeout {wait} s "
            "for it, so it was killed"
        )
    if cause is None:
        return f"the {world} ranks lost contact with each other"
    alike: dict[tuple[int, str | None], list[int]] = {}
    for r in ranks.causes():
        code = ranks.codes[r]
        alike.setdefault((code, None if code < 0 else _read_report(reports, r)), []).append(r)
    return "; ".join(_outcome(rs, world, code, message) for (code, message), rs in alike.items())


def _outcome(rs: list[int], world: int, code: int, message: str | None) -> str:
    """``rank 1 of 2 was killed by SIGKILL``, ``ranks 1, 2 of 3 crashed (exit 1, …): …``."""
    which = f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} of {world}"
    if code < 0:
        name = signal.Signals(-code).name
        hint = (
            " (another process or the kernel's out-of-memory killer)" if name == "SIGKILL" else ""
        )
        return f"{which} {'were' if len(rs) > 1 else 'was'} killed by {name}{hint}"
    said = f": {message}" if message else ""
    if code == 1:
        return f"{which} crashed (exit 1, traceback above){said}"
    return f"{which} failed (exit {code}){said}"


def _default_timeout() -> float:
    from .distributed import DEFAULT_TIMEOUT_S

    return DEFAULT_TIMEOUT_S


def _read_report(reports: Path, rank: int) -> str | None:
    try:
        text = (reports / f"rank{rank}").read_text(errors="replace").strip()
    except OSError:
        return None
    return text.splitlines()[-1] if text else None


def launched() -> bool:
    """This process is a rank started by :func:`launch` (which reports a failed rank)."""
    return bool(os.environ.get(REPORT_ENV))


def report(message: str) -> None:
    """Leave this rank's one-line error for the launcher (a no-op outside :func:`launch`)."""
    folder = os.environ.get(REPORT_ENV)
    if folder:
        with contextlib.suppress(OSError):
            Path(folder, f"rank{os.environ.get('RANK', '0')}").write_text(message + "\n")


def resume_hint(out: Path | None) -> str:
    """Where ``--resume`` continues the run in ``out``: ``last.pt``'s epoch and step, read
    (and so checked) with :func:`model_core.load_checkpoint`."""
    if out is None:
        return "resume it with --resume DIR"
    last = out / "last.pt"
    if not last.is_file():
        return "no epoch had finished, so there is nothing to resume: start it again"
    from model_core import CheckpointError, load_checkpoint

    try:
        progress = (load_checkpoint(last).training_state or {})["progress"]
        epoch, step = int(progress["epoch"]), int(progress["step"])
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        return f"{last} does not load ({e}); start it again"
    where = f"the end of epoch {epoch}" if step == 0 else f"epoch {epoch + 1}, step {step}"
    return f"--resume {out} continues from {where}"


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


__all__ = ["EXIT_HUNG", "EXIT_PEER_LOST", "launch", "launched", "report", "resume_hint"]
