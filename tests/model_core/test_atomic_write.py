"""model_core.files.atomic_write: the one way a file is replaced, so no reader meets half of it."""

from __future__ import annotations

import os

import pytest
import torch

from model_core.files import atomic_write


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bytes_replace_the_file_with_plain_permissions_and_no_leftover(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"old\n")
    assert atomic_write(path, b'{"epoch": 1}\n') == path
    assert path.read_bytes() == b'{"epoch": 1}\n'
    # mkstemp makes 0600; a server running as another user must read what is published.
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_writer_function_gets_a_binary_file(tmp_path):
    path = tmp_path / "t.pt"
    atomic_write(path, lambda f: torch.save({"w": torch.arange(3)}, f))
    assert torch.load(path, weights_only=True)["w"].tolist() == [0, 1, 2]


def test_the_old_file_is_replaced_by_rename_not_rewritten(tmp_path):
    # A reader that opened the old file keeps reading it whole while the new one goes in.
    path = tmp_path / "last.pt"
    path.write_bytes(b"A" * 10_000)
    with open(path, "rb") as reader:
        atomic_write(path, b"B" * 20_000)
        assert reader.read() == b"A" * 10_000
    assert path.read_bytes() == b"B" * 20_000


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_nothing_else(tmp_path, error):
    path = tmp_path / "best.pt"
    path.write_bytes(b"kept")

    def write(f):
        f.write(b"half of a checkpo")
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, write)
    assert path.read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_a_missing_folder_is_an_oserror_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no" / "file.json", b"{}")
    assert list(tmp_path.iterdir()) == []
