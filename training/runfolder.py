"""A run folder: who may write it, and the files a run keeps there.

:class:`RunFolder` writes the run's files (:data:`RUN_FILES`), each atomically
(:func:`model_core.files.atomic_write`), so a reader or a crash never meets half of one:

* ``last.pt``: the latest model plus everything needed to resume (optimizer, position in the
  epoch, partial epoch sums, history), written after every epoch and on a stop signal;
* ``best.pt``: the model with the best test accuracy so far (no training state);
* ``metrics.jsonl``: one line per epoch; ``curves.png``: loss, accuracy, iterations and α.

Results are never replaced or shared unasked.

A ``mondeq train --out DIR`` onto a folder that already holds a run (finished or not) is
refused unless ``--resume`` (continue it) or ``--overwrite`` (replace it) says which. While a
run writes to DIR it holds an exclusive advisory lock, ``flock(2)`` on ``DIR/.lock``: a second
run on the same folder is refused instead of interleaving its files with the first's, and the
kernel drops the lock when the holder's process ends, however it ends, so a crashed or
``kill -9``-ed run leaves no stuck lock (at most a stale, unlocked ``.lock`` file that the next
run takes over).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_core import load_checkpoint, save_checkpoint
from model_core.files import atomic_write

from .curves import curves_png

if TYPE_CHECKING:
    import torch

    from model_core import MonDEQClassifier

    from .distributed import Dist

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "curves.png")
# What `mondeq export` writes into MODELS/NAME/VERSION besides curves.png.
PUBLISHED_FILES = ("model.pt", "card.json")
LOCK_NAME = ".lock"


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (holds a run, is locked, is not a folder)."""


def existing_run_files(out: Path) -> list[str]:
    """The files of a run (``RUN_FILES``) that ``out`` already holds."""
    return [name for name in RUN_FILES if (out / name).exists()]


def check_run_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run where one exists, unless told what to do with it.

    Raises:
        RunFolderError: ``out`` is not a folder, is a published model version (holds
            ``model.pt`` or ``card.json``), or holds run files and neither ``resume`` nor
            ``overwrite`` is set, or both are set.
    """
    if resume and overwrite:
        raise RunFolderError("--resume continues a run and --overwrite replaces it; pass one")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder")
    published = [name for name in PUBLISHED_FILES if (out / name).exists()]
    if published:
        # Not even with --overwrite: a run would replace the version's curves.png and leave
        # its checkpoints beside the model a server loads from there.
        raise RunFolderError(
            f"--out {out} is a published model version ({', '.join(published)}); "
            "train into a run folder and `mondeq export` it"
        )
    found = existing_run_files(out) if out.is_dir() else []
    if found and not (resume or overwrite):
        raise RunFolderError(
            f"{out} already holds a run ({', '.join(found)}); pass --resume {out} to continue "
            "it or --overwrite to replace it"
        )


def clear_run_files(out: Path) -> None:
    """Remove the previous run's files (``RUN_FILES``) from ``out``.

    ``--overwrite`` calls this just before the new run's first write, not when it starts: a
    run that is refused, diverges or is stopped before writing anything leaves the previous
    one as it was, and one that writes leaves no file of the previous run beside its own.
    """
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


@contextlib.contextmanager
def claim_run_folder(out: Path, *, resume: bool, overwrite: bool) -> Iterator[Path]:
    """Create and lock ``out`` for one run.

    The check of :func:`check_run_folder` is repeated under the lock, so two runs started
    together cannot both pass it. The lock is released (and ``.lock`` removed) on exit. With
    ``overwrite`` the previous run's files stay until the caller's first write
    (:func:`clear_run_files`).

    Raises:
        RunFolderError: as :func:`check_run_folder`; ``out`` is locked by another run; or it
            cannot be created.
    """
    check_run_folder(out, resume=resume, overwrite=overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"cannot create --out {out}: {e.strerror}") from None
    lock = out / LOCK_NAME
    fd = _lock(lock)
    try:
        check_run_folder(out, resume=resume, overwrite=overwrite)
        yield out
    finally:
        # Unlink while still holding the lock: a run that opened the old file meanwhile gets
        # the lock on an unlinked inode, which _lock detects, and retries on a fresh file.
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _lock(path: Path) -> int:
    """An fd holding ``flock(LOCK_EX)`` on ``path``, which holds the holder's pid."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise RunFolderError(f"cannot create the lock {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunFolderError(f"cannot lock {path}: {e.strerror}") from None
            raise RunFolderError(
                f"{path.parent} is in use by another run (pid {holder}, lock {path}); wait for "
                "it to end or choose another --out"
            ) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the previous holder removed this file as we opened it: take a fresh one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class RunFolder:
    """The files of the run in ``out``: claimed, resumed from and written through here.

    Only rank 0 writes (the caller checks ``dist.is_main``); it holds the folder's lock from
    :meth:`claim` until the ``ExitStack`` given there closes. With ``overwrite`` the previous
    run's files are removed just before the first write (:func:`clear_run_files`).
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False):
        self.out = Path(out)
        self.last = self.out / "last.pt"
        self.best = self.out / "best.pt"
        self._clear_first = overwrite

    def claim(self, dist: Dist, held: contextlib.ExitStack, *, resume: bool) -> None:
        """Rank 0 creates and locks the folder (:func:`claim_run_folder`) until ``held`` closes.

        Raises:
            RunFolderError: on every rank, rank 0's refusal, if any.
        """
        refusal = None
        if dist.is_main:
            try:
                held.enter_context(
                    claim_run_folder(self.out, resume=resume, overwrite=self._clear_first)
                )
            except RunFolderError as e:
                refusal = str(e)
        refusal = dist.broadcast_object(refusal)
        if refusal is not None:
            raise RunFolderError(refusal)

    def resume_into(self, model: MonDEQClassifier, optimizer: torch.optim.Optimizer) -> dict:
        """Load ``last.pt``'s weights, solver settings and optimizer state into ``model`` and
        ``optimizer``; returns its ``progress`` (epoch, step, sums, history, best, elapsed).

        Raises:
            CheckpointError: ``last.pt`` does not load.
        """
        saved = load_checkpoint(self.last)
        state = saved.training_state or {}
        model.load_state_dict(saved.state_dict())
        model.solver_settings = saved.solver_settings
        optimizer.load_state_dict(_optimizer_from_plain(state["optimizer"]))
        return dict(state["progress"])

    def save_last(
        self,
        model: MonDEQClassifier,
        metadata: dict[str, Any],
        *,
        calibration: torch.Tensor,
        options: dict,
        optimizer: torch.optim.Optimizer,
        progress: dict,
    ) -> Path:
        """Write ``last.pt``: ``model`` with ``metadata``, the ``calibration`` pixels and the
        training state (``options``, the optimizer state with str keys, ``progress``)."""
        state = {
            "options": options,
            "optimizer": _optimizer_to_plain(optimizer.state_dict()),
            "progress": progress,
        }
        return self._save(self.last, model, metadata, calibration=calibration, training_state=state)

    def save_best(
        self, model: MonDEQClassifier, metadata: dict[str, Any], *, calibration: torch.Tensor
    ) -> Path:
        """Write ``best.pt``: ``model`` with ``metadata`` and ``calibration``, no training
        state."""
        return self._save(self.best, model, metadata, calibration=calibration)

    def write_metrics(self, history: list[dict]) -> None:
        """Write ``metrics.jsonl``: one JSON object per finished epoch."""
        self._clear_previous()
        text = "".join(json.dumps(row) + "\n" for row in history)
        atomic_write(self.out / "metrics.jsonl", text.encode())

    def write_curves(self, history: list[dict], title: str) -> None:
        """Write ``curves.png`` of ``history`` (:func:`training.curves.curves_png`)."""
        self._clear_previous()
        atomic_write(self.out / "curves.png", curves_png(history, title))

    def _save(self, path: Path, model: MonDEQClassifier, metadata: dict, **fields) -> Path:
        self._clear_previous()
        return save_checkpoint(model, path, **fields, **metadata)

    def _clear_previous(self) -> None:
        if self._clear_first:
            clear_run_files(self.out)
            self._clear_first = False


def _optimizer_to_plain(state: dict) -> dict:
    """Optimizer state with str keys (checkpoint metadata must load under weights_only)."""
    return {
        "state": {str(k): v for k, v in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def _optimizer_from_plain(state: dict) -> dict:
    groups = [
        dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in state["param_groups"]
    ]
    return {"state": {int(k): v for k, v in state["state"].items()}, "param_groups": groups}


__all__ = [
    "LOCK_NAME",
    "RUN_FILES",
    "RunFolder",
    "RunFolderError",
    "check_run_folder",
    "claim_run_folder",
    "clear_run_files",
    "existing_run_files",
]
