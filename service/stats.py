"""Per model version inference statistics, in the shape of the statistics extension of the
Open Inference Protocol as Triton defines it (``GET /v2/models[/{name}[/versions/{v}]]/stats``).

Counted since the version was loaded (a reloaded version starts from zero):

* ``inference_count``: samples answered (a request of ``B`` rows counts ``B``);
* ``execution_count``: batched solves (one solve serves many requests);
* ``inference_stats``: per request, ``{"count", "ns"}`` of ``success`` (requests answered;
  ``ns``: from queueing to the answer), ``fail`` (refused or failed once they reached the
  model: queue full, too much work, shutting down, a failed solve), ``queue`` (waiting for
  the batch to start), ``compute_input`` (normalising the pixels and moving them to the
  device), ``compute_infer`` (the equilibrium solve) and ``compute_output`` (logits,
  probabilities and per-sample statistics back to the host). A request counts the whole
  batch's compute times, as in Triton. ``cache_hit`` / ``cache_miss`` stay zero (no
  response cache);
* ``batch_stats``: per batch size, the ``compute_*`` durations of the solves of that size.

Parsing and encoding an HTTP body are not in these figures: ``mondeq_request_duration_seconds``
covers the whole request.
"""

from __future__ import annotations

import threading
import time
from typing import Any

PHASES = ("compute_input", "compute_infer", "compute_output")
REQUEST_STATS = ("success", "fail", "queue", *PHASES, "cache_hit", "cache_miss")


class ModelStats:
    """Counters of one model version, written from the event loop (requests) and the solver
    thread (executions); a lock keeps each update whole. Durations are integer nanoseconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_inference_ms = 0  # milliseconds since the epoch; 0: none yet
        self.inference_count = 0
        self.execution_count = 0
        self.requests = {k: [0, 0] for k in REQUEST_STATS}  # name -> [count, ns]
        self.batches: dict[int, dict[str, list[int]]] = {}  # batch size -> phase -> [count, ns]

    def execution(self, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One successful solve of ``rows`` samples and its three phases' durations."""
        with self._lock:
            self.execution_count += 1
            phases = self.batches.setdefault(rows, {p: [0, 0] for p in PHASES})
            for p, ns in zip(PHASES, (input_ns, infer_ns, output_ns), strict=True):
                phases[p][0] += 1
                phases[p][1] += ns

    def success(self, rows: int, total_ns: int, queue_ns: int, phase_ns: tuple[int, int, int]):
        """One answered request of ``rows`` samples: ``total_ns`` from queueing to the
        answer, ``queue_ns`` of it waiting, ``phase_ns`` its batch's input, infer and output
        durations."""
        with self._lock:
            self.inference_count += rows
            self.last_inference_ms = time.time_ns() // 1_000_000
            for k, ns in (
                ("success", total_ns),
                ("queue", queue_ns),
                *zip(PHASES, phase_ns, strict=True),
            ):
                self.requests[k][0] += 1
                self.requests[k][1] += ns

    def failure(self, total_ns: int) -> None:
        """One request the model refused or failed, ``total_ns`` after it reached it."""
        with self._lock:
            self.requests["fail"][0] += 1
            self.requests["fail"][1] += total_ns

    def snapshot(self, name: str, version: str) -> dict[str, Any]:
        """The ``$model_stat`` object of the statistics extension for this version."""
        with self._lock:
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    k: {"count": c, "ns": ns} for k, (c, ns) in self.requests.items()
                },
                "response_stats": {},
                "batch_stats": [
                    {"batch_size": size, **{p: {"count": c, "ns": ns} for p, (c, ns) in ph.items()}}
                    for size, ph in sorted(self.batches.items())
                ],
                "memory_usage": [],
            }


def empty_snapshot(name: str, version: str) -> dict[str, Any]:
    """The ``$model_stat`` of a version that is not loaded (nothing counted)."""
    return ModelStats().snapshot(name, version)
