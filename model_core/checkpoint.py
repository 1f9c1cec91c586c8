"""Self-describing checkpoints: a plain dict, written atomically, read with ``weights_only``.

Layout (schema version 2)::

    {
      "format": "mondeq-checkpoint",
      "schema_version": 2,
      "package_version": "0.1.0",
      "config": {...},          # ModelConfig.to_dict(): rebuilds the model alone, solver
                                # defaults (α possibly tuned) included: their one copy
      "state_dict": {...},      # CPU tensors of the unwrapped module
      "input_spec": {"shape": [C, H, W], "mean": [...], "std": [...], "class_names": [...]},
      "metadata": {...},        # free: dataset, metrics, command, seed, ...
      "calibration": Tensor | None,     # (N, C, H, W) pixels to tune α on, uint8 0–255
                                        # (or float in [0, 1])
      "training_state": dict | None,    # what `mondeq train --resume` continues from
    }

Version 1 (still read; :func:`read_checkpoint` upgrades it in memory) kept a second copy of
the solver settings beside ``config`` (``"solver"``, the one read), and the calibration batch
and training state inside ``metadata`` (keys ``"calibration"`` and ``"train"``).

No class is pickled, so files load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import InputSpec, ModelConfig
from .files import atomic_write
from .models import MonDEQClassifier, build_model

FORMAT = "mondeq-checkpoint"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
_PRIMITIVES = (str, int, float, bool, type(None))
# Before schema 2 these named fields were metadata keys; a metadata key of that name given to
# save_checkpoint is still taken as the field.
_LEGACY_KEYS = {"calibration": "calibration", "train": "training_state"}


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
    """Metadata and training state must load under weights_only: primitives, tensors, lists,
    dicts of str keys. Raises ``TypeError`` naming the first other value."""
    if isinstance(value, (*_PRIMITIVES, torch.Tensor)):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint key {where}.{k!r} must be a str")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(
        f"checkpoint {where} is a {type(value).__name__}; "
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


def check_input_spec(spec: Any, config: ModelConfig | dict) -> None:
    """Refuse an ``input_spec`` that does not describe the input of the model ``config`` builds.

    ``shape`` must be ``[in_channels, image_size, image_size]``; ``mean`` and ``std`` one
    finite number per channel, ``std`` > 0 (inputs are ``(x / 255 - mean) / std``, so a NaN
    or a zero there turns every image into NaN or inf, and every answer into the same class);
    ``class_names``, when present, one string per class. The rules of
    :meth:`InputSpec.from_dict <model_core.config.InputSpec.from_dict>`.

    Raises:
        ValueError: the first entry that is wrong, in one line.
    """
    InputSpec.from_dict(spec, config)


def _calibration_field(value: Any, spec: InputSpec) -> torch.Tensor | None:
    """The calibration batch as stored: a detached CPU copy. Raises :class:`CheckpointError`."""
    if value is None:
        return None
    c, h, w = spec.shape
    if not (
        isinstance(value, torch.Tensor)
        and (value.dtype == torch.uint8 or value.is_floating_point())
        and value.dim() == 4
        and value.shape[0] >= 1
        and tuple(value.shape[1:]) == spec.shape
    ):
        what = (
            f"a {value.dtype} tensor of shape {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else f"a {type(value).__name__}"
        )
        raise CheckpointError(
            f"refusing to save: calibration must be (N, {c}, {h}, {w}) pixels, uint8 or "
            f"float, N >= 1; got {what}"
        )
    return value.detach().cpu().clone()


def checkpoint_payload(
    model: nn.Module,
    *,
    calibration: torch.Tensor | None = None,
    training_state: dict | None = None,
    **metadata: Any,
) -> dict:
    """The dict :func:`save_checkpoint` writes (useful to send over a wire); arguments as
    there.

    Raises:
        TypeError: not a :class:`MonDEQClassifier`, or metadata or training state that is
            not plain data.
        CheckpointError: a weight holds a NaN or ±inf, the input spec does not fit the
            config, or a calibration batch not of the input's shape.
    """
    model = _unwrap(model)
    if not isinstance(model, MonDEQClassifier):
        raise TypeError(f"expected a MonDEQClassifier, got {type(model).__name__}")
    if "train" in metadata:  # its name before schema 2
        if training_state is not None:
            raise TypeError("training state given twice: as training_state and as metadata 'train'")
        training_state = metadata.pop("train")
    _refuse_non_finite(model.state_dict(), "refusing to save")
    config = model.model_config
    try:
        model.input_spec.check(config)
    except ValueError as e:
        raise CheckpointError(f"refusing to save: {e}") from None
    _check_plain(metadata, "metadata")
    if training_state is not None:
        if not isinstance(training_state, dict):
            raise TypeError(f"training_state must be a dict, got {type(training_state).__name__}")
        _check_plain(training_state, "training_state")
    from . import __version__

    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "package_version": __version__,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "input_spec": model.input_spec.to_dict(),
        "metadata": dict(metadata),
        "calibration": _calibration_field(calibration, model.input_spec),
        "training_state": training_state,
    }


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    calibration: torch.Tensor | None = None,
    training_state: dict | None = None,
    **metadata: Any,
) -> Path:
    """Write ``model`` to ``path`` atomically (:func:`~model_core.files.atomic_write`).

    A crash at any moment leaves either the old file or the new one, never half of one. The
    file holds what the call passes: a loaded model's ``calibration``, ``training_state``
    and ``metadata`` are written only when given again.

    Args:
        model: a :class:`MonDEQClassifier` (DDP / compiled wrappers are unwrapped).
        path: destination; parent folders are created.
        calibration: ``(N, C, H, W)`` pixels of the model's input shape (``uint8`` 0–255,
            or float in [0, 1]) for the server to tune α on at load (docs/math.md §6).
        training_state: plain data a run resumes from (optimizer state, progress, options);
            a metadata key ``train`` (its name before schema 2) is taken as this.
        **metadata: free metadata (dataset, metrics, seed, ...), plain values only.

    Returns:
        The destination path.

    Raises:
        CheckpointError: a weight holds a NaN or ±inf, an input spec that does not fit the
            config, or a calibration batch of another shape (nothing is written).
        TypeError: metadata or training state that is not plain data (nothing is written).
    """
    path = Path(path)
    try:
        payload = checkpoint_payload(
            model, calibration=calibration, training_state=training_state, **metadata
        )
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: torch.save(payload, f))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def reader_failure(e: BaseException) -> str:
    """``e`` named for a person: its module-qualified class (``struct.error``, not ``error``)
    and the first line of its message, for what torch's legacy reader raised on bytes that
    are no checkpoint."""
    cls = type(e)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    text = str(e).strip()
    return f"{name}: {text.splitlines()[0]}" if text else name


def _refusal(e: pickle.UnpicklingError) -> str:
    """What the safe loader refused. torch's message opens with advice to load the file with
    ``weights_only=False`` (which runs whatever code it holds) and names the cause later, after
    ``WeightsUnpickler error:``; the cause is what a user needs."""
    _, found, rest = str(e).partition("WeightsUnpickler error:")
    cause = next((line.strip() for line in rest.splitlines() if line.strip()), "")
    return cause if found and cause else _first_line(e)


def _check_crc(path: Path) -> None:
    """Refuse a zip-format checkpoint whose entries fail their stored CRC-32.

    torch writes a CRC-32 for every entry of the archive but never checks it when loading:
    flipped bytes inside tensor data loaded as other weights (a damaged copy evaluated to
    0% accuracy and exported as a model). Checking costs one read of the file (< 1 ms for
    the default models). Archives too damaged for zipfile to walk are left to torch.load,
    which reports them.

    Raises:
        CheckpointError: an entry's bytes do not match its CRC-32.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception:  # not a zip, or a broken directory: torch.load names the fault
        return
    if bad is not None:
        raise CheckpointError(
            f"{path}: corrupt: entry {bad} does not match its CRC-32 (the file changed after "
            "it was written)"
        )


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read and check a checkpoint file's dict, in the layout of :data:`SCHEMA_VERSION`.

    A version-1 file is upgraded in memory (:func:`upgrade_payload`); the file is not touched.

    Returns:
        The payload (module docstring), its fields of the right types; ``config`` and
        ``input_spec`` are checked only by :func:`load_checkpoint`, which builds the model.

    Raises:
        CheckpointError: missing, unreadable, truncated, foreign, older than version 1 or
            newer than this package reads, or a field of the wrong type.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    _check_crc(path)
    try:
        with warnings.catch_warnings():
            # Garbage whose first bytes read as a pickle protocol number makes torch warn
            # about that protocol before failing; the refusal below says what is wrong.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: unreadable: the safe (weights_only) loader refused it; it is corrupt or "
            f"holds pickled Python objects rather than plain data ({_refusal(e)})"
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
            f"{path}: not a checkpoint file (the reader failed with {reader_failure(e)})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = ""
        if isinstance(payload, dict) and any(str(k).startswith("mon.") for k in payload):
            hint = (
                "; it looks like the paper's state dict: convert it with `mondeq import-locuslab`"
            )
        raise CheckpointError(f"{path}: not a monDEQ checkpoint{hint}")
    version = payload.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: schema_version missing or invalid ({version!r})")
    if version > SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: schema version {version} is newer than this package reads "
            f"({SCHEMA_VERSION}); upgrade mondeq"
        )
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: schema version {version} is not one this package reads "
            f"({', '.join(map(str, READABLE_VERSIONS))})"
        )
    for key, kind in (("config", dict), ("state_dict", dict), ("input_spec", dict)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{path}: '{key}' missing or not a {kind.__name__}")
    if not isinstance(payload.get("metadata") or {}, dict):
        raise CheckpointError(f"{path}: 'metadata' is not a dict")
    payload = upgrade_payload(payload)
    if not isinstance(payload["calibration"], torch.Tensor | None):
        raise CheckpointError(f"{path}: 'calibration' is not a tensor")
    if not isinstance(payload["training_state"], dict | None):
        raise CheckpointError(f"{path}: 'training_state' is not a dict")
    return payload


def upgrade_payload(payload: dict) -> dict:
    """A checked payload of any readable version in the current layout (a new dict; the
    tensors are shared). Version 1: the top-level ``solver`` (the copy it read) goes into
    ``config``; ``metadata["calibration"]`` and ``metadata["train"]`` become the
    ``calibration`` and ``training_state`` fields."""
    out = dict(payload)
    out["metadata"] = dict(payload.get("metadata") or {})
    if payload["schema_version"] == 1:
        config = dict(payload["config"])
        solver = out.pop("solver", None)
        if isinstance(solver, dict):
            config["solver"] = solver
        out["config"] = config
        for old, new in _LEGACY_KEYS.items():
            out[new] = out["metadata"].pop(old, None)
        out["schema_version"] = SCHEMA_VERSION
    out.setdefault("calibration", None)
    out.setdefault("training_state", None)
    return out


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = None
) -> MonDEQClassifier:
    """Rebuild the model saved at ``path``, in eval mode.

    Reads schema versions 1 and 2 (:data:`READABLE_VERSIONS`).

    Args:
        path: a file written by :func:`save_checkpoint`.
        map_location: device to put the model on (default: CPU). The calibration batch
            stays on the CPU.

    Returns:
        The model, with ``input_spec``, ``calibration`` and ``training_state`` restored and
        ``metadata`` (the free metadata, plus ``package_version``) attached. For readers
        written before schema 2, ``metadata["calibration"]`` and ``metadata["train"]`` also
        hold the calibration batch and training state when there is one (the same objects).

    Raises:
        CheckpointError: missing, truncated, foreign or future-version file, contents that
            do not build a model, or weights holding a NaN or ±inf.
    """
    payload = read_checkpoint(path)
    _refuse_non_finite(payload["state_dict"], str(path))
    try:
        config = ModelConfig.from_dict(payload["config"])
        model = build_model(config)
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
        model.input_spec = InputSpec.from_dict(payload["input_spec"], config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model.calibration = payload["calibration"]
    model.training_state = payload["training_state"]
    model.metadata = dict(payload["metadata"])
    model.metadata.setdefault("package_version", payload.get("package_version"))
    for old, new in _LEGACY_KEYS.items():
        if payload[new] is not None:
            model.metadata[old] = payload[new]
    if map_location is not None:
        model.to(map_location)
    return model.eval()
