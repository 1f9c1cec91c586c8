"""How a run stops on a signal: finish the step, write a resumable ``last.pt``, exit.

Ctrl-C (SIGINT), ``kill`` / ``docker stop`` / a scheduler (SIGTERM) and a closed terminal or
ssh session (SIGHUP) set a flag that the loop checks after each step; every rank agrees on
it before stopping, so none waits alone in a collective. A second signal aborts at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """Raised out of :func:`training.train` after a signal, once ``last.pt`` is written."""

    def __init__(self, signum: int, path: Path | None, to: str = ""):
        """``to``: whom the signal reached when not every rank got it, e.g. ``" to rank 1 of
        2"`` (the others stop because one did)."""
        name = signal.Signals(signum).name + to
        super().__init__(
            f"interrupted by {name}; resume from {path}"
            if path is not None
            else f"interrupted by {name} before the first step; nothing was written"
        )
        self.signum, self.path = signum, path


class Aborted(KeyboardInterrupt):
    """A second stop signal: the run ends at once, without writing a checkpoint.

    Files are only ever replaced by rename, so the run folder keeps the last checkpoint
    written (none before the first epoch ends or the first signal's ``last.pt``).
    """

    def __init__(self, signum: int):
        super().__init__(f"aborted by a second {signal.Signals(signum).name}")
        self.signum = signum


class StopFlag:
    """Within ``with``: a stop signal (:data:`STOP_SIGNALS`) sets :attr:`signum`, a second
    one raises :class:`Aborted`; the previous handlers come back on exit.

    Outside the main thread, where Python cannot install handlers, signals are left alone.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        for s in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Aborted(signum)
        self.signum = signum
        if os.environ.get("RANK", "0") == "0":  # every rank gets it; one says so
            print(
                f"\n{signal.Signals(signum).name}: finishing this step, then writing a "
                "resumable checkpoint (send again to abort)",
                file=sys.stderr,
                flush=True,
            )

    @property
    def stopped(self) -> bool:
        """A stop signal has arrived in this process."""
        return self.signum is not None

    def which(self) -> int:
        """The signal this process got; SIGTERM on a rank that stops because another got one."""
        return self.signum if self.signum is not None else signal.SIGTERM

    def __exit__(self, *exc) -> bool:
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


__all__ = ["STOP_SIGNALS", "Aborted", "Interrupted", "StopFlag"]
