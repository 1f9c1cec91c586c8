"""Checkpoints round-trip; malformed files raise CheckpointError with a reason."""

from __future__ import annotations

import os

import pytest
import torch

import model_core
from model_core import CheckpointError, build_model, load_checkpoint, save_checkpoint

CONFIGS = [
    {"arch": "fc", "in_channels": 1, "image_size": 6, "hidden": 7},
    {"arch": "conv", "in_channels": 2, "image_size": 6, "channels": 3},
    {"arch": "multi_tier", "in_channels": 1, "image_size": 6, "channels": [2, 3]},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["arch"])
def test_round_trip_reproduces_logits_and_metadata(tmp_path, config):
    torch.manual_seed(0)
    model = build_model({**config, "solver": {"alpha": 0.7, "tol": 1e-6}})
    model.input_spec = {
        "shape": [config["in_channels"], 6, 6],
        "mean": [0.5] * config["in_channels"],
        "std": [0.25] * config["in_channels"],
        "class_names": [f"c{i}" for i in range(10)],
    }
    model.set_solver(alpha=0.35)
    path = save_checkpoint(
        model, tmp_path / "sub" / "model.pt", dataset="toy", metrics={"acc": 0.5}
    )
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left

    loaded = load_checkpoint(path)
    assert loaded.config == {**model.config}
    assert loaded.deq.settings.alpha == 0.35
    assert loaded.deq.settings.tol == 1e-6
    assert loaded.input_spec == model.input_spec
    assert loaded.metadata["dataset"] == "toy"
    assert loaded.metadata["metrics"] == {"acc": 0.5}
    assert loaded.metadata["package_version"] == model_core.__version__
    assert not loaded.training
    x = torch.randn(3, config["in_channels"], 6, 6)
    a, b = model.infer(x), loaded.infer(x)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.stats.iterations, b.stats.iterations)


def test_checkpoint_is_plain_data(tmp_path):
    model = build_model(CONFIGS[0])
    path = save_checkpoint(model, tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "mondeq-checkpoint"
    assert raw["schema_version"] == model_core.SCHEMA_VERSION
    assert set(raw) >= {"config", "state_dict", "input_spec", "solver", "metadata"}
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in raw["state_dict"])


def test_ddp_style_wrapper_is_unwrapped(tmp_path):
    model = build_model(CONFIGS[0])
    wrapped = torch.nn.DataParallel(model)
    raw = torch.load(save_checkpoint(wrapped, tmp_path / "m.pt"), weights_only=True)
    assert set(raw["state_dict"]) == set(model.state_dict())


def test_unserialisable_metadata_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        save_checkpoint(build_model(CONFIGS[0]), tmp_path / "m.pt", bad=object())
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_checkpoint(build_model(CONFIGS[0]), tmp_path / "m.pt", version=1)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(build_model(CONFIGS[0]), path, version=2)
    monkeypatch.undo()
    assert load_checkpoint(path).metadata["version"] == 1
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


def test_input_spec_that_turns_images_into_nan_is_refused_on_save(tmp_path):
    model = build_model(CONFIGS[0])
    model.input_spec = {**model.input_spec, "std": [0.0]}
    with pytest.raises(CheckpointError, match="refusing to save: input_spec std must be 1"):
        save_checkpoint(model, tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def _bad(tmp_path, name, data):
    p = tmp_path / name
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        torch.save(data, p)
    return p


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "no such file"),
        ("directory", "not a file"),
        ("empty", "unreadable"),
        ("garbage", "unreadable"),
        ("truncated", "unreadable"),
        ("state_dict", "not a monDEQ checkpoint.*import-locuslab"),
        ("list", "not a monDEQ checkpoint"),
        ("future", "newer than this package"),
        ("no_config", "'config' missing"),
        ("bad_config", "invalid model config"),
        ("wrong_weights", "weights do not match"),
        ("pickled_class", "unreadable.*pickled Python objects"),
        # Text and random bytes reach torch's legacy pickle reader (KeyError, IndexError).
        ("text", "not a checkpoint file .*KeyError"),
        ("spec_no_shape", "input_spec shape None is not \\[2, 6, 6\\]"),
        ("spec_mean_nan", "input_spec mean must be 2 finite numbers, got \\[nan, 0.0\\]"),
        ("spec_std_zero", "input_spec std must be 2 finite numbers > 0, got \\[0.0, 1.0\\]"),
        ("spec_classes", "input_spec class_names must be 10 strings"),
        ("metadata_int", "'metadata' is not a dict"),
    ],
)
def test_malformed_files_raise_checkpoint_error(tmp_path, case, match):
    good = save_checkpoint(build_model(CONFIGS[1]), tmp_path / "good.pt")
    raw = torch.load(good, weights_only=True)
    if case == "missing":
        path = tmp_path / "nope.pt"
    elif case == "directory":
        path = tmp_path
    elif case == "empty":
        path = _bad(tmp_path, "e.pt", b"")
    elif case == "garbage":
        path = _bad(tmp_path, "g.pt", b"\x00not a checkpoint at all" * 10)
    elif case == "truncated":
        path = _bad(tmp_path, "t.pt", good.read_bytes()[: good.stat().st_size // 2])
    elif case == "state_dict":
        path = _bad(tmp_path, "sd.pt", {"mon.linear_module.A.weight": torch.zeros(2, 2)})
    elif case == "list":
        path = _bad(tmp_path, "l.pt", [1, 2, 3])
    elif case == "future":
        path = _bad(tmp_path, "f.pt", {**raw, "schema_version": model_core.SCHEMA_VERSION + 1})
    elif case == "no_config":
        path = _bad(tmp_path, "nc.pt", {k: v for k, v in raw.items() if k != "config"})
    elif case == "bad_config":
        path = _bad(tmp_path, "bc.pt", {**raw, "config": {**raw["config"], "arch": "rnn"}})
    elif case == "wrong_weights":
        path = _bad(tmp_path, "ww.pt", {**raw, "config": {**raw["config"], "channels": 5}})
    elif case == "text":
        path = _bad(tmp_path, "x.pt", b"hello\n")
    elif case.startswith("spec_"):
        spec = dict(raw["input_spec"])
        spec.update(
            {
                "spec_no_shape": {"shape": None},
                "spec_mean_nan": {"mean": [float("nan"), 0.0]},
                "spec_std_zero": {"std": [0.0, 1.0]},
                "spec_classes": {"class_names": ["a", "b"]},
            }[case]
        )
        path = _bad(tmp_path, "sp.pt", {**raw, "input_spec": spec})
    elif case == "metadata_int":
        path = _bad(tmp_path, "mi.pt", {**raw, "metadata": 5})
    else:
        path = _bad(tmp_path, "pc.pt", {**raw, "metadata": {"obj": _Pickled()}})
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


class _Pickled:
    """A class instance: torch.save pickles it; the weights_only loader must refuse it."""
