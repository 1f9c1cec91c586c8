"""Import state dicts saved by the paper's reference code (locuslab/monotone_op_net).

Its FC model (``SingleFcNet`` with ``MONSingleFc`` and ReLU) stores::

    mon.linear_module.U.weight  (n, D)     mon.linear_module.U.bias  (n,)
    mon.linear_module.A.weight  (n, n)     mon.linear_module.B.weight (n, n)
    Wout.weight                 (K, n)     Wout.bias                  (K,)

and computes ``W = (1 − m) I − AᵀA + B − Bᵀ`` from these weights exactly as
:class:`~model_core.operators.FCOperator` does, so the weights carry over unchanged.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from .checkpoint import CheckpointError, reader_failure
from .config import InputSpec
from .models import MonDEQClassifier, build_model

KEY_MAP = {
    "mon.linear_module.U.weight": "deq.op.U.weight",
    "mon.linear_module.U.bias": "deq.op.U.bias",
    "mon.linear_module.A.weight": "deq.op.A.weight",
    "mon.linear_module.B.weight": "deq.op.B.weight",
    "Wout.weight": "head.weight",
    "Wout.bias": "head.bias",
}


def read_locuslab_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the reference code's state dict safely (tensors saved on CUDA load onto the CPU).

    ``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` wrapper is unwrapped.

    Returns:
        The state dict, parameter name → tensor (keys as in the module docstring).

    Raises:
        CheckpointError: no such file, a file ``torch.load`` cannot read safely, or one
            that holds no dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({e})") from None
    except Exception as e:  # garbage reaches torch's legacy pickle reader: KeyError, IndexError
        failure = reader_failure(e)
        raise CheckpointError(
            f"{path}: not a readable PyTorch state dict (the reader failed with {failure})"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def import_locuslab(
    state_dict: dict[str, torch.Tensor],
    *,
    arch: str = "fc",
    hidden: int,
    m: float = 1.0,
    in_shape: tuple[int, int, int] = (1, 28, 28),
    mean: list[float] | None = None,
    std: list[float] | None = None,
    class_names: list[str] | None = None,
    solver: dict | None = None,
) -> MonDEQClassifier:
    """Build our classifier from the reference code's FC state dict.

    Args:
        state_dict: keys as in the module docstring (a ``module.`` prefix is stripped).
        arch: only ``"fc"``: the reference conv layers store free scale scalars whose
            sign our parameterisation forbids (docs/math.md §1).
        hidden: hidden width ``n``.
        m: the monotonicity parameter the model was trained with.
        in_shape: ``(C, H, W)`` of the input.
        mean, std: per-channel normalisation the model was trained with.
        class_names: defaults to ``"0"`` … ``"K-1"``.
        solver: solver defaults (``SolverSettings`` fields).

    Raises:
        CheckpointError: keys or shapes that do not fit the arguments.
        ValueError: ``mean``/``std`` not one positive-std value per channel, or
            ``class_names`` not one per output row.
    """
    if arch != "fc":
        raise CheckpointError(
            f"import of arch {arch!r} is not supported: only the reference FC model ('fc') is"
        )
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    missing = [k for k in KEY_MAP if k not in sd]
    if missing:
        raise CheckpointError(
            f"not a reference-code FC state dict: missing {missing}; found {sorted(sd)[:8]}"
        )
    c, h, w = in_shape
    k = int(sd["Wout.weight"].shape[0])
    expected = {
        "mon.linear_module.U.weight": (hidden, c * h * w),
        "mon.linear_module.U.bias": (hidden,),
        "mon.linear_module.A.weight": (hidden, hidden),
        "mon.linear_module.B.weight": (hidden, hidden),
        "Wout.weight": (k, hidden),
        "Wout.bias": (k,),
    }
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise CheckpointError(
                f"{key} has shape {tuple(sd[key].shape)}, expected {shape} "
                f"for --hidden {hidden} --in-shape {c},{h},{w}"
            )
    if h != w:
        raise CheckpointError(f"in_shape must be square, got {in_shape}")
    for flag, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) != c:
            raise ValueError(f"{flag} needs {c} values (one per channel), got {len(values)}")
    if std is not None and not all(v > 0 for v in std):
        raise ValueError(f"--std values must be > 0, got {list(std)}")
    if class_names and len(class_names) != k:
        raise ValueError(f"--class-names needs {k} names (the model has {k} outputs)")
    if class_names and not all(name.strip() for name in class_names):
        raise ValueError(f"--class-names holds an empty name: {list(class_names)}")
    config = {
        "arch": "fc",
        "in_channels": c,
        "image_size": h,
        "hidden": hidden,
        "num_classes": k,
        "m": m,
        "solver": solver or {},
    }
    model = build_model(config)
    model.load_state_dict({KEY_MAP[key]: sd[key].float() for key in KEY_MAP}, strict=True)
    model.input_spec = InputSpec(
        shape=(c, h, w),
        mean=tuple(mean) if mean is not None else (0.0,) * c,
        std=tuple(std) if std is not None else (1.0,) * c,
        class_names=tuple(class_names) if class_names else tuple(str(i) for i in range(k)),
    )
    return model.eval()
