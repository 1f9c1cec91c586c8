"""One served model version: normalisation, the batched solve, per-sample stats, α state."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model_core import SOLVERS, InputSpec, MonDEQClassifier, SolverSettings
from model_core.models import STOP_RULES

from .alpha import AlphaTuner
from .batcher import Answer, Batcher, BatchOutput
from .metrics import Metrics
from .settings import Settings
from .stats import ModelStats

log = logging.getLogger("mondeq.service")


class TooMuchWork(ValueError):
    """A request asks for more solver work than ``max_row_iterations`` allows."""


@dataclass(frozen=True)
class SolveKey:
    """Solver parameters a batch shares. Requests with different keys never share a solve.

    ``stop`` is the stopping rule (one of ``model_core.models.STOP_RULES``, docs/math.md §9),
    ``logit_tol`` its logit accuracy under ``"logits"`` (``None`` otherwise); ``tol`` decides
    ``converged`` under every rule and stops the samples under ``"tol"``.
    """

    method: str
    tol: float
    max_iter: int
    stop: str = "tol"
    logit_tol: float | None = None


class ServedModel:
    """A loaded checkpoint plus its queue, batcher and α tuner.

    Built in a loader thread (it may tune α); :meth:`start` then creates the batcher in the
    event loop.

    Attributes:
        name, version: where it sits in the repository.
        model: the :class:`MonDEQClassifier`, shared by the solve and tuning threads.
        shape: ``(C, H, W)`` of one input.
        class_names: ``K`` names.
        card: ``card.json`` beside the checkpoint (``{}`` if none).
    """

    def __init__(
        self,
        name: str,
        version: int,
        model: MonDEQClassifier,
        *,
        path: Path,
        card: dict,
        settings: Settings,
        metrics: Metrics,
        on_alpha: Callable[[ServedModel], None] | None = None,
    ):
        self.name, self.version, self.model, self.path, self.card = (
            name,
            version,
            model,
            path,
            card,
        )
        self.settings, self.metrics = settings, metrics
        self.on_alpha = on_alpha
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # Checked against the model's config when it was set (InputSpec.from_dict).
        self.input_spec: InputSpec = model.input_spec
        self.shape: tuple[int, int, int] = self.input_spec.shape
        self.mean_list, self.std_list = list(self.input_spec.mean), list(self.input_spec.std)
        self.class_names = list(self.input_spec.class_names)
        self.lipschitz = float(model.lipschitz_bound())
        self.loaded_at = time.time()
        self.tuner = AlphaTuner(
            model,
            calibration=self._calibration(),
            recent_size=settings.recent_size,
            window=settings.retune_window,
            factor=settings.retune_factor,
            cooldown_s=settings.retune_cooldown_s,
            calibration_size=settings.calibration_size,
            on_tuned=self._tuned,
        )
        self.batcher: Batcher | None = None
        self.stats = ModelStats()  # the statistics extension's counters (service.stats)

    # ---- set-up --------------------------------------------------------------------------------
    def _calibration(self) -> Tensor | None:
        """The checkpoint's calibration pixels, as a normalised ``(N, C, H, W)`` batch."""
        raw = self.model.calibration
        if not isinstance(raw, Tensor):
            return None
        pixels = raw.dtype == torch.uint8 or raw.is_floating_point()
        if raw.dim() != 4 or tuple(raw.shape[1:]) != self.shape or raw.shape[0] == 0 or not pixels:
            log.warning(
                "%s/%s: calibration batch of shape %s (%s) does not match %s pixels; ignored",
                self.name,
                self.version,
                tuple(raw.shape),
                raw.dtype,
                self.shape,
            )
            return None
        if raw.is_floating_point():
            raw = raw.float().clamp(0, 1)
        return self.normalize(raw[: self.settings.calibration_size])

    def tune_at_load(self) -> None:
        """Tune α on the calibration batch, or arm tuning on the first window of traffic."""
        if not self.settings.tune_at_load or not self.tuner.tunable:
            return
        if self.tuner.calibration is None:
            self.tuner.pending_initial = True
            return
        self.tuner.tune("load", source="calibration")

    def start(self) -> None:
        """Create the queue and its worker (call in the event loop)."""
        s = self.settings
        self.batcher = Batcher(
            f"{self.name}-v{self.version}",
            self._solve,
            max_batch_size=s.max_batch_size,
            max_delay_s=s.max_delay_ms / 1000.0,
            max_gap_s=s.max_gap_ms / 1000.0,
            max_queue=s.max_queue,
            max_solving_rows=s.max_solving_rows,
            on_batch=self._batched,
        )

    async def close(self) -> None:
        """Answer everything queued, then stop."""
        if self.batcher is not None:
            await self.batcher.close()

    # ---- serving -------------------------------------------------------------------------------
    @property
    def solver(self) -> SolverSettings:
        """The model's default solver settings (α as tuned now)."""
        return self.model.solver_settings

    def default_key(self) -> SolveKey:
        """The key of a request that names no solver parameter: the model's solver settings
        and the server's stopping rule (``stop``, ``logit_tol`` settings)."""
        s, cfg = self.solver, self.settings
        logit_tol = cfg.logit_tol if cfg.stop == "logits" else None
        return SolveKey(s.method, float(s.tol), int(s.max_iter), cfg.stop, logit_tol)

    def key(
        self,
        method: str | None = None,
        tol: float | None = None,
        max_iter: int | None = None,
        stop: str | None = None,
        logit_tol: float | None = None,
    ) -> SolveKey:
        """The solve key for per-request overrides, checked against the server's bounds.

        ``stop`` defaults to the server's; ``logit_tol`` applies to ``stop="logits"`` only,
        where it defaults to the server's ``logit_tol`` setting and one of the two is needed.

        Raises:
            ValueError: saying which parameter is out of bounds or does not apply.
        """
        d = self.default_key()
        named = stop is not None
        stop = stop if named else self.settings.stop
        if stop not in STOP_RULES:
            raise ValueError(f"stop must be one of {', '.join(STOP_RULES)}, got {stop!r}")
        if logit_tol is not None and stop != "logits":
            whose = "" if named else " (the server's default: send stop 'logits' with it)"
            raise ValueError(f"logit_tol applies to stop 'logits' only, not stop {stop!r}{whose}")
        if logit_tol is not None and not (math.isfinite(logit_tol) and logit_tol > 0):
            raise ValueError(f"logit_tol must be a finite number > 0, got {logit_tol!r}")
        if stop == "logits" and logit_tol is None:
            logit_tol = self.settings.logit_tol
            if logit_tol is None:
                raise ValueError(
                    "stop 'logits' needs logit_tol (the absolute logit accuracy, > 0); "
                    "the server sets no default"
                )
        if method is not None and method not in SOLVERS:
            raise ValueError(f"unknown method {method!r}; choose one of {sorted(SOLVERS)}")
        if tol is not None and not (math.isfinite(tol) and self.settings.min_tol <= tol <= 1.0):
            raise ValueError(f"tol must lie in [{self.settings.min_tol:g}, 1], got {tol!r}")
        if max_iter is not None and not (1 <= max_iter <= self.settings.max_iter_cap):
            raise ValueError(
                f"max_iter must lie in [1, {self.settings.max_iter_cap}], got {max_iter!r}"
            )
        return SolveKey(
            method or d.method,
            float(tol) if tol is not None else d.tol,
            int(max_iter) if max_iter is not None else d.max_iter,
            stop,
            float(logit_tol) if logit_tol is not None else None,
        )

    def normalize(self, x: Tensor) -> Tensor:
        """Pixels ``(B, C, H, W)`` (float in [0, 1], or uint8) → the model's normalised
        float32 input, on ``x``'s device (:meth:`InputSpec.normalize`)."""
        return self.input_spec.normalize(x, dtype=torch.float32)

    def check_work(self, rows: int, key: SolveKey) -> None:
        """Refuse a request that may cost more than the server allows one request.

        Its worst case is ``rows × max_iter`` row-iterations under every stopping rule
        (rows stop early once their rule holds);
        ``tol`` and ``max_iter`` alone are bounded by :meth:`key`.

        Raises:
            TooMuchWork: past ``max_row_iterations``, saying how to fit.
        """
        limit = self.settings.max_row_iterations
        if rows * key.max_iter > limit:
            fit = limit // key.max_iter
            how = (
                f"send at most {fit} rows at this max_iter, or a smaller max_iter"
                if fit
                else f"max_iter may be at most {limit}"
            )
            raise TooMuchWork(
                f"{rows} rows × max_iter {key.max_iter} = {rows * key.max_iter} row-iterations "
                f"exceeds the server's limit max_row_iterations = {limit}: {how}"
            )

    async def infer(self, x: Tensor, key: SolveKey) -> Answer:
        """Queue pixels ``x`` ``(b, C, H, W)`` in [0, 1]; the caller's rows of its batch.

        Raises:
            TooMuchWork: see :meth:`check_work`.
            batcher.QueueFull, batcher.Closed, batcher.SolveFailed.
        """
        assert self.batcher is not None, "start() first"
        t0 = time.perf_counter_ns()
        try:  # every outcome lands in self.stats (the statistics extension)
            self.check_work(int(x.shape[0]), key)
            ans = await self.batcher.submit(x, key)
        except BaseException:
            self.stats.failure(time.perf_counter_ns() - t0)
            raise
        i = ans.info
        self.stats.success(
            int(x.shape[0]),
            time.perf_counter_ns() - t0,
            round(ans.queue_s * 1e9),
            (i.get("input_ns", 0), i.get("infer_ns", 0), i.get("output_ns", 0)),
        )
        return ans

    def _solve(self, x: Tensor, key: SolveKey, between: Callable[[], None]) -> BatchOutput:
        """Solve one batch (in a batcher thread). ``x``: ``(N, C, H, W)`` pixels;
        ``between`` runs between solver iterations (where the batcher may pause it)."""
        t0 = time.perf_counter()
        xn = self.normalize(x)
        xd = xn.to(self.device, self.dtype)
        t1 = time.perf_counter()
        res = self.model.infer(
            xd,
            method=key.method,
            tol=key.tol,
            max_iter=key.max_iter,
            between=between,
            stop=key.stop,
            logit_tol=key.logit_tol,
        )
        t2 = time.perf_counter()
        logits = res.logits.float().cpu()
        st = res.stats
        iterations = st.iterations.cpu()
        residual = st.residual.float().cpu()
        converged = st.converged.cpu()
        error_bound = res.error_bound.float().cpu()
        proven = res.label_proven.cpu()
        # The radius needs no gate on the residual: infer shrinks it by the error bound and
        # withholds it (NaN) unless the label is proven, so it holds at any iterate (§9).
        radius = res.certified_radius.float().cpu()
        rows = {
            "logits": logits,
            "probabilities": torch.softmax(logits, dim=1),
            "label": logits.argmax(dim=1),
            "iterations": iterations,
            "residual": residual,
            "converged": converged,
            "certified_radius": radius,
            "error_bound": error_bound,
            "label_proven": proven,
            "logit_error_bound": res.logit_error_bound.float().cpu(),
        }
        t3 = time.perf_counter()
        solve_s = t3 - t0
        # The statistics extension's compute_input / compute_infer / compute_output.
        phase_ns = [round((b - a) * 1e9) for a, b in ((t0, t1), (t1, t2), (t2, t3))]
        self.stats.execution(int(x.shape[0]), *phase_ns)
        info = {
            "alpha": float(st.alpha),
            "method": st.method,
            "tol": float(st.tol),
            "max_iter": int(st.max_iter),
            "stop": key.stop,
            "logit_tol": key.logit_tol,
            "solve_s": solve_s,
            "input_ns": phase_ns[0],
            "infer_ns": phase_ns[1],
            "output_ns": phase_ns[2],
            "lipschitz": float(res.lipschitz),
        }
        self._record(st.method, key.stop, iterations, residual, converged, error_bound, proven)
        in_float64 = int(res.certified_in_float64.sum())
        if in_float64:
            self.metrics.float64_certificates.labels(self.name, key.stop).inc(in_float64)
        if key == self.default_key():
            self.tuner.observe(xn, iterations)
        return BatchOutput(rows, info)

    # ---- metrics -------------------------------------------------------------------------------
    def _record(
        self,
        method: str,
        stop: str,
        iterations: Tensor,
        residual: Tensor,
        converged: Tensor,
        error_bound: Tensor,
        proven: Tensor,
    ) -> None:
        """One batch's per-sample metrics (each argument ``(N,)``)."""
        m = self.metrics
        it_hist = m.solver_iterations.labels(self.name, method)
        res_hist = m.solver_residual.labels(self.name, method, stop)
        bound_hist = m.error_bound.labels(self.name, stop)
        for v in iterations.tolist():
            it_hist.observe(v)
        for v in residual.tolist():
            if math.isfinite(v):
                res_hist.observe(v)
        for v in error_bound.tolist():
            if math.isfinite(v):  # a diverged sample's inf would poison the sum for good
                bound_hist.observe(v)
        bad = int((~converged).sum())
        if bad:
            m.solver_unconverged.labels(self.name, method, stop).inc(bad)
        n_proven = int(proven.sum())
        m.answers.labels(self.name, stop, "true").inc(n_proven)
        m.answers.labels(self.name, stop, "false").inc(int(proven.numel()) - n_proven)

    def _batched(self, rows: int, waits: list[float]) -> None:
        self.metrics.batch_size.labels(self.name).observe(rows)
        q = self.metrics.queue_wait.labels(self.name)
        for w in waits:
            q.observe(w)

    def _tuned(self, reason: str, result: dict) -> None:
        self.metrics.alpha_tuning.labels(self.name, reason).inc()
        if self.on_alpha is not None:
            self.on_alpha(self)

    # ---- description ---------------------------------------------------------------------------
    def accuracy(self) -> float | None:
        """Test accuracy (0..1): from card.json, else the checkpoint's metrics."""
        for v in (
            self.card.get("test_accuracy"),
            ((self.model.metadata or {}).get("metrics") or {}).get("test_accuracy"),
        ):
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                return float(v)
        return None

    def describe(self) -> dict[str, Any]:
        """The ``/v1/models`` view of this version."""
        s = self.solver
        meta = self.model.metadata or {}
        return {
            "architecture": self.model.arch,
            "parameters": self.model.num_parameters(),
            "input": {
                "shape": list(self.shape),
                "datatype": "FP32",
                "range": [0.0, 1.0],
                "mean": self.mean_list,
                "std": self.std_list,
            },
            "class_names": self.class_names,
            "dataset": meta.get("dataset") if isinstance(meta.get("dataset"), str) else None,
            "accuracy": self.accuracy(),
            "method": s.method,
            "alpha": s.alpha,
            "tol": s.tol,
            "max_iter": s.max_iter,
            "lipschitz_bound": self.lipschitz,
            "device": str(self.device),
            "tuning": self.tuner.last,
            "queue_rows": self.batcher.pending_rows if self.batcher else 0,
            "solves_in_flight": self.batcher.solving if self.batcher else 0,
            "card": self.card or None,
        }
