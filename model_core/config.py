"""The typed contract a checkpoint stores: what model to build, and what input it takes.

* :class:`ModelConfig`: the architecture and its sizes, ``m`` and the solver defaults;
  :func:`~model_core.models.build_model` takes one (or the plain dict of
  :meth:`ModelConfig.to_dict`, the documented public form).
* :class:`InputSpec`: the input's ``(C, H, W)``, the per-channel normalisation and the
  class names, with the one implementation of the normalisation, :meth:`InputSpec.normalize`.
* The architecture registry: :func:`register_architecture` maps an ``arch`` name to the code
  that checks its own config keys and builds its operator, nonlinearity and head input.
  The built-in ``"fc"``, ``"conv"`` and ``"multi_tier"`` are registered by
  :mod:`model_core.models`; a new architecture is one ``register_architecture`` call.

§N refers to docs/math.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from .equilibrium import SolverSettings
from .nonlinearity import Nonlinearity
from .operators import MonotoneOperator

# ---- architecture registry --------------------------------------------------------------------


@dataclass(frozen=True)
class ArchitectureParts:
    """What an architecture's builder returns: the equilibrium layer's parts and the head input.

    Attributes:
        operator: the monotone operator holding ``W`` and ``U x + b`` (§1).
        nonlinearity: ``σ``, a proximal operator (§1).
        features: ``(operator, z) ↦ (B, D)``, the head's input read off the equilibrium
            ``z`` ``(B, *operator.z_shape)``; a pure function of its arguments (no parameters),
            defined at module level so that the model pickles (DDP and worker processes).
        num_features: ``D``, the width of the linear head's input.
        features_norm: the ℓ2 operator norm of ``features`` (``‖pool‖`` of §7, eq. (13)):
            1 for the identity or a slice, 1/4 for a 4 × 4 average pool.
    """

    operator: MonotoneOperator
    nonlinearity: Nonlinearity
    features: Callable[[MonotoneOperator, Tensor], Tensor]
    num_features: int
    features_norm: float


@dataclass(frozen=True)
class Architecture:
    """A registered architecture (see :func:`register_architecture`).

    Attributes:
        name: the config's ``arch`` value.
        build: ``ModelConfig ↦ ArchitectureParts``; draws the initial weights (from torch's
            global generator, in a fixed order, so a seed fixes the model).
        params: ``(params, config) ↦ params``: checks and normalises the architecture's own
            config keys (``params``: every key of the config dict that is not a
            :class:`ModelConfig` field; ``config``: the checked common fields). Raises
            ``ValueError`` naming the wrong or unknown key.
    """

    name: str
    build: Callable[[ModelConfig], ArchitectureParts]
    params: Callable[[dict, ModelConfig], dict]


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(
    name: str,
    build: Callable[[ModelConfig], ArchitectureParts],
    *,
    params: Callable[[dict, ModelConfig], dict],
) -> Architecture:
    """Make ``arch = name`` buildable by :func:`~model_core.models.build_model`.

    Args:
        name: the ``arch`` value (a new name; re-registering one replaces it).
        build: builds the operator, nonlinearity and head input of a checked config.
        params: checks the architecture's own keys (see :class:`Architecture`); it must
            refuse keys it does not know, so that a typo is an error, not a default.

    Returns:
        The registered :class:`Architecture`.

    Raises:
        ValueError: ``name`` is not a non-empty string.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"architecture name must be a non-empty str, got {name!r}")
    arch = Architecture(name, build, params)
    ARCHITECTURES[name] = arch
    return arch


def get_architecture(name: Any) -> Architecture:
    """The registered architecture ``name``.

    Raises:
        ValueError: no such architecture, listing the registered ones.
    """
    arch = ARCHITECTURES.get(name) if isinstance(name, str) else None
    if arch is None:
        raise ValueError(f"config 'arch' must be one of {list(ARCHITECTURES)}, got {name!r}")
    return arch


# ---- model config --------------------------------------------------------------------------


def is_positive_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` ≥ 1 as written (``True``, ``2.0`` and ``"2"`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class ModelConfig:
    """What a classifier is: enough to rebuild it (its weights aside).

    The dict form (:meth:`to_dict`, :meth:`from_dict`) is what ``build_model`` has always
    taken and what a checkpoint's ``"config"`` holds: these fields plus the architecture's own
    keys at the top level (``hidden`` for ``fc``, ``channels`` for ``conv`` and
    ``multi_tier``).

    Attributes:
        arch: a registered architecture (:data:`ARCHITECTURES`): ``"fc"``, ``"conv"``,
            ``"multi_tier"``.
        in_channels: ``C``, image channels (1 for MNIST, 3 for CIFAR/SVHN).
        image_size: ``H = W`` in pixels, before the one-pixel pad of conv models.
        num_classes: ``K``, the head's outputs (default 10).
        m: the monotonicity parameter, ``I − W ⪰ m I`` (§1; default 1.0, the paper's).
        solver: the solver defaults of the forward and backward solves (§2, §3); a dict
            is taken as :meth:`SolverSettings.from_dict` takes it. The one copy a checkpoint
            stores.
        arch_params: the architecture's own keys, as its ``params`` check returned them
            (read-only): ``{"hidden": n}`` (fc), ``{"channels": n}`` (conv),
            ``{"channels": [n_1, …]}`` (multi_tier, at least 2 tiers).

    Raises:
        ValueError: the first wrong field, in one line (an unknown ``arch`` lists the
            registered ones; an unknown key names itself).
    """

    arch: str
    in_channels: int
    image_size: int
    num_classes: int = 10
    m: float = 1.0
    solver: SolverSettings = field(default_factory=SolverSettings)
    arch_params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        architecture = get_architecture(self.arch)
        for key in ("in_channels", "image_size", "num_classes"):
            if not is_positive_int(getattr(self, key)):
                raise ValueError(
                    f"config {key!r} must be a positive int, got {getattr(self, key)!r}"
                )
        m = self.m
        if (
            isinstance(m, bool)
            or not isinstance(m, int | float)
            or not (math.isfinite(m) and m > 0)
        ):
            raise ValueError(f"m must be > 0 for a monotone operator, got {m!r}")
        object.__setattr__(self, "m", float(m))
        if not isinstance(self.solver, SolverSettings):
            if self.solver is not None and not isinstance(self.solver, Mapping):
                raise ValueError(
                    f"config 'solver' must be a mapping of solver settings, got {self.solver!r}"
                )
            object.__setattr__(self, "solver", SolverSettings.from_dict(self.solver))
        if not isinstance(self.arch_params, Mapping):
            raise ValueError(
                f"arch_params must be a mapping, got {type(self.arch_params).__name__}"
            )
        params = architecture.params(dict(self.arch_params), self)
        object.__setattr__(self, "arch_params", MappingProxyType(params))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ModelConfig:
        """The config of a ``build_model`` dict: its :class:`ModelConfig` fields, and every
        other key for the architecture's own check.

        Raises:
            ValueError: not a mapping, or a wrong field (see the class).
        """
        if isinstance(config, ModelConfig):
            return config
        if not isinstance(config, Mapping):
            raise ValueError(f"model config must be a dict, got {type(config).__name__}")
        own = {f.name for f in dataclasses.fields(cls)} - {"arch_params"}
        given = {k: v for k, v in config.items() if k in own}
        if "arch" not in given:
            get_architecture(None)  # raises, listing the registered architectures
        if "solver" in given and given["solver"] is None:
            del given["solver"]
        missing = [k for k in ("in_channels", "image_size") if k not in given]
        if missing:
            raise ValueError(f"config {missing[0]!r} must be a positive int, got None")
        return cls(**given, arch_params={k: v for k, v in config.items() if k not in own})

    def to_dict(self) -> dict[str, Any]:
        """The plain-data form (JSON- and ``weights_only``-safe): ``arch``, the
        architecture's keys, ``m``, ``solver`` (:meth:`SolverSettings.to_dict`), then
        ``in_channels``, ``image_size``, ``num_classes``. Tuples become lists."""
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.arch_params.items()}
        return {
            "arch": self.arch,
            **params,
            "m": self.m,
            "solver": self.solver.to_dict(),
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
        }

    def replace(self, **changes: Any) -> ModelConfig:
        """This config with ``changes`` (fields); checked as a new one."""
        return dataclasses.replace(self, **changes)

    # arch_params is a read-only mapping proxy, which neither pickles nor deep-copies: a
    # config is immutable, so a copy may be itself, and it pickles as its plain-data form
    # (models are deep-copied by callers and pickled to worker processes).
    def __deepcopy__(self, memo: dict) -> ModelConfig:
        return self

    def __reduce__(self):
        return (ModelConfig.from_dict, (self.to_dict(),))

    def __hash__(self) -> int:  # arch_params is a mapping; its items hash
        fields = (self.arch, self.in_channels, self.image_size, self.num_classes, self.m)
        return hash((*fields, self.solver, tuple(sorted(self.arch_params.items()))))


def normalize_config(config: Mapping[str, Any] | ModelConfig) -> dict[str, Any]:
    """Check a ``build_model`` config and fill its defaults: ``ModelConfig.from_dict(config)
    .to_dict()`` (kept for callers of the dict API).

    Raises:
        ValueError: saying what is wrong (see :class:`ModelConfig`).
    """
    return ModelConfig.from_dict(config).to_dict()


# ---- input spec ----------------------------------------------------------------------------

_SPEC_KEYS = ("shape", "mean", "std", "class_names")


def _check_spec(
    shape: Any,
    mean: Any,
    std: Any,
    class_names: Any,
    *,
    expected_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
) -> None:
    """Raise ``ValueError`` for the first entry of an input spec that is wrong (values as
    given, so that the message shows what the file or caller holds)."""
    if expected_shape is not None:
        if not isinstance(shape, list | tuple) or list(shape) != list(expected_shape):
            c, h, w = expected_shape
            raise ValueError(f"input_spec shape {shape!r} is not [{c}, {h}, {w}]")
    elif not (
        isinstance(shape, list | tuple) and len(shape) == 3 and all(map(is_positive_int, shape))
    ):
        raise ValueError(f"input_spec shape must be [C, H, W] of positive ints, got {shape!r}")
    c = shape[0]
    for key, v in (("mean", mean), ("std", std)):
        ok = isinstance(v, list | tuple) and len(v) == c
        ok = ok and all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v
        )
        if not ok or (key == "std" and not all(x > 0 for x in v)):
            what = "finite numbers > 0" if key == "std" else "finite numbers"
            raise ValueError(f"input_spec {key} must be {c} {what}, got {v!r}")
    strings = isinstance(class_names, list | tuple) and all(isinstance(n, str) for n in class_names)
    if num_classes is not None:
        if not (strings and len(class_names) == num_classes):
            raise ValueError(
                f"input_spec class_names must be {num_classes} strings, got {class_names!r}"
            )
    elif not (strings and len(class_names) >= 1):
        raise ValueError(f"input_spec class_names must be a list of strings, got {class_names!r}")


@dataclass(frozen=True, eq=False)
class InputSpec(Mapping):
    """The input a model expects, and how pixels become that input.

    A model's input is ``x = (p − mean_c) / std_c`` per channel ``c``, for pixels ``p`` in
    [0, 1] (``uint8`` pixels are ``p = v / 255``); the certified radius (§7) is in the units
    of ``x``.

    Attributes:
        shape: ``(C, H, W)`` of one input, in pixels.
        mean: ``C`` finite numbers, the per-channel mean of the training pixels in [0, 1].
        std: ``C`` finite numbers > 0, their standard deviation.
        class_names: one name per class (``K``), in the order of the logits.

    For callers written when the spec was a dict, it is also a read-only
    :class:`~collections.abc.Mapping` with those four keys, whose values are lists
    (``spec["mean"]``, ``spec.get("class_names")``, ``dict(spec)``); new code reads the
    attributes. It equals a mapping with the same lists.

    Raises:
        ValueError: an entry that is wrong, in one line (``input_spec std must be 1 finite
            numbers > 0, got [0.0]``).
    """

    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    def __post_init__(self):
        _check_spec(self.shape, self.mean, self.std, self.class_names)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        # (device, dtype) → the (1, C, 1, 1) mean and std tensors normalize uses: made once
        # per device, not copied to an accelerator at every batch.
        object.__setattr__(self, "_stats", {})

    @classmethod
    def identity(cls, shape: tuple[int, int, int], num_classes: int) -> InputSpec:
        """Mean 0, std 1 (pixels in [0, 1] are the input), classes named ``"0"`` … ``"K-1"``:
        what a freshly built model carries until training sets its data's statistics."""
        c = shape[0]
        return cls(tuple(shape), (0.0,) * c, (1.0,) * c, tuple(str(i) for i in range(num_classes)))

    @classmethod
    def from_dict(
        cls, spec: Mapping[str, Any], config: ModelConfig | Mapping[str, Any] | None = None
    ) -> InputSpec:
        """The spec of a checkpoint's ``input_spec`` dict (or of an :class:`InputSpec`).

        Args:
            spec: ``{"shape", "mean", "std", "class_names"}``; ``class_names`` may be absent
                when ``config`` is given (then ``"0"`` … ``"K-1"``).
            config: the model's config; when given, ``shape`` must be
                ``[in_channels, image_size, image_size]`` and ``class_names`` hold
                ``num_classes`` names.

        Raises:
            ValueError: not a mapping, an unknown key, or the first wrong entry.
        """
        if config is not None and not isinstance(config, ModelConfig):
            config = ModelConfig.from_dict(config)
        if not isinstance(spec, Mapping):
            raise ValueError(f"input_spec must be a mapping, got {type(spec).__name__}")
        unknown = sorted(str(k) for k in spec if k not in _SPEC_KEYS)
        if unknown:
            raise ValueError(f"input_spec has unknown keys {unknown}; it holds {list(_SPEC_KEYS)}")
        shape, mean, std, names = (spec.get(k) for k in _SPEC_KEYS)
        if config is not None:
            k = config.num_classes
            if names is None:
                names = [str(i) for i in range(k)]
            size = config.image_size
            _check_spec(
                shape,
                mean,
                std,
                names,
                expected_shape=(config.in_channels, size, size),
                num_classes=k,
            )
        return cls(shape, mean, std, names)

    def check(self, config: ModelConfig) -> None:
        """Refuse a spec that does not describe the input of the model ``config`` builds.

        Raises:
            ValueError: ``shape`` is not ``[in_channels, image_size, image_size]`` or
                ``class_names`` does not hold ``num_classes`` names.
        """
        size = config.image_size
        _check_spec(
            self.shape,
            self.mean,
            self.std,
            self.class_names,
            expected_shape=(config.in_channels, size, size),
            num_classes=config.num_classes,
        )

    def to_dict(self) -> dict[str, list]:
        """``{"shape", "mean", "std", "class_names"}`` as lists (a checkpoint's form)."""
        return {
            "shape": list(self.shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": list(self.class_names),
        }

    def normalize(self, pixels: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """Pixels → the model's input, ``x = (p − mean) / std`` per channel.

        Computed on ``pixels``' device as ``p = pixels.to(dtype)`` (then ``/ 255`` for
        ``uint8``), ``(p − mean) / std`` with ``mean``, ``std`` made in ``dtype`` from the
        spec's numbers: the same operations in the same order wherever a model's input is
        made (training batches, evaluation, served requests, the calibration batch), so the
        same pixels give the same bits.

        Args:
            pixels: ``(B, C, H, W)`` of :attr:`shape`: ``uint8`` values 0–255, or floating
                values in [0, 1].
            dtype: the result's dtype; default ``float32`` for ``uint8`` pixels, else
                ``pixels.dtype``.

        Returns:
            ``(B, C, H, W)``, ``dtype``, on ``pixels.device``.

        Raises:
            ValueError: a shape other than ``(B, *shape)``.
            TypeError: pixels neither ``uint8`` nor floating point, or a non-floating
                ``dtype``.
        """
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != self.shape:
            c, h, w = self.shape
            raise ValueError(f"pixels must be (B, {c}, {h}, {w}), got {tuple(pixels.shape)}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        if pixels.dtype == torch.uint8:
            x = pixels.to(dtype or torch.float32) / 255.0
        elif pixels.is_floating_point():
            x = pixels if dtype is None else pixels.to(dtype)
        else:
            raise TypeError(f"pixels must be uint8 (0–255) or floating (0–1), got {pixels.dtype}")
        mean, std = self._stats_on(x.device, x.dtype)
        return (x - mean) / std

    def _stats_on(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (device, dtype)
        stats = self._stats.get(key)  # type: ignore[attr-defined]
        if stats is None:
            # Made in ``dtype`` from the Python floats: rounding a float32 copy up to
            # float64 would not give the float64 of the spec's number.
            stats = tuple(
                torch.tensor(v, device=device, dtype=dtype).view(1, -1, 1, 1)
                for v in (self.mean, self.std)
            )
            self._stats[key] = stats  # type: ignore[attr-defined]
        return stats

    # ---- compatibility: the spec as the dict it was ---------------------------------------
    def __getitem__(self, key: str) -> list:
        if key not in _SPEC_KEYS:
            raise KeyError(key)
        return list(getattr(self, key))

    def __iter__(self) -> Iterator[str]:
        return iter(_SPEC_KEYS)

    def __len__(self) -> int:
        return len(_SPEC_KEYS)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, InputSpec):
            return (self.shape, self.mean, self.std, self.class_names) == (
                other.shape,
                other.mean,
                other.std,
                other.class_names,
            )
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.shape, self.mean, self.std, self.class_names))


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ArchitectureParts",
    "InputSpec",
    "ModelConfig",
    "get_architecture",
    "normalize_config",
    "register_architecture",
]
