"""The rules every ``mondeq train`` option obeys, whether it comes from a flag, a config file
or a resumed run's ``last.pt``.

A value is honoured as given or refused with one line naming where it came from; it is never
replaced by a default. ``None`` means "not given" (the preset's value) and is only accepted
where the option has such a default. Checks here need no data; the ones that do (batch size
against the training split, ``--eval-limit`` against the test split) run in
:func:`training.setup.resolve` before any file is written. :class:`TrainOptions` holds a
run's checked options; ``last.pt`` stores them, so ``--resume`` needs nothing else.

Config files (:func:`read_config`):

* TOML, or YAML read with the YAML 1.2 number syntax, so ``lr: 1e-3`` is the number 0.001
  (PyYAML's YAML 1.1 rules read it as the string ``"1e-3"``) and ``epochs: 1:30`` a string,
  not 90 in base 60 (``010`` is 10, not octal 8);
* a key given twice (``lr: 1e-3`` … ``lr: 5``, or ``batch-size`` and ``batch_size``), or a key
  with no value (``epochs:``), is refused rather than one of them winning silently;
* a quoted number (``epochs: "2"``, ``lr: "1e-3"``) stays a string and is refused, as are
  ``"false"`` for a boolean and ``2.0`` or ``true`` for an integer;
* an unknown key is refused, with the nearest known key as a suggestion.
"""

from __future__ import annotations

import difflib
import math
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# Seeds reach torch.manual_seed, DistributedSampler (seed + epoch) and the augmentation
# generator; 32 bits is the range every one of them takes without wrapping.
MAX_SEED = 2**32 - 1


class OptionError(ValueError):
    """An option value that is refused; the message names the option and the value."""


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, list | tuple | dict):
        return f"a {type(value).__name__} ({value!r})"
    return repr(value)


class _Refused(Exception):
    """Raised by a check with what the value must be."""


def _integer(value: Any, lo: int, hi: int | None = None) -> int:
    # bool is an int subclass, and 2.0 or "2" are not integers as written.
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < lo
        or (hi is not None and value > hi)
    ):
        raise _Refused(f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}")
    return value


def _positive_float(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise _Refused("a finite number > 0")
    return float(value)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Refused("a non-empty string")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Refused("true or false (a boolean, unquoted)")
    return value


def _device(value: Any) -> str:
    import torch

    if value == "auto":
        return value
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise _Refused("auto, cpu, cuda or cuda:N") from None
    # torch names more device types (meta, mps, xla, ...) than this package trains on; they
    # would fail mid-run with a traceback.
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index is not None):
        raise _Refused("auto, cpu, cuda or cuda:N")
    return value


def _preset(value: Any) -> str:
    from .presets import PRESETS

    if isinstance(value, str) and value in PRESETS:
        return value
    near = difflib.get_close_matches(value, PRESETS, n=1) if isinstance(value, str) else []
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise _Refused(f"one of {', '.join(PRESETS)}{hint}")


def _dataset(value: Any) -> str:
    from .data import DATASETS, DataError, canonical_name

    try:
        canonical_name(_text(value))
    except (DataError, _Refused):
        raise _Refused(f"one of {', '.join([*DATASETS, 'synthetic'])}") from None
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Refused("a string")
    return value


# name -> (check, may be None). A check returns the value (ints become floats for float
# options) or raises _Refused saying what the value must be.
RULES: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "preset": (_preset, False),
    "out": (_text, False),
    "epochs": (lambda v: _integer(v, 1), True),
    "batch_size": (lambda v: _integer(v, 1), True),
    "lr": (_positive_float, True),
    "seed": (lambda v: _integer(v, 0, MAX_SEED), False),
    "device": (_device, False),
    "data_dir": (_text, True),
    "download": (_boolean, False),
    "dataset": (_dataset, True),
    "synthetic_size": (lambda v: _integer(v, 1), False),
    "steps_per_epoch": (lambda v: _integer(v, 1), True),
    "eval_limit": (lambda v: _integer(v, 1), True),
    "tune_alpha": (_boolean, False),
    "progress": (_boolean, False),
    "command": (_string, False),
}

# What a config file may set: every option but the recorded command line.
CONFIG_KEYS = sorted(set(RULES) - {"command"})


def flag(name: str) -> str:
    """The command-line spelling of option ``name``: ``batch_size`` → ``--batch-size``."""
    return "--" + name.replace("_", "-")


def check_options(options: dict, label: Callable[[str], str] = flag) -> dict:
    """Check every entry of ``options`` against :data:`RULES`.

    Args:
        options: option name (underscores) → value.
        label: how to name an option in a message (default: its flag).

    Returns:
        The options, with integers given for float options turned into floats.

    Raises:
        OptionError: the first unknown name or refused value, in one line.
    """
    out = {}
    for name, value in options.items():
        if name not in RULES:
            raise OptionError(_unknown(name, RULES, label(name)))
        check, nullable = RULES[name]
        if value is None and nullable:
            out[name] = None
            continue
        try:
            out[name] = check(value)
        except _Refused as e:
            quoted = isinstance(value, str) and _QUOTED_SCALAR.match(value.strip()) is not None
            hint = " (a quoted value is a string: remove the quotes)" if quoted else ""
            raise OptionError(f"{label(name)} must be {e}, got {_describe(value)}{hint}") from None
    return out


@dataclass
class TrainOptions:
    """Everything a run depends on; stored in ``last.pt`` so ``--resume`` needs nothing else.

    ``None`` is "not given": the preset's value. Every construction is checked against
    :data:`RULES` (:class:`OptionError` on a refused value).
    """

    preset: str
    out: str
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    download: bool = False
    dataset: str | None = None  # override the preset's, e.g. "synthetic"
    synthetic_size: int = 2048
    steps_per_epoch: int | None = None  # cap, for smoke tests
    eval_limit: int | None = None  # evaluate on the first N test samples only
    tune_alpha: bool = True
    progress: bool = True
    command: str = ""

    def __post_init__(self):
        # Every construction path is checked; from_dict names the source of a bad value.
        checked = check_options({f.name: getattr(self, f.name) for f in fields(self)})
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, d: dict, label=flag) -> TrainOptions:
        """Options from ``d``; ``label(name)`` names an option in an error message.

        Raises:
            OptionError: an unknown name or a refused value.
        """
        return cls(**check_options(d, label))


def command_line() -> str:
    """This process's command line as ``mondeq ...``, recorded in the run's checkpoints."""
    return shlex.join(["mondeq", *sys.argv[1:]]) if sys.argv else ""


def _unknown(name: str, known, where: str) -> str:
    near = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"{where}: unknown option{hint}; known: {', '.join(sorted(known))}"


# Strings a config file most likely meant as a number or a boolean.
_QUOTED_SCALAR = re.compile(
    r"^(?:[-+]?[0-9.][0-9_.]*(?:[eE][-+]?[0-9]+)?|true|false|yes|no)$", re.I
)

# YAML 1.2's float syntax (PyYAML implements YAML 1.1, whose floats need a dot: ``1e-3``
# there is a string). Integers keep YAML 1.1's resolver, which matches first.
_YAML12_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


# YAML 1.2's integers (decimal, 0o octal, 0x hex; underscores kept as digit separators).
# YAML 1.1's would read `epochs: 1:30` as 90 (base 60), `010` as 8 and `0b11` as 3, and its
# floats `lr: 1:30.5` as 90.5.
_YAML12_INT = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$")


def _yaml_int(loader, node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    for prefix, base in (("0o", 8), ("0x", 16)):
        if text.startswith(prefix):
            return int(text[2:], base)
    return int(text, 10)


def _yaml_loader():
    import yaml

    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            # YAML requires unique keys; PyYAML keeps the last one, so `lr: 1e-3` followed
            # by `lr: 5` would silently train at 5. (Keys merged in with `<<` may be
            # overridden: that is what the merge key is for.)
            seen = set()
            for key, _ in node.value if isinstance(node, yaml.MappingNode) else ():
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None,
                            None,
                            f"duplicate key {key.value!r} (line {key.start_mark.line + 1})",
                        )
                    seen.add(key.value)
            return super().construct_mapping(node, deep)

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (int_tag, float_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(int_tag, _YAML12_INT, list("-+0123456789"))
    Loader.add_implicit_resolver(float_tag, _YAML12_FLOAT, list("-+0123456789."))
    Loader.add_constructor(int_tag, _yaml_int)
    return Loader


def read_config(path: Path) -> dict:
    """Options from a TOML (``.toml``) or YAML file, keys with dashes or underscores.

    Raises:
        OptionError: unreadable or unparsable file, not a mapping, an unknown key or a
            refused value (see :func:`check_options`), naming the file and the key.
    """
    try:
        text = path.read_text()
    except OSError as e:
        raise OptionError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise OptionError(f"config {path} is not UTF-8 text") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.load(text, Loader=_yaml_loader()) or {}  # a SafeLoader subclass
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OptionError(f"config {path} does not parse: {first}") from None
    if not isinstance(raw, dict):
        raise OptionError(f"config {path} must be a mapping of options")
    options, spelt = {}, {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in CONFIG_KEYS:
            raise OptionError(_unknown(name, CONFIG_KEYS, f"config {path}: {key!r}"))
        if name in options:
            raise OptionError(f"config {path}: {spelt[name]!r} and {key!r} set the same option")
        if value is None:  # `epochs:` with nothing after it; a default would pass unnoticed
            raise OptionError(f"{name} in {path} has no value; give one or remove the key")
        options[name], spelt[name] = value, key
    return check_options(options, lambda name: f"{name} in {path}")


def check_consistent(options: dict, label: Callable[[str], str] = flag) -> None:
    """Options of a new run that contradict each other (no data needed).

    Raises:
        OptionError: ``synthetic_size`` without the synthetic dataset, or ``data_dir`` /
            ``download`` with it (both would be silently ignored).
    """
    from .data import canonical_name
    from .presets import get_preset

    dataset = options.get("dataset")
    dataset = get_preset(options["preset"]).dataset if dataset is None else dataset
    synthetic = canonical_name(dataset) == "synthetic"
    if "synthetic_size" in options and not synthetic:
        raise OptionError(
            f"{label('synthetic_size')} applies only to --dataset synthetic (dataset: {dataset})"
        )
    for name in ("data_dir", "download"):
        if synthetic and options.get(name):
            raise OptionError(f"{label(name)} does not apply to --dataset synthetic")
