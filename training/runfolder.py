"""Who may write a run folder, and when: results are never replaced or shared unasked.

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
import os
from collections.abc import Iterator
from pathlib import Path

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


__all__ = [
    "LOCK_NAME",
    "RUN_FILES",
    "RunFolderError",
    "check_run_folder",
    "claim_run_folder",
    "clear_run_files",
    "existing_run_files",
]
