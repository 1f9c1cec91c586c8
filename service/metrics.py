"""Prometheus metrics of one app, in their own registry (so tests can build several apps).

The names and labels are a contract with the Grafana dashboard and the alert rules: change
them only together. Labels stay bounded: ``model`` is a name from the repository (or
``"unknown"``, or ``""`` for endpoints that name none), ``endpoint`` comes from
:data:`ENDPOINTS`, ``method`` from the registered solvers, ``stop`` from
``model_core.models.STOP_RULES``, ``proven`` is ``"true"`` or ``"false"``, ``reason`` from
:data:`TUNING_REASONS`, ``version`` from the repository's version folders.

Every gauge describes what serves now: the per-model solver gauges and ``mondeq_model_info``
follow the default version (they are absent while none can serve), and a model that left
the repository leaves no series behind.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ENDPOINTS = (
    "v2_server",
    "v2_live",
    "v2_ready",
    "v2_model",
    "v2_model_ready",
    "v2_infer",
    "v2_stats",
    "v2_repository_index",
    "v2_repository_load",
    "v2_repository_unload",
    "grpc_server_live",
    "grpc_server_ready",
    "grpc_model_ready",
    "grpc_server_metadata",
    "grpc_model_metadata",
    "grpc_infer",
    "v1_models",
    "v1_classify",
    "v1_tune_alpha",
    "v1_reload",
    "metrics",
    "docs",
    "other",
)
TUNING_REASONS = ("load", "drift", "admin")

ITERATION_BUCKETS = (1, 2, 3, 5, 8, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)
RESIDUAL_BUCKETS = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
# ‖ĉ − z*‖ in the units of z (docs/math.md §9): on the default models from about 0.01 under
# stop=logits at logit_tol 0.1 to about 1 under stop=label (medians), up to a few units.
ERROR_BOUND_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the service exports, registered in ``self.registry``."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.solver_iterations = Histogram(
            "mondeq_solver_iterations",
            "Forward-solve iterations per sample.",
            ["model", "method"],
            buckets=ITERATION_BUCKETS,
            registry=r,
        )
        self.solver_residual = Histogram(
            "mondeq_solver_residual",
            "Relative fixed-point residual ‖z − σ(Wz + Ux + b)‖ / ‖z‖ per sample at exit, by "
            "stopping rule (only stop=tol bounds it by tol).",
            ["model", "method", "stop"],
            buckets=RESIDUAL_BUCKETS,
            registry=r,
        )
        self.solver_alpha = Gauge(
            "mondeq_solver_alpha",
            "Step size α the default version solves with.",
            ["model"],
            registry=r,
        )
        self.solver_max_iter = Gauge(
            "mondeq_solver_max_iter",
            "Configured iteration cap of the default version.",
            ["model"],
            registry=r,
        )
        self.solver_tol = Gauge(
            "mondeq_solver_tol",
            "Configured tolerance of the default version.",
            ["model"],
            registry=r,
        )
        self.solver_unconverged = Counter(
            "mondeq_solver_unconverged",
            "Samples answered with a residual above tol (answered anyway), by stopping rule: "
            "under stop=tol they hit max_iter; under label/logits their rule held first.",
            ["model", "method", "stop"],
            registry=r,
        )
        self.error_bound = Histogram(
            "mondeq_error_bound",
            "Bound on ‖ĉ − z*‖, the answer's distance to the exact equilibrium, per sample "
            "(docs/math.md §9; diverged samples, bound inf, are not observed).",
            ["model", "stop"],
            buckets=ERROR_BOUND_BUCKETS,
            registry=r,
        )
        self.answers = Counter(
            "mondeq_answers",
            "Samples answered, by stopping rule and whether the label is proven to be the "
            "exact equilibrium's (docs/math.md §9).",
            ["model", "stop", "proven"],
            registry=r,
        )
        self.float64_certificates = Counter(
            "mondeq_float64_certificates",
            "Samples whose answer was certified in float64 at its point because their float32 "
            "test was stuck at its rounding floor: a tol, near tie or logit_tol under "
            "float32's reach (docs/math.md §2), by stopping rule.",
            ["model", "stop"],
            registry=r,
        )
        self.alpha_tuning = Counter(
            "mondeq_alpha_tuning",
            "α searches run, by reason (load, drift, admin).",
            ["model", "reason"],
            registry=r,
        )
        self.requests = Counter(
            "mondeq_requests",
            "Requests answered, HTTP and gRPC (endpoint grpc_*; code: the HTTP status of the "
            "same answer over HTTP).",
            ["model", "endpoint", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "mondeq_request_duration_seconds",
            "Time from request received to response sent.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "mondeq_queue_wait_seconds",
            "Time a request waited in its model's queue before its batch started solving.",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mondeq_batch_size",
            "Rows per batched solve.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "mondeq_inflight_requests",
            "HTTP and gRPC requests being served (scrapes excluded).",
            registry=r,
        )
        self.model_info = Gauge(
            "mondeq_model_info",
            "1 for the default version of each model.",
            ["model", "version", "arch", "method"],
            registry=r,
        )
        self.model_ready = Gauge(
            "mondeq_model_ready",
            "1 when the model has a version ready to serve.",
            ["model"],
            registry=r,
        )
        self.load_failures = Counter(
            "mondeq_model_load_failures",
            "Checkpoint loads that failed (the version's older load, if any, kept serving).",
            ["model", "version"],
            registry=r,
        )
        self.load_failed = Gauge(
            "mondeq_model_load_failed",
            "1 while the latest load of the version's file on disk has failed.",
            ["model", "version"],
            registry=r,
        )
        self._info_labels: dict[str, tuple[str, str, str, str]] = {}

    def set_model_info(self, model: str, version: str, arch: str, method: str) -> None:
        """Point ``mondeq_model_info`` of ``model`` at one (version, arch, method)."""
        labels = (model, version, arch, method)
        old = self._info_labels.get(model)
        if old == labels:
            return
        if old is not None:
            self.model_info.remove(*old)
        self.model_info.labels(*labels).set(1)
        self._info_labels[model] = labels

    def forget_serving(self, model: str) -> None:
        """Drop the gauges that describe ``model``'s default version: none serves now."""
        old = self._info_labels.pop(model, None)
        if old is not None:
            self.model_info.remove(*old)
        for gauge in (self.solver_alpha, self.solver_max_iter, self.solver_tol):
            with contextlib.suppress(KeyError):
                gauge.remove(model)

    def set_load_failed(self, model: str, version: str, failed: bool) -> None:
        """``mondeq_model_load_failed{model, version}``: 1 while failed, absent otherwise."""
        if failed:
            self.load_failed.labels(model, version).set(1)
        else:
            with contextlib.suppress(KeyError):
                self.load_failed.remove(model, version)

    def forget_version(self, model: str, version: str) -> None:
        """Drop the gauges of a version that left the repository."""
        self.set_load_failed(model, version, False)

    def forget_model(self, model: str) -> None:
        """Drop every gauge of a model that left the repository (nothing of it serves)."""
        self.forget_serving(model)
        with contextlib.suppress(KeyError):
            self.model_ready.remove(model)
