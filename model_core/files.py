"""Writing a file so that a reader never sees half of it, and a crash never leaves half.

Checkpoints, ``metrics.jsonl``, curves and model cards are read by other processes while they
are rewritten (a server polling its model repository, ``mondeq export`` reading a run that is
still training). Every such write goes through :func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"  # the server skips names ending in it (service.repository)


def atomic_write(path: str | os.PathLike, content: bytes | Callable[[BinaryIO], None]) -> Path:
    """Replace ``path`` with ``content`` in one step: a reader sees the old file or the new.

    The content goes to a hidden temporary file in the same folder (``.NAME.XXXX.tmp``, on the
    same file system, so the rename is atomic), is flushed and ``fsync``-ed, given the
    permissions a plain ``open`` would (``0o666`` less the umask; ``mkstemp`` makes ``0o600``,
    which a server running as another user could not read), renamed over ``path`` with
    ``os.replace`` (POSIX ``rename(2)``), and the folder is ``fsync``-ed so that the rename
    itself survives a power loss. On any error, ``KeyboardInterrupt`` included, the temporary
    file is removed and ``path`` is left as it was.

    Args:
        path: the file to write; its folder must exist.
        content: the bytes, or a function that writes them to the binary file object it is
            given (``lambda f: torch.save(obj, f)``, ``lambda f: fig.savefig(f, format="png")``).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        OSError: the folder does not exist or cannot be written (nothing is left behind).
        Whatever ``content`` raises, after the temporary file is removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    # The rename is done and readers see the new file; some file systems cannot fsync a
    # folder (EINVAL), and failing there would report a written file as not written.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    return mask


__all__ = ["TEMP_SUFFIX", "atomic_write"]
