"""Self-describing checkpoints: a plain dict, written atomically, read with ``weights_only``.

Layout (schema version 1)::

    {
      "format": "mondeq-checkpoint",
      "schema_version": 1,
      "package_version": "0.1.0",
      "config": {...},          # build_model() input; rebuilds the model alone
      "state_dict": {...},      # CPU tensors of the unwrapped module
      "input_spec": {"shape": [C, H, W], "mean": [...], "std": [...], "class_names": [...]},
      "solver": {...},          # solver defaults (α possibly tuned), as SolverSettings
      "metadata": {...},        # free: dataset, metrics, command, seed, ...
    }

No class is pickled, so files load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .equilibrium import SolverSettings
from .models import MonDEQClassifier, build_model

FORMAT = "mondeq-checkpoint"
SCHEMA_VERSION = 1
_PRIMITIVES = (str, int, float, bool, type(None))


class CheckpointError(Exception):
    """A file that cannot be loaded as a monDEQ checkpoint, with the reason in the message.

    Raised for a missing, truncated, corrupt, foreign or future-version file, for one whose
    contents do not build a model, and, on save and on load, for weights with a NaN or ±inf
    (such a model answers every input with the same meaningless class).
    """


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def _check_plain(value: Any, where: str) -> None:
    """Metadata must load under weights_only: primitives, tensors, lists, dicts of str keys."""
    if isinstance(value, (*_PRIMITIVES, torch.Tensor)):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint metadata key {where}.{k!r} must be a str")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(
        f"checkpoint metadata {where} is a {type(value).__name__}; "
        "use str, int, float, bool, None, tensors, lists and dicts"
    )


def non_finite_weights(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or ±inf."""
    return [
        name
        for name, t in state_dict.items()
        if isinstance(t, torch.Tensor)
        and (t.is_floating_point() or t.is_complex())
        and not bool(torch.isfinite(t).all())
    ]


def _refuse_non_finite(state_dict: dict, where: str) -> None:
    bad = non_finite_weights(state_dict)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(
            f"{where}: non-finite weights (NaN or inf) in {', '.join(bad[:3])}{more}; "
            "a diverged model is no result"
        )


def check_input_spec(spec: Any, config: dict) -> None:
    """Refuse an ``input_spec`` that does not describe the input of the model ``config`` builds.

    ``shape`` must be ``[in_channels, image_size, image_size]``; ``mean`` and ``std`` one
    finite number per channel, ``std`` > 0 (inputs are ``(x / 255 - mean) / std``, so a NaN
    or a zero there turns every image into NaN or inf, and every answer into the same class);
    ``class_names``, when present, one string per class.

    Raises:
        ValueError: the first entry that is wrong, in one line.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"input_spec must be a mapping, got {type(spec).__name__}")
    c, size = config.get("in_channels"), config.get("image_size")
    shape = spec.get("shape")
    if not isinstance(shape, list | tuple) or list(shape) != [c, size, size]:
        raise ValueError(f"input_spec shape {spec.get('shape')!r} is not [{c}, {size}, {size}]")
    for key in ("mean", "std"):
        v = spec.get(key)
        ok = isinstance(v, list | tuple) and len(v) == c
        ok = ok and all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v
        )
        if not ok or (key == "std" and not all(x > 0 for x in v)):
            what = "finite numbers > 0" if key == "std" else "finite numbers"
            raise ValueError(f"input_spec {key} must be {c} {what}, got {v!r}")
    names, k = spec.get("class_names"), config.get("num_classes")
    if names is not None and not (
        isinstance(names, list | tuple)
        and len(names) == k
        and all(isinstance(n, str) for n in names)
    ):
        raise ValueError(f"input_spec class_names must be {k} strings, got {names!r}")


def checkpoint_payload(model: nn.Module, **metadata: Any) -> dict:
    """The dict :func:`save_checkpoint` writes (useful to send over a wire).

    Raises:
        TypeError: not a :class:`MonDEQClassifier`, or metadata that is not plain data.
        CheckpointError: a weight holds a NaN or ±inf.
    """
    model = _unwrap(model)
    if not isinstance(model, MonDEQClassifier):
        raise TypeError(f"expected a MonDEQClassifier, got {type(model).__name__}")
    _refuse_non_finite(model.state_dict(), "refusing to save")
    try:
        check_input_spec(model.input_spec, model.config)
    except ValueError as e:
        raise CheckpointError(f"refusing to save: {e}") from None
    _check_plain(metadata, "metadata")
    from . import __version__

    solver = model.solver_settings.to_dict()
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "package_version": __version__,
        "config": {**model.config, "solver": solver},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "input_spec": dict(model.input_spec),
        "solver": solver,
        "metadata": dict(metadata),
    }


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``model`` to ``path`` atomically (temporary file in the same folder, then rename).

    A crash at any moment leaves either the old file or the new one, never half of one.

    Args:
        model: a :class:`MonDEQClassifier` (DDP / compiled wrappers are unwrapped).
        path: destination; parent folders are created.
        **metadata: free metadata (dataset, metrics, seed, ...), plain values only.

    Returns:
        The destination path.

    Raises:
        CheckpointError: a weight holds a NaN or ±inf (nothing is written).
    """
    path = Path(path)
    try:
        payload = checkpoint_payload(model, **metadata)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a served file must be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read and validate the raw checkpoint dict. Raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: unreadable: the safe (weights_only) loader refused it; it is corrupt or "
            f"holds pickled Python objects rather than plain data ({_first_line(e)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(
            f"{path}: unreadable, truncated or corrupt ({_first_line(e)})"
        ) from None
    except Exception as e:
        # Bytes that are no zip archive go to torch's legacy pickle reader, which answers
        # garbage with whatever its opcode interpreter trips on (a text file: KeyError 101,
        # random bytes: IndexError).
        raise CheckpointError(
            f"{path}: not a checkpoint file (the reader failed with {type(e).__name__})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = ""
        if isinstance(payload, dict) and any(str(k).startswith("mon.") for k in payload):
            hint = (
                "; it looks like the paper's state dict: convert it with `mondeq import-locuslab`"
            )
        raise CheckpointError(f"{path}: not a monDEQ checkpoint{hint}")
    version = payload.get("schema_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: schema_version missing or invalid ({version!r})")
    if version > SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: schema version {version} is newer than this package reads "
            f"({SCHEMA_VERSION}); upgrade mondeq"
        )
    for key, kind in (("config", dict), ("state_dict", dict), ("input_spec", dict)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{path}: '{key}' missing or not a {kind.__name__}")
    return payload


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = None
) -> MonDEQClassifier:
    """Rebuild the model saved at ``path``, in eval mode.

    Args:
        path: a file written by :func:`save_checkpoint`.
        map_location: device to put the model on (default: CPU).

    Returns:
        The model, with ``input_spec`` restored and ``metadata`` (the free metadata, plus
        ``package_version``) attached.

    Raises:
        CheckpointError: missing, truncated, foreign or future-version file, contents that
            do not build a model, or weights holding a NaN or ±inf.
    """
    payload = read_checkpoint(path)
    _refuse_non_finite(payload["state_dict"], str(path))
    config = dict(payload["config"])
    if isinstance(payload.get("solver"), dict):
        config["solver"] = payload["solver"]
    try:
        model = build_model(config)
        SolverSettings.from_dict(config.get("solver"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid model config: {e}") from None
    try:
        result = model.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path}: weights do not match the config: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not match the config "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    try:
        check_input_spec(payload["input_spec"], model.config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not isinstance(payload.get("metadata") or {}, dict):
        raise CheckpointError(f"{path}: 'metadata' is not a dict")
    model.input_spec = dict(payload["input_spec"])
    model.metadata = dict(payload.get("metadata") or {})
    model.metadata.setdefault("package_version", payload.get("package_version"))
    if map_location is not None:
        model.to(map_location)
    return model.eval()
