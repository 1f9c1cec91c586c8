"""The paper's reference code, loaded from a checkout to be timed beside ours (``--reference-dir``).

The reference is github.com/locuslab/monotone_op_net (Winston & Kolter 2020): ``mon.py``,
``splitting.py``, ``utils.py`` and ``train.py``. It is never copied into this project; it is
imported from the directory the user names, and only to measure it. It was written for
PyTorch 1.5, so :func:`load_reference` applies runtime shims to the loaded modules; no file of
the checkout is edited and ``torch`` itself is not patched:

* ``torch.rfft(x, 2, onesided=False)`` and ``torch.irfft(X, 2, onesided=False)`` (removed in
  PyTorch 1.8) are given to ``mon.py`` as ``view_as_real(fft.fft2(x))`` and ``fft.irfft2`` of
  the ``W//2 + 1`` leading columns of ``X``: the half spectrum the old C2R transform read.
* ``F.relu`` is given to ``mon.py`` as ``F.threshold(x, 0, 0)``: the same values and the same
  gradient, but autograd keeps the input, not the output, which ``MONBorderReLU`` overwrites in
  place (current PyTorch refuses that backward: "modified by an inplace operation").
* where torchvision is missing, empty stand-ins for it during the import: ``train.py`` imports
  it for its data loaders, which the benchmark never calls.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REFERENCE_URL = "https://github.com/locuslab/monotone_op_net"
# The files the reference's models need: train.py imports mon, splitting imports utils,
# utils imports train. Their module names are generic, so they are imported in isolation.
REFERENCE_FILES = ("mon.py", "splitting.py", "utils.py", "train.py")


class ReferenceCodeError(ValueError):
    """The reference directory is missing, incomplete or does not import; the message is one
    line naming the directory and what to pass."""


@dataclass(frozen=True)
class ReferenceCode:
    """The loaded reference modules (``mon``, ``splitting``, ``train``), with the directory
    they came from and the SHA-256 of each file (so that a result names the code it timed)."""

    path: Path
    mon: types.ModuleType
    splitting: types.ModuleType
    train: types.ModuleType
    sha256: dict[str, str]


def _rfft(x: torch.Tensor, signal_ndim: int, normalized=False, onesided=True) -> torch.Tensor:
    """PyTorch 1.x ``torch.rfft`` as mon.py calls it: ``(..., H, W)`` real →
    ``(..., H, W, 2)``, the full 2-D spectrum as (real, imaginary) pairs."""
    if signal_ndim != 2 or normalized or onesided:
        raise NotImplementedError("shim covers rfft(x, 2, onesided=False) only, as mon.py calls it")
    return torch.view_as_real(torch.fft.fft2(x))


def _irfft(
    x: torch.Tensor, signal_ndim: int, normalized=False, onesided=True, signal_sizes=None
) -> torch.Tensor:
    """PyTorch 1.x ``torch.irfft(X, 2, onesided=False)``: ``(..., H, W, 2)`` → ``(..., H, W)``
    real, from the ``W//2 + 1`` leading columns (the old C2R transform's input)."""
    if signal_ndim != 2 or normalized or onesided or signal_sizes is not None:
        raise NotImplementedError(
            "shim covers irfft(X, 2, onesided=False) only, as mon.py calls it"
        )
    h, w = x.shape[-3], x.shape[-2]
    half = torch.view_as_complex(x[..., : w // 2 + 1, :].contiguous())
    return torch.fft.irfft2(half, s=(h, w))


class _Namespace(types.ModuleType):
    """A module that is ``base`` except for the attributes set on it."""

    def __init__(self, name: str, base: types.ModuleType, **overrides: Any):
        super().__init__(name)
        self._base = base
        for k, v in overrides.items():
            setattr(self, k, v)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def _torchvision_stand_ins() -> dict[str, types.ModuleType]:
    """Empty ``torchvision``, ``.datasets``, ``.transforms`` where torchvision is missing."""
    try:
        importlib.import_module("torchvision")
        return {}
    except ImportError:
        pass
    root = types.ModuleType("torchvision")
    subs = {
        f"torchvision.{n}": types.ModuleType(f"torchvision.{n}") for n in ("datasets", "transforms")
    }
    root.datasets, root.transforms = subs["torchvision.datasets"], subs["torchvision.transforms"]
    return {"torchvision": root, **subs}


def load_reference(path: str | Path) -> ReferenceCode:
    """Import the reference code from the checkout at ``path``, shimmed for current PyTorch
    (module docstring). ``sys.modules`` and ``sys.path`` are left as they were: the modules'
    generic names (``mon``, ``utils``, ``train``) never shadow another package's.

    Raises:
        ReferenceCodeError: ``path`` is no directory, lacks one of :data:`REFERENCE_FILES`, or
            its code fails to import or lacks the classes the benchmark builds.
    """
    root = Path(path).expanduser()
    where = f"--reference-dir {path}"
    if not root.is_dir():
        raise ReferenceCodeError(f"{where}: no such directory (clone {REFERENCE_URL} there)")
    for name in REFERENCE_FILES:
        if not (root / name).is_file():
            raise ReferenceCodeError(
                f"{where}: no {name} there; expected a checkout of {REFERENCE_URL}"
            )
    names = [n.removesuffix(".py") for n in REFERENCE_FILES]
    stand_ins = _torchvision_stand_ins()
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.modules.update(stand_ins)
    sys.path.insert(0, str(root))
    try:
        importlib.import_module("splitting")  # imports utils, which imports train, then mon
        loaded = {n: sys.modules[n] for n in names}
    except Exception as e:  # the reference's own code: any failure is its, reported as one line
        raise ReferenceCodeError(f"{where}: importing it failed: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(root))
        for n in [*names, *stand_ins]:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    mon, splitting, train = loaded["mon"], loaded["splitting"], loaded["train"]
    for module, attr in (
        (splitting, "MONPeacemanRachford"),
        (train, "SingleConvNet"),
        (train, "MultiConvNet"),
        (train, "SingleFcNet"),
    ):
        if not hasattr(module, attr):
            raise ReferenceCodeError(f"{where}: {module.__name__}.py has no {attr}")
    mon.torch = _Namespace("torch", torch, rfft=_rfft, irfft=_irfft)
    mon.F = _Namespace("F", F, relu=lambda x: F.threshold(x, 0.0, 0.0))
    sha = {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in REFERENCE_FILES}
    return ReferenceCode(root.resolve(), mon, splitting, train, sha)


def build_reference_model(
    ref: ReferenceCode, config: dict, *, alpha: float, tol: float, max_iter: int
) -> torch.nn.Module:
    """The reference's network for one of our model configs, with Peaceman–Rachford
    splitting as the paper trains it (``experiments.ipynb``): ``SingleFcNet`` for ``fc``,
    ``SingleConvNet`` for ``conv``, ``MultiConvNet`` for ``multi_tier``, with the config's
    sizes, ``m`` (default 1) and the given ``alpha``, ``tol`` and ``max_iter``. Weights are
    the reference's own initialisation, from torch's global generator. Input: ``(B, C, H, H)``
    images; output ``(B, 10)`` logits.

    Raises:
        ValueError: an architecture the reference does not have, or one that is not 10 classes.
    """
    if config.get("num_classes", 10) != 10:
        raise ValueError("the reference's networks have 10 classes")
    pr = ref.splitting.MONPeacemanRachford
    common = {"alpha": alpha, "tol": tol, "max_iter": max_iter, "m": config.get("m", 1.0)}
    arch, c, size = config["arch"], config["in_channels"], config["image_size"]
    if arch == "fc":
        return ref.train.SingleFcNet(pr, in_dim=c * size * size, out_dim=config["hidden"], **common)
    if arch == "conv":
        return ref.train.SingleConvNet(
            pr, in_dim=size, in_channels=c, out_channels=config["channels"], **common
        )
    if arch == "multi_tier":
        return ref.train.MultiConvNet(
            pr, in_dim=size, in_channels=c, conv_sizes=tuple(config["channels"]), **common
        )
    raise ValueError(f"the reference code has no {arch!r} network")
