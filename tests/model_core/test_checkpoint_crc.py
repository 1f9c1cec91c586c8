"""A checkpoint whose bytes changed after it was written is refused, not loaded as other
weights: torch stores a CRC-32 per zip entry but never checks it."""

from __future__ import annotations

import pytest

from model_core import CheckpointError, build_model, load_checkpoint, save_checkpoint
from model_core.config import ModelConfig


def test_flipped_bytes_in_tensor_data_are_a_checkpoint_error(tmp_path):
    config = ModelConfig.from_dict({"arch": "fc", "hidden": 8, "in_channels": 1,
                                    "image_size": 6, "num_classes": 3})  # fmt: skip
    good = save_checkpoint(build_model(config), tmp_path / "good.pt")
    load_checkpoint(good)  # an intact file loads
    raw = bytearray(good.read_bytes())
    # Inside the first weight tensor's stored bytes (found by its name in the archive): the
    # file stays a valid zip and torch.load returned other finite weights.
    start = raw.index(b"archive/data/0") + 64
    raw[start + 200] ^= 0x01
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"corrupt: entry archive/data/\d+ does not match "
                       r"its CRC-32 \(the file changed after it was written\)$"):  # fmt: skip
        load_checkpoint(bad)
