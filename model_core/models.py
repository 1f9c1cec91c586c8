"""monDEQ classifiers with the paper's heads, built from a :class:`ModelConfig` or its dict.

§N refers to docs/math.md.

Config keys (``build_model``; :class:`~model_core.config.ModelConfig` documents each):

``arch``          a registered architecture: ``"fc" | "conv" | "multi_tier"``
``in_channels``   image channels (1 for MNIST, 3 for CIFAR/SVHN)
``image_size``    image height = width, before the one-pixel pad of conv models
``hidden``        fc only: hidden width
``channels``      conv: int; multi_tier: list of tier widths
``num_classes``   classes (default 10)
``m``             monotonicity parameter (default 1.0, as in the paper)
``solver``        ``{method, alpha, tol, max_iter}`` plus optional ``backward_*`` (§2, §3)

Heads (Appendix E / the reference code): FC reads ``z`` directly; single conv average-pools
``z`` by 4 (34 → 8×8 on CIFAR, 30 → 7×7 on MNIST); multi-tier reads the whole last tier.
Each is a :func:`~model_core.config.register_architecture` call at the end of this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bounds import (
    cast_above,
    equilibrium_error_bound,
    head_rounding,
    logit_error_bounds,
    pairwise_distances,
    proven_labels,
    rival_slack,
    rounding_error,
)
from .config import (
    ArchitectureParts,
    InputSpec,
    ModelConfig,
    get_architecture,
    is_positive_int,
    normalize_config,
    register_architecture,
)
from .equilibrium import EquilibriumLayer, SolverSettings
from .nonlinearity import BorderReLU, ReLU
from .operators import FCOperator, MonotoneOperator, MultiTierOperator, tier_sizes
from .operators.base import same_values, spectral_norm_above
from .solvers import SYNC_EVERY, SolveStats, relative_residual

POOL = 4  # the single-conv head's average-pool size
# When a sample stops iterating (MonDEQClassifier.infer): the residual rule of §2, or the
# proofs of §9 (label proven; every logit within an absolute accuracy).
STOP_RULES = ("tol", "label", "logits")
# A float32 answer left unconverged or unproven is certified again in float64 at the same
# point (MonDEQClassifier.infer) when the rounding term ρ is at least this share of its
# residual or of its error bound: there the float32 certificate says more about rounding
# than about the point, and float64's ρ is 2^29 times smaller.
FLOAT64_SHARE = 0.25


@dataclass
class InferenceResult:
    """What :meth:`MonDEQClassifier.infer` returns.

    Attributes:
        logits: ``(B, num_classes)``.
        stats: per-sample forward :class:`SolveStats`.
        certified_radius: ``(B,)``, ℓ2 radius (in the model's normalised input units) within
            which no perturbation can change the exact equilibrium's class (§7, §9): the
            margins it divides are the returned margins less their error bound, so it holds
            at any iterate. NaN where the label is not proven (no certificate).
        lipschitz: the bound ``L`` used for the radius.
        error_bound: ``(B,)``, a rigorous upper bound on ``‖ĉ − z*‖`` (absolute ℓ2, in the
            units of ``z``) for the point ``ĉ`` the logits are read at and the exact
            equilibrium ``z*`` (§9). ``inf`` where the solve blew up.
        logit_error_bound: ``(B, K)``, per class, an upper bound on ``|l_i − l*_i|``, the
            distance of each returned logit from the exact equilibrium's (§9).
        label_proven: ``(B,)`` bool: the predicted label is provably the exact equilibrium's
            (every rival's margin exceeds its share of ``error_bound``, §9).
        certified_in_float64: ``(B,)`` bool: the sample's residual, bounds, logits and
            proof were evaluated in float64 at the solver's returned point (a float32
            model's answer that float32's rounding left unconverged or unproven, §9
            "Rounding"); its iterations are the float32 solve's.
    """

    logits: Tensor
    stats: SolveStats
    certified_radius: Tensor
    lipschitz: float
    error_bound: Tensor
    logit_error_bound: Tensor
    label_proven: Tensor
    certified_in_float64: Tensor

    @property
    def labels(self) -> Tensor:
        """``(B,)`` int64, the predicted class of each sample (argmax of :attr:`logits`)."""
        return self.logits.argmax(dim=1)


class _Certificate(NamedTuple):
    """A float64 certificate of some samples, in float32 (``MonDEQClassifier.
    _float64_certificate``): ``(R,)`` residual, error bound, proof and radius (not yet
    withheld where unproven), ``(R, K)`` logits and their bounds."""

    residual: Tensor
    logits: Tensor
    error_bound: Tensor
    logit_bound: Tensor
    proven: Tensor
    radius: Tensor


class _HeldCertificates:
    """The float64 certificates that stopped samples during one ``infer`` call's solve
    (:meth:`MonDEQClassifier._certifier`), kept for its answer.

    A certificate is a function of the sample's input, its point and the weights alone, and
    a sample that stops on its certificate is answered at that very point: the answer takes
    the kept one (:meth:`MonDEQClassifier._certify_in_float64`) rather than computing it
    again. A kept certificate serves only a point equal to its own bit for bit."""

    def __init__(self) -> None:
        # (samples (N,), points (N, *z_shape), their certificates), in the order kept
        self._kept: list[tuple[Tensor, Tensor, _Certificate]] = []

    def keep(self, samples: Tensor, points: Tensor, cert: _Certificate, met: Tensor) -> None:
        """Keep the certificates of ``samples`` (``(R,)`` indices into the caller's batch)
        at ``points`` (``(R, *z_shape)``) where ``met`` (``(R,)`` bool: the rows that stop
        on them; the others iterate on, to another point)."""
        if bool(met.any()):
            index = met.nonzero().squeeze(1)
            picked = _Certificate(*(t.index_select(0, index) for t in cert))
            self._kept.append(
                (samples.index_select(0, index), points.index_select(0, index), picked)
            )

    def take(self, samples: Tensor, points: Tensor) -> tuple[_Certificate | None, Tensor | None]:
        """``(certificate, found)`` for ``samples`` ``(R,)`` at ``points``
        ``(R, *z_shape)``: ``found`` ``(R,)`` bool marks the rows with a kept certificate at
        the same point (the latest kept for the sample), and ``certificate`` holds those
        rows' (the others' entries are unset); ``(None, None)`` where none is found."""
        if not self._kept or len(samples) == 0:
            return None, None
        size = 1 + max(int(samples.max()), *(int(kept[0].max()) for kept in self._kept))
        source = torch.full((size,), -1, dtype=torch.int64, device=samples.device)
        position = torch.full_like(source, -1)
        for i, (kept, _, _) in enumerate(self._kept):  # a later one replaces an earlier one
            source.index_fill_(0, kept, i)
            position.index_copy_(0, kept, torch.arange(len(kept), device=samples.device))
        source, position = source.index_select(0, samples), position.index_select(0, samples)
        found = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
        out: list[Tensor] | None = None
        for i, (_, kept_points, cert) in enumerate(self._kept):
            rows = (source == i).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            at = position.index_select(0, rows)
            same = _same_bits(kept_points.index_select(0, at), points.index_select(0, rows))
            rows, at = rows[same], at[same]
            if len(rows) == 0:
                continue
            if out is None:
                out = [t.new_empty((len(samples), *t.shape[1:])) for t in cert]
            for target, values in zip(out, cert, strict=True):
                target.index_copy_(0, rows, values.index_select(0, at))
            found.index_fill_(0, rows, True)
        return (None, None) if out is None else (_Certificate(*out), found)


def _same_bits(a: Tensor, b: Tensor) -> Tensor:
    """``(R,)`` bool: row ``i`` of ``a`` and of ``b`` (``(R, ...)``, float32 or float64)
    hold identical bits (a NaN equal to itself, ``-0.0`` not equal to ``0.0``)."""
    ints = torch.int32 if a.element_size() == 4 else torch.int64
    return (a.view(ints) == b.view(ints)).flatten(1).all(dim=1)


def _rounding_dominated(gap: Tensor, rho: Tensor) -> Tensor:
    """``(B,)`` bool: ``ρ ≥ FLOAT64_SHARE · (‖z − σ(p)‖ + ρ)`` (``gap`` and ``rho`` from
    :meth:`MonDEQClassifier._rounding_terms`): the residual is at least that share
    rounding (§2), and its float32 test can say little more however long the solve runs."""
    return rho >= FLOAT64_SHARE * (gap + rho)


def _above_tol(z_norm: Tensor, gap: Tensor, rho: Tensor, tol: float) -> Tensor:
    """``(B,)`` bool: the float64 certificate's residual at this float32 point is certain
    to be above ``tol`` (docs/math.md §2, "Certified again in float64"), from the float32
    residual's parts (:meth:`MonDEQClassifier._rounding_terms`).

    The exact ``p`` lies within ``ρ`` of the float32 one and σ is non-expansive, so the
    exact gap ``‖z − σ(p)‖`` is at least ``gap − ρ``, and the float64 residual, an upper
    bound on the exact one, at least ``(gap − ρ)/‖z‖``: its own rounding term cancels
    its ``p``'s. The norms' rounding is allowed ``64 eps`` relative each way, and the
    float32 ``tol`` the certificate is compared with ``2 eps``. False where ``‖z‖ = 0``
    or a part is NaN (the certificate decides)."""
    eps = torch.finfo(gap.dtype).eps
    low = (gap.double() * (1.0 - 64.0 * eps) - rho.double()) / (
        z_norm.double() * (1.0 + 64.0 * eps)
    )
    return (z_norm > 0) & (low > tol * (1.0 + 2.0 * eps))


def _ieee_float32_products(device: torch.device) -> bool:
    """Whether float32 matrix products on ``device`` round as IEEE float32 (the rounding
    model of :func:`~model_core.bounds.product_error`): always on the CPU; on CUDA unless
    TF32 is allowed for them (``torch.backends.cuda.matmul.allow_tf32``, which
    ``torch.set_float32_matmul_precision("high")`` sets), whose 10-bit products would be
    off by a thousand times more."""
    return device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32


class MonDEQClassifier(nn.Module):
    """An equilibrium layer plus a linear head.

    ``forward(x)`` takes normalised ``(B, C, H, W)`` images and returns ``(B, K)`` logits; it
    trains through the implicit backward pass. ``infer(x)`` solves without autograd and
    returns logits, per-sample solver stats and certified radii.

    Args:
        config: a :class:`~model_core.config.ModelConfig`, or its dict (``build_model``).

    Raises:
        ValueError: a wrong config (see :class:`~model_core.config.ModelConfig`).

    Attributes:
        model_config: the :class:`ModelConfig` that rebuilds this model, with its current
            ``m`` and solver settings (the model holds each once: ``op.m``, ``deq.settings``).
        config: ``model_config.to_dict()``, a fresh plain dict at each read.
        deq: the :class:`EquilibriumLayer`.
        solver_settings: its :class:`SolverSettings` (read and assign here, not on ``deq``).
        head: ``nn.Linear`` on the pooled / flattened equilibrium.
        input_spec: the :class:`~model_core.config.InputSpec` of the expected input;
            assigning a dict converts and checks it against the config (``ValueError``).
        metadata: free plain-data metadata (a loaded checkpoint's, plus ``package_version``).
        calibration: ``(N, C, H, W)`` pixels (``uint8`` 0–255 or float in [0, 1]) to tune α
            on, or ``None``; a checkpoint's optional ``calibration`` field.
        training_state: the state a run resumes from (optimizer, progress, options), or
            ``None``; a checkpoint's optional ``training_state`` field.
    """

    def __init__(self, config: ModelConfig | Mapping[str, Any]):
        super().__init__()
        cfg = ModelConfig.from_dict(config)
        parts = get_architecture(cfg.arch).build(cfg)
        self.deq = EquilibriumLayer(parts.operator, parts.nonlinearity, cfg.solver)
        self.head = nn.Linear(parts.num_features, cfg.num_classes)
        # m and the solver settings live on op and deq; _config keeps the rest.
        self._config = cfg
        self._features = parts.features
        self._features_norm = float(parts.features_norm)
        self.metadata: dict = {}
        self.calibration: Tensor | None = None
        self.training_state: dict | None = None
        c, size = cfg.in_channels, cfg.image_size
        self._input_spec = InputSpec.identity((c, size, size), cfg.num_classes)
        # (identity, copy of W_out, ‖W_out‖₂, pairwise distances): see _head_geometry
        self._head_cache: tuple | None = None
        # (operator weights key, float64 copy of the model): see _float64_copy
        self._float64: tuple | None = None

    @property
    def model_config(self) -> ModelConfig:
        """The :class:`ModelConfig` that rebuilds this model, with its current ``m`` and
        solver settings."""
        return self._config.replace(m=self.op.m, solver=self.deq.settings)

    @property
    def config(self) -> dict[str, Any]:
        """``model_config.to_dict()``: a fresh plain dict (``build_model``'s form)."""
        return self.model_config.to_dict()

    @property
    def input_spec(self) -> InputSpec:
        """The expected input: ``(C, H, W)``, normalisation and class names.

        Assign an :class:`InputSpec` or its dict; ``ValueError`` if it does not fit the
        config (shape ``[in_channels, image_size, image_size]``, ``num_classes`` names)."""
        return self._input_spec

    @input_spec.setter
    def input_spec(self, spec: InputSpec | Mapping[str, Any]) -> None:
        self._input_spec = InputSpec.from_dict(spec, self._config)

    @property
    def op(self) -> MonotoneOperator:
        """The monotone operator holding ``W``, ``U`` and ``b`` (``deq.op``, §1)."""
        return self.deq.op

    @property
    def arch(self) -> str:
        """The registered architecture's name (``"fc"``, ``"conv"``, ``"multi_tier"``, …)."""
        return self._config.arch

    @property
    def solver_settings(self) -> SolverSettings:
        """The solver defaults of :meth:`forward` and :meth:`infer` (frozen). Assigning
        new settings changes them, and the config a checkpoint stores, together."""
        return self.deq.settings

    @solver_settings.setter
    def solver_settings(self, settings: SolverSettings) -> None:
        # TypeError for anything else: a dict here would bypass SolverSettings' checks.
        if not isinstance(settings, SolverSettings):
            raise TypeError(f"solver_settings must be SolverSettings, got {type(settings)}")
        self.deq.settings = settings

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
        """The number of scalar parameters (the counts of the paper's Table E1)."""
        return sum(p.numel() for p in self.parameters())

    def features(self, z: Tensor) -> Tensor:
        """Equilibrium ``(B, *z_shape)`` → head input ``(B, D)`` (the architecture's)."""
        return self._features(self.op, z)

    def pool_norm(self) -> float:
        """ℓ2 operator norm of :meth:`features` (``‖pool‖`` in §7's eq. (13): average-pooling
        by 4 has norm 1/4, the identity and a slice 1)."""
        return self._features_norm

    def forward(self, x: Tensor) -> Tensor:
        """Normalised ``(B, C, H, W)`` input → ``(B, K)`` logits, differentiable through the
        implicit backward pass (Theorem 2, §3); solve statistics in ``deq.last_*_stats``.

        Raises:
            ValueError: the solver's errors (:func:`~model_core.solvers.solve_forward`).
        """
        self._solve_dtype("forward")
        return self.head(self.features(self.deq(x)))

    def _solve_dtype(self, caller: str) -> torch.dtype:
        """The model's dtype, float32 or float64.

        Raises:
            ValueError: any other dtype, named: the resolvents need ``torch.linalg``'s
                inverses (none in half precision) and the rounding terms of §9 assume at
                least float32's 24 bits.
        """
        dtype = next(self.parameters()).dtype
        if dtype not in (torch.float32, torch.float64):
            name = str(dtype).removeprefix("torch.")
            raise ValueError(
                f"MonDEQClassifier.{caller}: the model is {name}; monDEQ solves run in "
                "float32 or float64 (call model.float() or model.double())"
            )
        return dtype

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
        stop: str = "tol",
        logit_tol: float | None = None,
        check_every: int = 1,
        loop: str | None = None,
        sync_every: int = SYNC_EVERY,
    ) -> InferenceResult:
        """Classify normalised ``(B, C, H, W)`` input without autograd.

        Runs on the module's device (``x`` is moved there). Solver arguments override the
        model's defaults for this call only; ``between`` is called once per solver
        iteration (a scheduler's hook, see :func:`~model_core.solvers.iterate`).

        The answer is read at ``ĉ = ẑ − W r / 2m`` (``ẑ = σ(W z + U x + b)`` of the
        solver's last point ``z``, ``r = z − ẑ``), the centre of the ball that holds the
        exact equilibrium (§9), and every sample carries a rigorous bound on its distance
        to the exact equilibrium, its logits' error bounds and whether its label is proven.
        A sample is ``converged`` when its true fixed-point residual is at most ``tol``,
        whatever stopped it.

        In float32 the residual and the bound carry the rounding of ``p`` (§2, §9), a floor
        of about 1e-4 of ``‖z‖`` on the default models. So a float32 sample is certified
        again with float64 arithmetic at its point (a float64 copy of the weights, exact:
        ``p = W z + U x + b``, residual, centre, bound, logits and proof;
        ``certified_in_float64``, :meth:`_float64_certificate`): during the solve, at
        iterations 8, 16, 32, … (in checks), where its residual is at least
        :data:`FLOAT64_SHARE` rounding, stopping it once that meets the rule; and at the
        answer, where it ends unproven or short of its rule with its residual or bound that
        much rounding (a sample its certificate stopped reports that one). On the default
        models this proves every near tie that float32 could not, by iteration 32, and
        converges every answer at ``tol`` 1e-4 (docs/math.md §2).

        Args:
            x: ``(B, C, H, W)`` normalised input.
            method, alpha, tol, max_iter: solver overrides for this call.
            between: a scheduler's hook, called once per iteration.
            stop: when a sample stops iterating: ``"tol"`` (residual ≤ ``tol``, §2),
                ``"label"`` (its label is proven, §9) or ``"logits"`` (every logit within
                ``logit_tol`` of the exact equilibrium's, §9); ``max_iter`` caps all three.
            logit_tol: the absolute logit accuracy of ``stop="logits"`` (> 0).
            check_every: with ``"label"``/``"logits"``, iterations between two checks
                (each check costs one multiply by ``W`` and the head).
            loop: the solver loop (:data:`~model_core.solvers.LOOPS`); ``None``: the
                device's (:func:`~model_core.solvers.default_loop`: the masked loop without a
                host sync inside the iteration on a GPU, the compacting loop on the CPU;
                ``"graphed"`` adds CUDA graphs, opt-in).
                Answers are the same under every loop.
            sync_every: the masked loops' iterations between two host syncs.

        Returns:
            :class:`InferenceResult`.

        Raises:
            ValueError: an unknown ``stop``, ``logit_tol`` missing or not > 0 with
                ``stop="logits"`` (or given with another rule), ``check_every < 1``, and the
                solver's errors (:func:`~model_core.solvers.solve_forward`).
        """
        accept = self._stopping_rule(stop, logit_tol)
        device = next(self.parameters()).device
        dtype = self._solve_dtype("infer")
        x = x.to(device=device, dtype=dtype)
        certify = None
        held = _HeldCertificates()
        if dtype == torch.float32:
            rule_tol = self.solver_settings.tol if tol is None else tol
            certify = self._certifier(x, stop, logit_tol, rule_tol, held)
        with self.op.fixed_weights():  # one check of the weight caches for the whole call
            z, stats, pre = self.deq.solve(
                x,
                method=method,
                alpha=alpha,
                tol=tol,
                max_iter=max_iter,
                between=between,
                accept=accept,
                check_every=check_every,
                loop=loop,
                sync_every=sync_every,
                certify=certify,
            )
            centre, bound = equilibrium_error_bound(
                self.op, self.deq.nonlin, z, pre, stats.pre_scale
            )
            logits, rounding = self._logits_and_rounding(centre)
            w, pool = self.head.weight, self.pool_norm()
            distances = self._head_geometry()[1]
            slack = rival_slack(logits, w, pool, bound, distances, rounding)
            proven = proven_labels(logits, w, pool, bound, slack)
            radius = self.certified_radius(logits, slack)
            lip = self.lipschitz_bound()
            result = InferenceResult(
                logits=logits,
                stats=stats,
                certified_radius=radius.masked_fill(~proven, math.nan),
                lipschitz=lip,
                error_bound=bound,
                logit_error_bound=logit_error_bounds(w, pool, bound, rounding),
                label_proven=proven,
                certified_in_float64=torch.zeros_like(proven),
            )
            if dtype == torch.float32:
                rows = self._rounding_bound(result, z, pre, stop, logit_tol)
                if bool(rows.any()):  # (one host read per call, after the solve)
                    self._certify_in_float64(result, x, z, rows.nonzero().squeeze(1), held)
        return result

    def _rounding_bound(
        self, result: InferenceResult, z: Tensor, pre: Tensor, stop: str, logit_tol: float | None
    ) -> Tensor:
        """``(B,)`` bool: the float32 answers that float32's rounding leaves undecided.

        Unproven, or unconverged (``"tol"``) or above ``logit_tol`` (``"logits"``); finite;
        and with the rounding term ``ρ`` (:func:`~model_core.bounds.rounding_error`) at
        least :data:`FLOAT64_SHARE` of the residual (:func:`_rounding_dominated`) or of the
        error bound, or an unproven label that the error bound less its rounding term
        (and the head's) would prove."""
        stats = result.stats
        _, gap, rho = self._rounding_terms(z, pre, stats.pre_scale)
        in_bound = rho * (1.0 + self.op.weight_norm() / self.op.m)
        # The rule's own aim, and the label's proof: under "label", an unconverged residual
        # is the rule's doing (it stops before tol), not rounding's.
        undecided = ~result.label_proven
        if stop == "tol":
            undecided |= ~stats.converged
        elif stop == "logits":
            undecided |= result.logit_error_bound.amax(dim=1) > logit_tol
        finite = torch.isfinite(stats.residual) & torch.isfinite(result.error_bound)
        dominated = _rounding_dominated(gap, rho) | (in_bound >= FLOAT64_SHARE * result.error_bound)
        # An unproven label that the bound without float32's rounding would prove: rounding
        # is all that stands between it and its proof, whatever its share of the bound.
        reach = (result.error_bound - in_bound).clamp_min(0.0)
        w, pool, distances = self.head.weight, self.pool_norm(), self._head_geometry()[1]
        logits = result.logits
        slack = rival_slack(logits, w, pool, reach, distances)
        dominated |= ~result.label_proven & proven_labels(logits, w, pool, reach, slack)
        return undecided & finite & dominated

    def _rounding_terms(
        self, z: Tensor, pre: Tensor, pre_scale: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(‖z‖, ‖z − σ(p)‖, ρ)``, each ``(B,)``, at ``z`` ``(B, *z_shape)`` with ``p =
        pre`` as computed and ``pre_scale`` its rounding scale: the parts of the residual
        (5′) of §2 (:func:`~model_core.bounds.rounding_error`)."""
        z_norm = torch.linalg.vector_norm(z.flatten(1), dim=1)
        pre_norm = torch.linalg.vector_norm(pre.flatten(1), dim=1)
        rho = rounding_error(z_norm, pre_norm, z.dtype, pre_scale)
        step = z - self.deq.nonlin(pre)
        return z_norm, torch.linalg.vector_norm(step.flatten(1), dim=1), rho

    def _certifier(
        self, x: Tensor, stop: str, logit_tol: float | None, tol: float, held: _HeldCertificates
    ) -> Callable[[dict[str, Tensor]], Tensor]:
        """The ``certify`` of :func:`~model_core.solvers.iterate` for a float32 solve of
        ``x``: a running row whose residual is mostly rounding (:func:`_rounding_dominated`)
        may stop once the float64 certificate at its point meets the rule (``tol``: the
        residual within ``tol``; ``label``: proven; ``logits``: every logit's bound within
        ``logit_tol``). Under ``tol`` a row whose float64 residual is sure to be above
        ``tol`` is not certified (:func:`_above_tol`). The certificates that stop rows are
        kept in ``held``, and the answer reports them (:meth:`_certify_in_float64`)."""

        def certify(out: dict[str, Tensor]) -> Tensor:
            z = out["x"]
            z_norm, gap, rho = self._rounding_terms(z, out["pre"], out.get("pre_scale"))
            ok = _rounding_dominated(gap, rho)
            if stop == "tol":
                ok &= ~_above_tol(z_norm, gap, rho, tol)
            if not bool(ok.any()):
                return ok
            rows = ok.nonzero().squeeze(1)
            samples, points = out["row"].index_select(0, rows), z.index_select(0, rows)
            cert = self._float64_certificate(x.index_select(0, samples), points)
            if stop == "tol":
                met = torch.isfinite(cert.residual) & (cert.residual <= tol)
            elif stop == "label":
                met = cert.proven
            else:
                met = cert.logit_bound.amax(dim=1) <= logit_tol
            held.keep(samples, points, cert, met)
            return ok.index_put((rows,), met)

        return certify

    def _float64_certificate(self, x: Tensor, z: Tensor) -> _Certificate:
        """The certificate of §9 for normalised input ``x`` ``(R, C, H, W)`` at the float32
        point ``z`` ``(R, *z_shape)``, evaluated in float64 and returned in float32.

        ``p = W z + U x + b`` is formed directly with float64 copies of the weights
        (:meth:`_float64_copy`; float32 values are exact in float64), so its rounding
        scale is ``‖W‖ ‖z‖ + ‖|U||x| + |b|‖`` with float64's ``eps``. Then the residual
        (:func:`~model_core.solvers.relative_residual`), the centre and bound (eq. 15, with
        ``W r`` formed by the float32 operator from ``r`` rounded to float32, its error
        added to the bound: :func:`~model_core.bounds.product_error`), the logits, their
        bounds and the proof (eqs. 16, 17) as in float32. Back in
        float32: bounds and residuals are rounded up (:func:`~model_core.bounds.cast_above`),
        each logit's bound grows by the cast's ``eps/2 · |l|``, the radius is lowered past
        the cast, and a label stays proven only if the float32 logits keep its argmax.
        """
        shadow = self._float64_copy()
        op, nonlin = shadow.op, shadow.deq.nonlin
        x64, z64 = x.double(), z.double()
        # W r in float32 where float32 products are IEEE (not TF32): r is small at the
        # point, and the product's error is counted (§9, "W r in a lower precision").
        product = self.op if _ieee_float32_products(z.device) else None
        with op.fixed_weights():
            pre = op.multiply(z64) + op.bias(x64)
            z_norm = torch.linalg.vector_norm(z64.flatten(1), dim=1)
            scale = op.weight_norm() * z_norm + op.injection_scale(x64)
            residual = relative_residual(z64, nonlin(pre), pre, scale)
            centre, bound = equilibrium_error_bound(op, nonlin, z64, pre, scale, product=product)
            logits, rounding = shadow._logits_and_rounding(centre)
            w, pool = shadow.head.weight, shadow.pool_norm()
            slack = rival_slack(logits, w, pool, bound, shadow._head_geometry()[1], rounding)
            proven = proven_labels(logits, w, pool, bound, slack)
            radius = shadow.certified_radius(logits, slack)
            logit_bound = logit_error_bounds(w, pool, bound, rounding)
        single = torch.float32
        logits32 = logits.to(single)
        proven &= logits32.argmax(dim=1) == logits.argmax(dim=1)
        unit = torch.finfo(single).eps / 2.0
        logit_bound = cast_above(logit_bound + unit * logits.abs(), single)
        # A logit beyond float32's range is cast to ±inf: no finite bound holds for it.
        logit_bound = logit_bound.masked_fill(~torch.isfinite(logits32), math.inf)
        return _Certificate(
            residual=cast_above(residual, single),
            logits=logits32,
            error_bound=cast_above(bound, single),
            logit_bound=logit_bound,
            proven=proven,
            radius=(radius * (1.0 - 2.0 * torch.finfo(single).eps)).to(single),
        )

    def _certify_in_float64(
        self,
        result: InferenceResult,
        x: Tensor,
        z: Tensor,
        rows: Tensor,
        held: _HeldCertificates | None = None,
    ) -> None:
        """Replace ``rows`` (``(R,)`` int64) of a float32 ``result`` by their float64
        certificate at the same point (:meth:`_float64_certificate`), in place (§9,
        "Rounding"); ``converged`` follows the new residual. A row whose certificate
        ``held`` keeps for its very point (the one that stopped it during the solve) takes
        that one instead of computing it again."""
        points = z.index_select(0, rows)
        cert, found = (None, None) if held is None else held.take(rows, points)
        if cert is None:
            cert = self._float64_certificate(x.index_select(0, rows), points)
        elif not bool(found.all()):
            fresh = (~found).nonzero().squeeze(1)  # positions in rows
            new = self._float64_certificate(
                x.index_select(0, rows.index_select(0, fresh)), points.index_select(0, fresh)
            )
            cert = _Certificate(
                *(a.index_copy(0, fresh, b) for a, b in zip(cert, new, strict=True))
            )
        stats = result.stats
        stats.residual = stats.residual.index_copy(0, rows, cert.residual)
        stats.converged = stats.converged.index_copy(
            0, rows, torch.isfinite(cert.residual) & (cert.residual <= stats.tol)
        )
        result.logits = result.logits.index_copy(0, rows, cert.logits)
        result.error_bound = result.error_bound.index_copy(0, rows, cert.error_bound)
        result.logit_error_bound = result.logit_error_bound.index_copy(0, rows, cert.logit_bound)
        result.label_proven = result.label_proven.index_copy(0, rows, cert.proven)
        result.certified_radius = result.certified_radius.index_copy(
            0, rows, cert.radius.masked_fill(~cert.proven, math.nan)
        )
        result.certified_in_float64 = result.certified_in_float64.index_fill(0, rows, True)

    def _float64_copy(self) -> MonDEQClassifier:
        """This model in float64 on its device (the same weights, exactly), kept while the
        weights are unchanged: the operator's by its weights key, the head's by value.

        Built from the config (not ``copy.deepcopy``, which would copy the per-weights
        caches: a conv resolvent is tens of MB) with the random state restored, so that
        building it draws nothing from the caller's random stream."""
        key = self.op._weights_key()
        held = self._float64
        if held is not None and held[0] == key:
            copy = held[1]
            if all(
                torch.equal(p.detach().double(), q)
                for p, q in zip(self.head.parameters(), copy.head.parameters(), strict=True)
            ):
                return copy
        device = next(self.parameters()).device
        # Ordinary tensors even when called under torch.inference_mode: the copy outlives
        # the call, and its weights cache keys on their version counters.
        with torch.inference_mode(False):
            with torch.random.fork_rng(devices=[]):
                copy = MonDEQClassifier(self.model_config)
            copy.load_state_dict(self.state_dict())
            copy = copy.to(device=device, dtype=torch.float64).eval()
            copy.requires_grad_(False)
        self._float64 = (key, copy)
        return copy

    def _stopping_rule(
        self, stop: str, logit_tol: float | None
    ) -> Callable[[dict[str, Tensor]], Tensor] | None:
        """The ``accept`` of :func:`~model_core.solvers.iterate` for ``stop`` (None: tol)."""
        if stop not in STOP_RULES:
            raise ValueError(f"stop must be one of {', '.join(STOP_RULES)}, got {stop!r}")
        if stop != "logits" and logit_tol is not None:
            raise ValueError(f"logit_tol applies to stop='logits' only, not stop={stop!r}")
        if stop == "tol":
            return None
        if stop == "logits" and not (
            isinstance(logit_tol, (int, float)) and math.isfinite(logit_tol) and logit_tol > 0
        ):
            raise ValueError(f"stop='logits' needs a finite logit_tol > 0, got {logit_tol!r}")
        w, pool, nonlin = self.head.weight, self.pool_norm(), self.deq.nonlin

        def accept(out: dict[str, Tensor]) -> Tensor:
            centre, bound = equilibrium_error_bound(
                self.op, nonlin, out["x"], out["pre"], out.get("pre_scale")
            )
            logits, rounding = self._logits_and_rounding(centre)
            if stop == "logits":
                return logit_error_bounds(w, pool, bound, rounding).amax(dim=1) <= logit_tol
            # The distances are formed from w here, not taken from _head_geometry: a CUDA
            # graph captures this check, and it must read the head's weights themselves
            # (an in-place update reaches it) without the cache's host-side comparison.
            return proven_labels(logits, w, pool, bound, rounding=rounding)

        # The graphed loop reuses captured graphs of equal keys: the same rule of this model
        # (the tensors it reads are checked by model_core.cuda_graphs).
        accept.graph_key = (id(self), stop, logit_tol)
        return accept

    def _logits_and_rounding(self, centre: Tensor) -> tuple[Tensor, Tensor]:
        """The logits at ``centre`` ``(B, *z_shape)`` and their rounding ``(B, K)``
        (:func:`~model_core.bounds.head_rounding`)."""
        features = self.features(centre)
        logits = self.head(features)
        # Averaging n values has norm 1/√n: the pool's window from its norm.
        window = max(1, round(1.0 / self._features_norm**2))
        rounding = head_rounding(
            logits,
            self.head.weight,
            self.head.bias,
            torch.linalg.vector_norm(features, dim=1),
            torch.linalg.vector_norm(centre.flatten(1), dim=1),
            self._features_norm,
            window,
        )
        return logits, rounding

    def lipschitz_bound(self) -> float:
        """``L = ‖W_out‖₂ · ‖pool‖ · ‖U‖₂ / m``: the logits are L-Lipschitz in ℓ2 (§7).

        ``‖U‖₂`` is exact for circular convolutions (largest singular value over all
        frequency blocks).
        """
        return self._head_geometry()[0] * self.pool_norm() * self.op.injection_norm() / self.op.m

    def _head_geometry(self) -> tuple[float, Tensor]:
        """``(‖W_out‖₂, pairwise_distances(W_out))`` of the head's weight ``(K, D)``: a
        float and ``(K, K)``, kept per its values as the operator keeps its caches
        (identity and version first, then a comparison with a copy), since ``infer`` reads
        both on every call: the SVD behind ``‖W_out‖₂`` took 139 of the ~2,000 µs of a
        single-image fmnist-fc ``infer``, and on a GPU it synchronises with the host."""
        w = self.head.weight.detach()
        ident = (w.data_ptr(), w._version, w.dtype, w.device)
        held = self._head_cache
        if held is not None and held[0] == ident and same_values(w, held[1]):
            return held[2], held[3]
        with torch.no_grad():
            norm = spectral_norm_above(w)  # L must not be understated
            distances = pairwise_distances(w)
        self._head_cache = (ident, w.clone(), norm, distances)
        return norm, distances

    def certified_radius(self, logits: Tensor, slack: Tensor | None = None) -> Tensor:
        """Per-sample certified ℓ2 radius, ``min_j (l_y − l_j − s_j) / (‖w_y − w_j‖ · L_z)``
        (§7, §9).

        ``L_z = ‖pool‖ ‖U‖₂ / m`` is the Lipschitz constant of ``x ↦ pool(z*)``; using
        ``‖w_y − w_j‖`` per rival class is tighter than ``2 ‖W_out‖₂``. The radius is a
        statement about the exact equilibrium ``z*``: with ``slack`` ``s_j``, the most each
        margin may differ from the equilibrium's (:func:`~model_core.bounds.rival_slack`),
        it holds for logits read at any iterate; without it, only for the equilibrium's own
        logits. :meth:`infer` passes the slack and withholds the radius (NaN) where the
        label is not proven.

        Args:
            logits: ``(B, K)``.
            slack: ``(B, K)``, or ``None`` for logits of ``z*`` itself.

        Returns:
            ``(B,)``, 0 where the top two logits tie (or the slack eats a margin).
        """
        with torch.no_grad():
            lz = self.pool_norm() * self.op.injection_norm() / self.op.m
            pred = logits.argmax(dim=1)
            wide = logits.double()  # margins of float32 logits are exact in float64
            margins = wide.gather(1, pred[:, None]) - wide  # (B, K)
            if slack is not None:
                margins = margins - slack.double()
            diff_norm = self._head_geometry()[1][pred]  # (B, K): ‖w_y − w_j‖
            # In float64, then lowered past the cast's rounding: the radius must not be
            # overstated by the division's own rounding.
            ratio = margins.double() / (diff_norm.double() * lz).clamp_min(1e-300)
            ratio.scatter_(1, pred[:, None], math.inf)
            radius = ratio.min(dim=1).values.clamp_min(0.0)
            return (radius * (1.0 - 2.0 * torch.finfo(logits.dtype).eps)).to(logits.dtype)


def build_model(config: ModelConfig | Mapping[str, Any]) -> MonDEQClassifier:
    """Build a classifier from a :class:`ModelConfig` or its dict (module docstring: the keys).

    Weights are drawn from torch's global generator: ``torch.manual_seed`` first fixes them.

    Raises:
        ValueError: a wrong config, saying what is wrong.
    """
    return MonDEQClassifier(config)


# ---- the built-in architectures (Appendix E of the paper) ------------------------------------


def _one_width(params: dict, arch: str, key: str) -> dict:
    """``{key: n}`` for an architecture whose one own key is a positive int ``n``."""
    n = params.pop(key, None)
    if not is_positive_int(n):
        raise ValueError(f"{arch} config needs a positive int {key!r}, got {n!r}")
    _no_more(params, arch)
    return {key: n}


def _fc_params(params: dict, config: ModelConfig) -> dict:
    return _one_width(params, "fc", "hidden")


def _conv_params(params: dict, config: ModelConfig) -> dict:
    return _one_width(params, "conv", "channels")


def _multi_tier_params(params: dict, config: ModelConfig) -> dict:
    ch = params.pop("channels", None)
    if not isinstance(ch, list | tuple) or len(ch) < 2 or not all(map(is_positive_int, ch)):
        raise ValueError(f"multi_tier config needs 'channels' as a list of >= 2 ints, got {ch!r}")
    _no_more(params, "multi_tier")
    tier_sizes(config.image_size, len(ch))  # ValueError when a tier grid would be odd
    return {"channels": tuple(int(c) for c in ch)}


def _no_more(params: dict, arch: str) -> None:
    if params:
        raise ValueError(f"{arch} config has unknown keys {sorted(params)}")


def _identity(op: MonotoneOperator, z: Tensor) -> Tensor:
    return z


def _pooled(op: MonotoneOperator, z: Tensor) -> Tensor:
    return F.avg_pool2d(z, POOL).flatten(1)


def _last_tier(op: MonotoneOperator, z: Tensor) -> Tensor:
    return op.split(z)[-1].flatten(1)


def _build_fc(cfg: ModelConfig) -> ArchitectureParts:
    c, size, hidden = cfg.in_channels, cfg.image_size, cfg.arch_params["hidden"]
    op = FCOperator(c * size * size, hidden, m=cfg.m)
    return ArchitectureParts(op, ReLU(), _identity, hidden, 1.0)


def _build_conv(cfg: ModelConfig) -> ArchitectureParts:
    ch = cfg.arch_params["channels"]
    op = MultiTierOperator(cfg.in_channels, [ch], cfg.image_size, m=cfg.m)
    s = op.sizes[-1]
    return ArchitectureParts(
        op, BorderReLU(op.border_mask()), _pooled, ch * (s // POOL) ** 2, 1.0 / POOL
    )


def _build_multi_tier(cfg: ModelConfig) -> ArchitectureParts:
    channels = list(cfg.arch_params["channels"])
    op = MultiTierOperator(cfg.in_channels, channels, cfg.image_size, m=cfg.m)
    s = op.sizes[-1]
    return ArchitectureParts(
        op, BorderReLU(op.border_mask()), _last_tier, channels[-1] * s * s, 1.0
    )


register_architecture("fc", _build_fc, params=_fc_params)
register_architecture("conv", _build_conv, params=_conv_params)
register_architecture("multi_tier", _build_multi_tier, params=_multi_tier_params)

__all__ = [
    "POOL",
    "STOP_RULES",
    "InferenceResult",
    "MonDEQClassifier",
    "build_model",
    "normalize_config",
]
