"""Answers → JSON: the V2 output tensors, the friendly API's predictions, the solver stats;
and → raw bytes (the binary tensor data extension, gRPC's ``raw_output_contents``).

JSON has no NaN or Infinity: every non-finite float leaves as ``null`` (a withheld radius,
a diverged residual or error bound). Raw bytes carry the float itself (NaN, ±Inf).
"""

from __future__ import annotations

import math
from typing import Any

import orjson
import torch
from starlette.responses import JSONResponse

from .batcher import Answer
from .engine import ServedModel

# Every output a V2 request may ask for, with its datatype (Open Inference Protocol,
# "Tensor Data Types"); per-sample outputs have shape [B]; logits, probabilities and
# logit_error_bound [B, K].
OUTPUT_TYPES = {
    "logits": "FP32",
    "probabilities": "FP32",
    "label": "INT64",
    "iterations": "INT32",
    "residual": "FP32",
    "converged": "BOOL",
    "certified_radius": "FP32",
    "error_bound": "FP32",
    "label_proven": "BOOL",
    "logit_error_bound": "FP32",
}
# Sent when a request names no outputs. logit_error_bound (K values a sample, as many as the
# logits) only when named: error_bound and label_proven already say what most clients need.
DEFAULT_OUTPUTS = tuple(n for n in OUTPUT_TYPES if n != "logit_error_bound")
# Each datatype's little-endian numpy type in raw bytes (binary tensor data extension: BOOL
# is one byte, 1 or 0).
RAW_DTYPES = {"FP32": "<f4", "INT64": "<i8", "INT32": "<i4", "BOOL": "u1"}


def finite(value: Any) -> Any:
    """Replace non-finite floats anywhere in a JSON-like value by ``None``; values that are
    not JSON types become their ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def render_json(content: Any) -> bytes:
    """``content`` as compact UTF-8 JSON (what Starlette's ``JSONResponse`` sends), by
    orjson: the inference answers are on the request path. Floats are written shortest
    round-trip, as ``json.dumps`` writes them (``1e-5`` where it writes ``1e-05``).

    Raises:
        orjson.JSONEncodeError: a value JSON cannot hold; non-finite floats are for
            :func:`finite` to turn into ``None`` first (orjson would write them as ``null``
            silently).
    """
    return orjson.dumps(content)


class AnswerResponse(JSONResponse):
    """A ``JSONResponse`` rendered by :func:`render_json` (the V2 inference answers)."""

    def render(self, content: Any) -> bytes:
        return render_json(content)


def json_list(t: torch.Tensor) -> list:
    """Tensor → nested list of its shape; non-finite floats become ``None``."""
    values = t.tolist()
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        values = finite(values)
    return values


def solver_info(ans: Answer) -> dict:
    """The solve's settings and costs: ``alpha``, ``method``, ``tol``, ``max_iter``, ``stop``
    and ``logit_tol`` (``None`` unless ``stop`` is ``"logits"``), ``queue_ms`` (waited before
    the batch started), ``solve_ms`` (the batch's solve) and ``batch_size`` (rows in the
    batch, this request's included)."""
    i = ans.info
    return {
        "alpha": i["alpha"],
        "method": i["method"],
        "tol": i["tol"],
        "max_iter": i["max_iter"],
        "stop": i["stop"],
        "logit_tol": i["logit_tol"],
        "queue_ms": round(ans.queue_s * 1000, 3),
        "solve_ms": round(i["solve_s"] * 1000, 3),
        "batch_size": ans.batch_rows,
    }


def v2_outputs(ans: Answer, wanted: list[str]) -> list[dict]:
    """The V2 response's ``outputs`` (Open Inference Protocol, "Response JSON Object"):
    one flat row-major tensor per name in ``wanted`` (keys of :data:`OUTPUT_TYPES`)."""
    outputs = []
    for name in wanted:
        t = ans.rows[name]
        outputs.append(
            {
                "name": name,
                "shape": list(t.shape),
                "datatype": OUTPUT_TYPES[name],
                "data": json_list(t.flatten()),
            }
        )
    return outputs


def output_bytes(t: torch.Tensor, datatype: str) -> bytes:
    """A tensor's values as the raw bytes of ``datatype`` (a key of :data:`RAW_DTYPES`):
    little-endian, row-major, no padding; BOOL one byte each (1 true, 0 false). Open
    Inference Protocol, binary tensor data extension; the same bytes as gRPC's
    ``raw_output_contents``. ``len`` is ``numel × element size`` (4, 8, 4, 1).

    Raises:
        KeyError: for a datatype outside :data:`RAW_DTYPES`.
    """
    arr = t.detach().cpu().contiguous().numpy()
    return arr.astype(RAW_DTYPES[datatype], copy=False).tobytes()


def v2_binary_outputs(ans: Answer, wanted: list[tuple[str, bool]]) -> tuple[list[dict], bytes]:
    """The V2 response's ``outputs`` when some go as binary data, and those outputs' bytes
    in order (binary tensor data extension, "Binary Tensor Response").

    Args:
        wanted: ``(name, binary)`` per output, in the answer's order.

    Returns:
        ``(outputs, tail)``: a binary output has no ``data`` but ``parameters``
        ``{"binary_data_size": n}``; ``tail`` joins their bytes (:func:`output_bytes`).
    """
    outputs, parts = [], []
    for name, binary in wanted:
        t = ans.rows[name]
        out: dict[str, Any] = {"name": name, "shape": list(t.shape), "datatype": OUTPUT_TYPES[name]}
        if binary:
            raw = output_bytes(t, OUTPUT_TYPES[name])
            out["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            out["data"] = json_list(t.flatten())
        outputs.append(out)
    return outputs, b"".join(parts)


def predictions(served: ServedModel, ans: Answer, top_k: int) -> list[dict]:
    """The friendly API's per-sample answers: the best class, the ``min(top_k, K)`` best
    with their probabilities, and the sample's ``iterations``, ``residual`` (relative
    fixed-point residual), ``converged``, ``certified_radius`` (ℓ2, in normalised-input
    units; ``None`` when withheld), ``error_bound`` (on ‖ĉ − z*‖; ``None`` when the solve
    diverged) and ``label_proven`` (docs/math.md §9)."""
    r = ans.rows
    k = min(top_k, len(served.class_names))
    probs, idx = r["probabilities"].topk(k, dim=1)
    preds = []
    for i in range(r["label"].shape[0]):
        tops = [
            {"label": j, "class_name": served.class_names[j], "probability": p}
            for j, p in zip(idx[i].tolist(), probs[i].tolist(), strict=True)
        ]
        preds.append(
            {
                **tops[0],
                "top_k": tops,
                "iterations": int(r["iterations"][i]),
                "residual": finite(float(r["residual"][i])),
                "converged": bool(r["converged"][i]),
                "certified_radius": finite(float(r["certified_radius"][i])),
                "error_bound": finite(float(r["error_bound"][i])),
                "label_proven": bool(r["label_proven"][i]),
            }
        )
    return preds
