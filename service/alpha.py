"""α (the Peaceman–Rachford step size) for a served model: tuned at load, retuned on drift.

At load the search runs on the checkpoint's calibration batch (``metadata["calibration"]``:
uint8 pixels ``(N, C, H, W)``). A checkpoint without one is tuned on the first
``retune_window`` samples of traffic instead (still counted as ``reason="load"``). After
that, every ``retune_window`` samples solved with the default solver settings give a mean
iteration count; past ``baseline × retune_factor`` a retune on recent traffic runs in a
background thread (``reason="drift"``). The new α's resolvent is built before the model
switches to it, so serving never waits for a factorisation.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from model_core import SOLVERS, MonDEQClassifier, tune_alpha

log = logging.getLogger("mondeq.service")
T = TypeVar("T")
# Names of the daemon threads that run α searches (:func:`search_running`).
SEARCH_THREADS = ("alpha-search", "alpha-retune")

# The search the server runs: tune_alpha's own grid (log10 range, grid points, refinements).
_SEARCH = {
    k: p.default
    for k, p in inspect.signature(tune_alpha).parameters.items()
    if k in ("log10_range", "grid", "refine")
}


def search_plan() -> str:
    """The server's α search in words, for the log: ``up to 13 α in [0.01, 100]``."""
    lo, hi = _SEARCH["log10_range"]
    return f"up to {_SEARCH['grid'] + _SEARCH['refine']} α in [{10**lo:g}, {10**hi:g}]"


async def in_search_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a daemon thread of its own, awaited: for work that runs an α search
    (a load with its search at load, an admin search).

    ``tune_alpha`` cannot be interrupted, and the threads of asyncio's default executor
    (``asyncio.to_thread``) are joined when the process exits, so a search running in one
    held a SIGTERM-ed server until its last α: minutes on a CPU, past every grace period.
    A daemon thread ends with the process, as the drift retunes' threads do. A caller that is
    cancelled stops waiting, and the result is dropped when it comes.

    Raises:
        whatever ``fn`` raises.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(set_outcome: Callable[[Any], None], value: Any) -> None:
        if not done.done():  # the caller was cancelled meanwhile
            set_outcome(value)

    def run() -> None:
        try:
            outcome: tuple[Callable[[Any], None], Any] = (done.set_result, fn(*args))
        except BaseException as e:  # handed to the awaiting caller
            outcome = (done.set_exception, e)
        with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=SEARCH_THREADS[0], daemon=True).start()
    return await done


def search_running() -> bool:
    """Whether an α search thread (:func:`in_search_thread`'s or a drift retune's) is still
    computing. The process must then end with ``os._exit``: the interpreter's finalization
    tears down torch's thread pools under the running search and aborts the process."""
    return any(t.name in SEARCH_THREADS and t.is_alive() for t in threading.enumerate())


class TuningBusy(Exception):
    """A search for this model is running already."""


class NoTuningData(Exception):
    """Neither a calibration batch nor recent traffic to tune on."""


class AlphaTuner:
    """α state of one served model version. Thread-safe: the solve thread feeds it, tuning
    runs in the loader thread, a background thread, or an admin request's thread.

    Args:
        model: the served classifier (its α is changed in place with ``set_solver``).
        calibration: normalised calibration batch ``(N, C, H, W)`` on the CPU, or ``None``.
        recent_size: normalised recent inputs kept for retuning.
        window: samples per drift check.
        factor: drift threshold on mean iterations relative to the baseline (0: off).
        cooldown_s: least time between two drift retunes.
        calibration_size: rows given to the search.
        on_tuned: ``on_tuned(reason, result_dict)`` after each search (metrics, gauges).

    ``label`` (``name/version``; set by whoever serves the model) starts each log line.
    """

    def __init__(
        self,
        model: MonDEQClassifier,
        *,
        calibration: Tensor | None,
        recent_size: int,
        window: int,
        factor: float,
        cooldown_s: float,
        calibration_size: int,
        on_tuned: Callable[[str, dict], None] | None = None,
    ):
        self.model = model
        self.calibration = calibration
        self.window = window
        self.factor = factor
        self.cooldown_s = cooldown_s
        self.calibration_size = calibration_size
        self.on_tuned = on_tuned
        self.label = "model"
        self.baseline: float | None = None  # mean iterations at the tuned α
        self.last: dict | None = None  # the latest search's result, for /v1/models
        self._recent: deque[Tensor] = deque()
        self._recent_rows = 0
        self._recent_size = recent_size
        self._win_sum = 0.0
        self._win_n = 0
        self._last_tune = 0.0
        self._lock = threading.Lock()  # one search at a time
        self._data_lock = threading.Lock()  # the ring buffer and window counters
        self.pending_initial = False  # tune on traffic once the first window is full

    @property
    def tunable(self) -> bool:
        """Whether the model's method has an α worth searching (PR yes; FB's α is bounded
        by its convergence rule)."""
        return self.model.solver_settings.solver.tunable_alpha

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    # ---- data ----------------------------------------------------------------------------------
    def recent(self, n: int) -> Tensor | None:
        """The latest ``n`` recent inputs ``(≤n, C, H, W)``, newest last, or ``None``."""
        with self._data_lock:
            parts = list(self._recent)
        if not parts:
            return None
        return torch.cat(parts)[-n:]

    def batch(self, source: str) -> tuple[Tensor, str]:
        """The tuning batch for ``source`` (``auto`` prefers recent traffic, then the
        calibration batch) and the source actually used. Raises :class:`NoTuningData`."""
        if source not in ("auto", "recent", "calibration"):
            raise ValueError(f"source must be auto, recent or calibration, got {source!r}")
        if source in ("auto", "recent"):
            x = self.recent(self.calibration_size)
            if x is not None:
                return x, "recent"
            if source == "recent":
                raise NoTuningData("no recent traffic to tune on yet")
        if self.calibration is None:
            raise NoTuningData(
                "the checkpoint carries no calibration batch"
                + (" and there is no recent traffic" if source == "auto" else "")
            )
        return self.calibration[: self.calibration_size], "calibration"

    # ---- tuning --------------------------------------------------------------------------------
    def tune(self, reason: str, source: str = "auto", apply: bool = True) -> dict:
        """Search α now (blocking) and, with ``apply``, switch the model to it.

        Returns:
            ``AlphaTuning.to_dict()`` plus ``reason``, ``source``, ``samples``,
            ``previous_alpha``, ``applied`` and ``baseline_iterations``.

        Raises:
            TuningBusy: another search is running.
            NoTuningData: nothing to tune on.
            ValueError: the model's method has no tunable α, or a bad ``source``.
        """
        method = self.model.solver_settings.method
        if not self.tunable:
            tunable = sorted(n for n, cls in SOLVERS.items() if cls.tunable_alpha)
            raise ValueError(
                f"the α search applies to {', '.join(tunable)}; this model solves with {method}"
            )
        if not self._lock.acquire(blocking=False):
            raise TuningBusy("an α search for this model is running already")
        try:
            x, used = self.batch(source)
            previous = self.model.solver_settings.alpha
            log.info(
                "%s: α search (%s) on %d %s samples: %s, %s from α %s",
                self.label,
                reason,
                int(x.shape[0]),
                used,
                search_plan(),
                method,
                previous,
            )
            t0 = time.perf_counter()
            result = tune_alpha(self.model, x, method=method)
            best = next((r for r in result.curve if r["alpha"] == result.alpha), None)
            iters = best["iterations_mean"] if best else None
            if apply:
                self._switch(result.alpha)
                self.baseline = iters
                self._last_tune = time.monotonic()
                with self._data_lock:
                    self._win_sum, self._win_n = 0.0, 0
            out = {
                **result.to_dict(),
                "reason": reason,
                "source": used,
                "samples": int(x.shape[0]),
                "previous_alpha": previous,
                "applied": apply,
                "baseline_iterations": iters,
                "search_s": time.perf_counter() - t0,
            }
            self.last = {k: out[k] for k in ("alpha", "reason", "source", "samples", "applied")}
            self.last["baseline_iterations"] = iters
            self.last["at"] = time.time()
        finally:
            self._lock.release()
        log.info(
            "%s: α search (%s) done in %.1f s: α %s → %s, %.3g mean iterations, %d α tried",
            self.label,
            reason,
            out["search_s"],
            previous,
            result.alpha,
            iters or math.nan,
            len(result.curve),
        )
        if self.on_tuned is not None:
            self.on_tuned(reason, out)
        return out

    def _switch(self, alpha: float) -> None:
        """Build ``alpha``'s resolvent into the operator's cache, then make it the default.

        Solves running meanwhile keep the old α (and its cached resolvent); the next
        batch picks up the new one without a build. (The operator's cache is thread-safe.)
        """
        self.model.op.resolvent(alpha)
        self.model.set_solver(alpha=alpha)

    # ---- traffic -------------------------------------------------------------------------------
    def observe(self, x: Tensor, iterations: Tensor) -> None:
        """Record a default-settings batch: ``x`` normalised ``(N, C, H, W)`` (CPU),
        ``iterations`` ``(N,)``. Starts a background retune when the window says so."""
        n = int(x.shape[0])
        with self._data_lock:
            self._recent.append(x)
            self._recent_rows += n
            while self._recent_rows - int(self._recent[0].shape[0]) >= self._recent_size:
                self._recent_rows -= int(self._recent.popleft().shape[0])
            self._win_sum += float(iterations.double().sum())
            self._win_n += n
            if self._win_n < self.window:
                return
            mean = self._win_sum / self._win_n
            self._win_sum, self._win_n = 0.0, 0
        reason = None
        if self.baseline is None:
            if self.pending_initial and self.tunable:
                reason = "load"
            else:
                self.baseline = mean
        elif (
            self.factor > 0
            and self.tunable
            and mean > self.baseline * self.factor
            and time.monotonic() - self._last_tune >= self.cooldown_s
        ):
            log.info(
                "%s: mean iterations %.3g drifted past %.3g × %.3g",
                self.label,
                mean,
                self.baseline,
                self.factor,
            )
            reason = "drift"
        if reason is not None and not self.busy:
            self.pending_initial = False
            threading.Thread(
                target=self._background, args=(reason,), name=SEARCH_THREADS[1], daemon=True
            ).start()

    def _background(self, reason: str) -> None:
        try:
            self.tune(reason, source="recent")
        except TuningBusy:
            pass
        except Exception:
            log.exception("%s: background α search failed", self.label)
