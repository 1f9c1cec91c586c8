"""Training presets: the paper's nine models (docs/math.md §8) plus offline Fashion-MNIST ones.

A preset is a dataset, a model config for :func:`model_core.build_model` (``in_channels``,
``image_size`` and ``num_classes`` come from the dataset) and the optimisation recipe.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from model_core import SolverSettings

# The paper's common setup, which SolverSettings' defaults are: PR, α 1 (tuned during
# training), tol 1e-2, max_iter 300; with m = 1.
PAPER_SOLVER = {k: getattr(SolverSettings(), k) for k in ("method", "alpha", "tol", "max_iter")}


@dataclass(frozen=True)
class Schedule:
    """Learning-rate (and Adam β1) schedule as a function of fractional epoch.

    ``kind="step"``: ``lr · gamma^floor(epoch / step_epochs)``.
    ``kind="milestones"``: ×``gamma`` at each fraction of the run in ``milestones``, so a
    shortened run (``--epochs 2``) still ends annealed.
    ``kind="onecycle"``: linear warm-up from ``lr / div`` to ``lr`` over ``pct`` of training,
    then linear decay to ``lr / final_div``; β1 runs the other way between ``beta1_max`` and
    ``beta1_min`` (0.95 → 0.85 → 0.95), as the paper does for its large models.
    """

    kind: str = "step"
    step_epochs: int = 10
    gamma: float = 0.1
    pct: float = 0.3
    div: float = 25.0
    final_div: float = 1e4
    beta1_max: float = 0.95
    beta1_min: float = 0.85
    milestones: tuple[float, ...] = (0.5, 0.75)

    def at(self, lr: float, epoch: float, epochs: int) -> tuple[float, float | None]:
        """``(lr, β1)`` at fractional ``epoch`` of ``epochs``; β1 is None for step schedules."""
        if self.kind == "step":
            return lr * self.gamma ** math.floor(epoch / self.step_epochs), None
        if self.kind == "milestones":
            passed = sum(epoch >= f * epochs for f in self.milestones)
            return lr * self.gamma**passed, None
        if self.kind != "onecycle":
            raise ValueError(f"unknown schedule {self.kind!r} (step, milestones or onecycle)")
        t = min(max(epoch / epochs, 0.0), 1.0)
        lo, hi = lr / self.div, lr
        if t < self.pct:
            s = t / self.pct
            return lo + (hi - lo) * s, self.beta1_max - (self.beta1_max - self.beta1_min) * s
        s = (t - self.pct) / (1.0 - self.pct)
        end = lr / self.final_div
        return hi - (hi - end) * s, self.beta1_min + (self.beta1_max - self.beta1_min) * s

    def describe(self, lr: float) -> str:
        if self.kind == "step":
            return f"{lr:g}, ×{self.gamma:g} every {self.step_epochs} ep"
        if self.kind == "milestones":
            at = "/".join(f"{100 * f:g}" for f in self.milestones)
            return f"{lr:g}, ×{self.gamma:g} at {at}% of the run"
        return f"one-cycle, peak {lr:g}, β1 {self.beta1_max:g}→{self.beta1_min:g}"


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str
    model: dict  # build_model config without in_channels / image_size / num_classes
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    schedule: Schedule = field(default_factory=Schedule)
    augment: bool = False
    description: str = ""

    def model_config(self, in_shape: tuple[int, int, int], num_classes: int) -> dict:
        c, h, w = in_shape
        if h != w:
            raise ValueError(f"square images only, got {h}×{w}")
        return {
            **self.model,
            "in_channels": c,
            "image_size": h,
            "num_classes": num_classes,
            "solver": dict(self.model.get("solver", PAPER_SOLVER)),
        }

    def to_dict(self) -> dict:
        return asdict(self)


def _fc(hidden: int) -> dict:
    return {"arch": "fc", "hidden": hidden, "m": 1.0, "solver": PAPER_SOLVER}


def _conv(channels: int) -> dict:
    return {"arch": "conv", "channels": channels, "m": 1.0, "solver": PAPER_SOLVER}


def _tiers(*channels: int) -> dict:
    return {"arch": "multi_tier", "channels": list(channels), "m": 1.0, "solver": PAPER_SOLVER}


STEP10 = Schedule("step", step_epochs=10)
STEP25 = Schedule("step", step_epochs=25)
ONECYCLE = Schedule("onecycle")
SHORT_ONECYCLE = Schedule("onecycle", pct=0.25, final_div=100.0)  # reaches 87% in 2 epochs

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        # The paper, Table 1 / Appendix E.
        Preset("mnist-fc", "mnist", _fc(87), schedule=STEP10, description="paper: 98.1%"),
        Preset("mnist-conv", "mnist", _conv(54), schedule=STEP10, description="paper: 99.1%"),
        Preset(
            "mnist-multitier", "mnist", _tiers(16, 32, 32), schedule=STEP10,
            description="paper: 99.0%",
        ),
        Preset("svhn-conv", "svhn", _conv(81), schedule=STEP25, description="paper: 88.7%"),
        Preset(
            "svhn-multitier", "svhn", _tiers(16, 32, 60), schedule=STEP10,
            description="paper: 92.4%",
        ),
        Preset("cifar-conv", "cifar10", _conv(81), schedule=STEP25, description="paper: 74.0%"),
        Preset(
            "cifar-multitier", "cifar10", _tiers(16, 32, 60), lr=1e-2, schedule=STEP10,
            description="paper: 72.0%",
        ),
        Preset(
            "cifar-conv-lg", "cifar10", _conv(200), epochs=65, lr=1e-2, schedule=ONECYCLE,
            augment=True, description="paper: 82.0%",
        ),
        Preset(
            "cifar-multitier-lg", "cifar10", _tiers(64, 128, 128), epochs=65, lr=5e-2,
            schedule=ONECYCLE, augment=True, description="paper: 89.0%",
        ),
        # Fashion-MNIST, offline from Debian's dataset-fashion-mnist: the embedded defaults.
        Preset(
            "fmnist-fc", "fashion-mnist", _fc(87), epochs=20, lr=3e-3, schedule=SHORT_ONECYCLE,
            description="FC 87 as on MNIST, one-cycle",
        ),
        Preset(
            "fmnist-conv", "fashion-mnist", _conv(32), epochs=20, lr=3e-3, schedule=SHORT_ONECYCLE,
            description="single conv, 32 ch: < 5 min/epoch on 2 CPU cores",
        ),
        Preset(
            "fmnist-multitier", "fashion-mnist", _tiers(16, 32, 32), epochs=20, lr=3e-3,
            schedule=SHORT_ONECYCLE, description="multi-tier as on MNIST, one-cycle",
        ),
    ]
}  # fmt: skip


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
