"""monDEQ classifiers with the paper's heads, built from a plain config dict.

§N refers to docs/math.md.

Config keys (``build_model``):

``arch``          ``"fc" | "conv" | "multi_tier"``
``in_channels``   image channels (1 for MNIST, 3 for CIFAR/SVHN)
``image_size``    image height = width, before the one-pixel pad of conv models
``hidden``        fc only: hidden width
``channels``      conv: int; multi_tier: list of tier widths
``num_classes``   classes (default 10)
``m``             monotonicity parameter (default 1.0, as in the paper)
``solver``        ``{method, alpha, tol, max_iter}`` plus optional ``backward_*`` (§2, §3)

Heads (Appendix E / the reference code): FC reads ``z`` directly; single conv average-pools
``z`` by 4 (34 → 8×8 on CIFAR, 30 → 7×7 on MNIST); multi-tier reads the whole last tier.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .equilibrium import EquilibriumLayer, SolverSettings
from .nonlinearity import BorderReLU, ReLU
from .operators import FCOperator, MultiTierOperator
from .solvers import SolveStats

ARCHS = ("fc", "conv", "multi_tier")
POOL = 4  # the single-conv head's average-pool size
# A certified radius needs a residual within this, however loose the call's tol (§7): the
# paper's training tolerance, which every default model is served at.
CERTIFY_TOL = 1e-2


@dataclass
class InferenceResult:
    """What :meth:`MonDEQClassifier.infer` returns.

    Attributes:
        logits: ``(B, num_classes)``.
        stats: per-sample forward :class:`SolveStats`.
        certified_radius: ``(B,)``, ℓ2 radius (in the model's normalised input units) within
            which no perturbation can change the predicted class (§7). NaN where the solve
            did not reach the equilibrium (:meth:`MonDEQClassifier.certifiable` false: not
            converged, or converged only to a ``tol`` looser than ``CERTIFY_TOL``): the bound
            holds only at the equilibrium, and the logits of a point far from it are not its
            logits.
        lipschitz: the bound ``L`` used for the radius.
    """

    logits: Tensor
    stats: SolveStats
    certified_radius: Tensor
    lipschitz: float

    @property
    def labels(self) -> Tensor:
        return self.logits.argmax(dim=1)


def normalize_config(config: dict) -> dict:
    """Validate a model config and fill defaults. Raises ``ValueError`` saying what is wrong."""
    if not isinstance(config, dict):
        raise ValueError(f"model config must be a dict, got {type(config).__name__}")
    cfg = dict(config)
    arch = cfg.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"config 'arch' must be one of {list(ARCHS)}, got {arch!r}")
    for key in ("in_channels", "image_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"config {key!r} must be a positive int, got {cfg.get(key)!r}")
    cfg.setdefault("num_classes", 10)
    cfg["m"] = float(cfg.get("m", 1.0))
    if arch == "fc":
        if not isinstance(cfg.get("hidden"), int) or cfg["hidden"] < 1:
            raise ValueError(f"fc config needs a positive int 'hidden', got {cfg.get('hidden')!r}")
    elif arch == "conv":
        if not isinstance(cfg.get("channels"), int) or cfg["channels"] < 1:
            raise ValueError(
                f"conv config needs a positive int 'channels', got {cfg.get('channels')!r}"
            )
    else:
        ch = cfg.get("channels")
        if (
            not isinstance(ch, list | tuple)
            or len(ch) < 2
            or not all(isinstance(c, int) for c in ch)
        ):
            raise ValueError(
                f"multi_tier config needs 'channels' as a list of >= 2 ints, got {ch!r}"
            )
        cfg["channels"] = [int(c) for c in ch]
    cfg["solver"] = SolverSettings.from_dict(cfg.get("solver")).to_dict()
    return cfg


class MonDEQClassifier(nn.Module):
    """An equilibrium layer plus a linear head.

    ``forward(x)`` takes normalised ``(B, C, H, W)`` images and returns ``(B, K)`` logits; it
    trains through the implicit backward pass. ``infer(x)`` solves without autograd and
    returns logits, per-sample solver stats and certified radii.

    Attributes:
        config: the normalised config (enough to rebuild the model).
        deq: the :class:`EquilibriumLayer`.
        solver_settings: its :class:`SolverSettings` (read and assign here, not on ``deq``).
        head: ``nn.Linear`` on the pooled / flattened equilibrium.
        input_spec: ``{"shape", "mean", "std", "class_names"}`` of the expected input.
    """

    def __init__(self, config: dict):
        super().__init__()
        cfg = normalize_config(config)
        self.config = cfg
        arch, m = cfg["arch"], cfg["m"]
        c, size, k = cfg["in_channels"], cfg["image_size"], cfg["num_classes"]
        if arch == "fc":
            op = FCOperator(c * size * size, cfg["hidden"], m=m)
            nonlin = ReLU()
            features = cfg["hidden"]
        else:
            channels = [cfg["channels"]] if arch == "conv" else cfg["channels"]
            op = MultiTierOperator(c, channels, size, m=m)
            nonlin = BorderReLU(op.border_mask())
            s = op.sizes[-1]
            features = channels[-1] * ((s // POOL) ** 2 if arch == "conv" else s * s)
        self.deq = EquilibriumLayer(op, nonlin, SolverSettings.from_dict(cfg["solver"]))
        self.head = nn.Linear(features, k)
        self.metadata: dict = {}
        self.input_spec = {
            "shape": [c, size, size],
            "mean": [0.0] * c,
            "std": [1.0] * c,
            "class_names": [str(i) for i in range(k)],
        }

    @property
    def op(self):
        return self.deq.op

    @property
    def arch(self) -> str:
        return self.config["arch"]

    @property
    def solver_settings(self) -> SolverSettings:
        """The solver defaults of :meth:`forward` and :meth:`infer` (frozen). Assigning
        new settings changes them, and the config a checkpoint stores, together."""
        return self.deq.settings

    @solver_settings.setter
    def solver_settings(self, settings: SolverSettings) -> None:
        if not isinstance(settings, SolverSettings):
            raise TypeError(f"solver_settings must be SolverSettings, got {type(settings)}")
        self.deq.settings = settings
        self.config["solver"] = settings.to_dict()

    def set_solver(self, **changes) -> None:
        """Change solver defaults (``method``, ``alpha``, ``tol``, ``max_iter``, ``backward_*``).

        Raises:
            ValueError: an unknown field or a bad value (the settings stay as they were).
        """
        self.solver_settings = self.solver_settings.replace(**changes)

    def solver_alpha(self, backward: bool = False) -> float:
        """The α the forward (``backward``: the backward) solve takes by default: the
        settings' α, else its method's safe α for the current weights."""
        s = self.solver_settings.backward() if backward else self.solver_settings
        return self.deq.resolve_alpha(s.method, s.alpha)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def features(self, z: Tensor) -> Tensor:
        """Equilibrium ``(B, *z_shape)`` → head input ``(B, D)``."""
        if self.arch == "fc":
            return z
        if self.arch == "conv":
            return F.avg_pool2d(z, POOL).flatten(1)
        return self.op.split(z)[-1].flatten(1)

    def pool_norm(self) -> float:
        """ℓ2 operator norm of :meth:`features` (average-pooling by 4 has norm 1/4)."""
        return 1.0 / POOL if self.arch == "conv" else 1.0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(self.deq(x)))

    @torch.no_grad()
    def infer(
        self,
        x: Tensor,
        *,
        method: str | None = None,
        alpha: float | None = None,
        tol: float | None = None,
        max_iter: int | None = None,
        between: Callable[[], None] | None = None,
    ) -> InferenceResult:
        """Classify normalised ``(B, C, H, W)`` input without autograd.

        Runs on the module's device (``x`` is moved there). Solver arguments override the
        model's defaults for this call only; ``between`` is called once per solver
        iteration (a scheduler's hook, see :func:`~model_core.solvers.iterate`). A sample
        is ``converged`` when its true fixed-point residual is at most ``tol``
        (:func:`~model_core.solvers.solve_forward`); only converged samples get a certified
        radius (NaN otherwise).
        """
        device = next(self.parameters()).device
        dtype = next(self.parameters()).dtype
        x = x.to(device=device, dtype=dtype)
        with self.op.fixed_weights():  # one check of the weight caches for the whole call
            z, stats = self.deq.solve(
                x, method=method, alpha=alpha, tol=tol, max_iter=max_iter, between=between
            )
            logits = self.head(self.features(z))
            radius = self.certified_radius(logits)
            lip = self.lipschitz_bound()
        return InferenceResult(
            logits=logits,
            stats=stats,
            certified_radius=radius.masked_fill(
                ~self.certifiable(stats).to(radius.device), math.nan
            ),
            lipschitz=lip,
        )

    @staticmethod
    def certifiable(stats: SolveStats) -> Tensor:
        """``(B,)`` bool: the samples whose solve ended close enough to the equilibrium for a
        certified radius (§7), the radius being a statement about ``z*``.

        A sample qualifies when its true fixed-point residual is at most
        ``min(stats.tol, CERTIFY_TOL)``: converged, and converged to at least the paper's
        training tolerance, whatever looser ``tol`` a call asked for (at ``tol = 1``, 30 of
        100 fmnist-conv test images stop on another label than the equilibrium's).
        """
        return stats.converged & (stats.residual <= min(stats.tol, CERTIFY_TOL))

    def lipschitz_bound(self) -> float:
        """``L = ‖W_out‖₂ · ‖pool‖ · ‖U‖₂ / m``: the logits are L-Lipschitz in ℓ2 (§7).

        ``‖U‖₂`` is exact for circular convolutions (largest singular value over all
        frequency blocks).
        """
        with torch.no_grad():
            w_out = torch.linalg.matrix_norm(self.head.weight, ord=2).item()
        return w_out * self.pool_norm() * self.op.injection_norm() / self.op.m

    def certified_radius(self, logits: Tensor) -> Tensor:
        """Per-sample certified ℓ2 radius, ``min_j (l_y − l_j) / (‖w_y − w_j‖ · L_z)`` (§7).

        ``L_z = ‖pool‖ ‖U‖₂ / m`` is the Lipschitz constant of ``x ↦ pool(z*)``; using
        ``‖w_y − w_j‖`` per rival class is tighter than ``2 ‖W_out‖₂``. The bound holds for
        the logits of the equilibrium ``z*`` only: :meth:`infer` withholds it (NaN) for
        samples whose solve did not converge.

        Args:
            logits: ``(B, K)``.

        Returns:
            ``(B,)``, 0 where the top two logits tie.
        """
        with torch.no_grad():
            lz = self.pool_norm() * self.op.injection_norm() / self.op.m
            w = self.head.weight  # (K, D)
            pred = logits.argmax(dim=1)
            margins = logits.gather(1, pred[:, None]) - logits  # (B, K)
            diff_norm = torch.cdist(w, w)[pred]  # (B, K): ‖w_y − w_j‖
            ratio = margins / (diff_norm * lz).clamp_min(torch.finfo(logits.dtype).tiny)
            ratio.scatter_(1, pred[:, None], math.inf)
            return ratio.min(dim=1).values.clamp_min(0.0)


def build_model(config: dict) -> MonDEQClassifier:
    """Build a classifier from a config dict (see the module docstring for the keys)."""
    return MonDEQClassifier(config)
