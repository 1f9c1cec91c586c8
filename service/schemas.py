"""Request and response bodies (they also make the OpenAPI document at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt

from model_core import SOLVERS, SolverSettings

# Per-request stopping rule (model_core.models.STOP_RULES, docs/math.md §9).
Stop = Literal["tol", "label", "logits"]
STOP_DESCRIPTION = (
    "when a sample stops iterating: tol (its residual ≤ tol), label (its label is proven to "
    "be the exact equilibrium's) or logits (every logit within logit_tol of the exact "
    "equilibrium's); max_iter caps all three. Default: the server's stop setting"
)
LOGIT_TOL_DESCRIPTION = (
    "absolute logit accuracy of stop=logits (> 0); only with stop=logits. Default: the "
    "server's logit_tol setting"
)

# ---- errors ------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    """Every error: what was wrong, plus validation details where there are some."""

    error: str = Field(description="what was wrong, in words")
    detail: list[dict[str, Any]] | None = Field(None, description="per-field validation errors")


# ---- solver overrides -------------------------------------------------------------------------


class SolverOverrides(BaseModel):
    """Optional per-request solver settings, kept inside the server's bounds
    (``min_tol`` ≤ tol ≤ 1, 1 ≤ max_iter ≤ ``max_iter_cap``, method a registered solver),
    and the stopping rule (``stop``, ``logit_tol``)."""

    model_config = ConfigDict(extra="allow")

    # Strict: JSON ``true`` or ``"3"`` is refused, not read as 1 or 3 (a value is honoured
    # as sent or refused, never guessed at). Finite: a NaN would otherwise be refused as
    # "less than or equal to 1", which sends the client after the wrong fault.
    tol: float | None = Field(
        None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        strict=True,
        description="bound on the true fixed-point residual",
    )
    max_iter: int | None = Field(None, ge=1, strict=True, description="iteration cap")
    method: str | None = Field(
        None,
        description=f"a registered solver: {', '.join(sorted(SOLVERS))}",
        examples=[SolverSettings().method],
    )
    stop: Stop | None = Field(None, description=STOP_DESCRIPTION)
    logit_tol: float | None = Field(
        None, gt=0, allow_inf_nan=False, strict=True, description=LOGIT_TOL_DESCRIPTION
    )


# ---- Open Inference Protocol (KServe V2) ------------------------------------------------------


class InferInput(BaseModel):
    """One input tensor. ``data`` is row-major, flat or nested; or, with the binary tensor
    data extension, no ``data`` and ``parameters.binary_data_size`` bytes after the JSON."""

    name: str = Field(examples=["input"])
    # The spec's shape is int64: "28" or 28.0 is a client bug to name, not a value to coerce.
    shape: list[StrictInt] = Field(description="[B, C, H, W]", examples=[[1, 1, 28, 28]])
    datatype: str = Field(description="must be FP32", examples=["FP32"])
    data: list[Any] | None = Field(
        None,
        description="pixel intensities in [0, 1]; prod(shape) values. Omitted when the "
        "tensor is sent as binary data (parameters.binary_data_size)",
    )
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: bytes of this tensor after the JSON header"
    )


class RequestedOutput(BaseModel):
    name: str = Field(
        description="logits, probabilities, label, iterations, residual, converged, "
        "certified_radius, error_bound, label_proven or logit_error_bound (the last only "
        "when named)"
    )
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data (bool): return this output as binary data"
    )


class InferRequest(BaseModel):
    """``POST /v2/models/{name}/infer``. Solver overrides go in ``parameters``."""

    id: str | None = Field(None, description="echoed in the response")
    parameters: SolverOverrides | None = None
    inputs: list[InferInput] = Field(min_length=1, description="exactly one input tensor")
    outputs: list[RequestedOutput] | None = Field(None, description="subset to return")
    # Whether the JSON held a true/false token (set by decoding.parse_json): only then can
    # pixel data hold a boolean that numpy would read as 1 or 0.
    _json_bools: bool = PrivateAttr(True)


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["FP32", "INT64", "INT32", "BOOL"]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    """``parameters``: α, method, tol, max_iter, stop, logit_tol, queue_ms, solve_ms,
    batch_size. An output sent as binary data has no ``data`` but
    ``parameters.binary_data_size``, and the answer is then ``application/octet-stream``:
    ``Inference-Header-Content-Length`` bytes of this JSON, then the outputs' bytes."""

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any]
    outputs: list[InferOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ReadyBody(BaseModel):
    name: str | None = None
    ready: bool


class LiveBody(BaseModel):
    live: bool


# ---- friendly API -----------------------------------------------------------------------------


class ClassifyRequest(BaseModel):
    """``POST /v1/models/{name}:classify`` as JSON. ``inputs`` holds pixels in [0, 1]:
    ``[H, W]`` (one-channel models), ``[C, H, W]`` or ``[B, C, H, W]``. An unknown field
    is 422: a misspelt ``max_iter`` would otherwise solve with the default unnoticed."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] = Field(description="nested array of pixel intensities in [0, 1]")
    top_k: int = Field(3, ge=1, strict=True, description="classes to return per sample")
    tol: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, strict=True)
    max_iter: int | None = Field(None, ge=1, strict=True)
    method: str | None = None
    stop: Stop | None = Field(None, description=STOP_DESCRIPTION)
    logit_tol: float | None = Field(
        None, gt=0, allow_inf_nan=False, strict=True, description=LOGIT_TOL_DESCRIPTION
    )
    _json_bools: bool = PrivateAttr(True)  # as InferRequest's


class ClassScore(BaseModel):
    label: int
    class_name: str
    probability: float


class Prediction(BaseModel):
    label: int
    class_name: str
    probability: float
    top_k: list[ClassScore]
    iterations: int
    residual: float | None
    converged: bool
    certified_radius: float | None
    error_bound: float | None = Field(
        description="bound on ‖ĉ − z*‖, the distance of the answer's equilibrium point to "
        "the exact one (null: the solve diverged)"
    )
    label_proven: bool = Field(description="the label is provably the exact equilibrium's")


class ClassifyResponse(BaseModel):
    model: str
    version: str
    predictions: list[Prediction]
    solver: dict[str, Any] = Field(
        description="alpha, method, tol, max_iter, stop, logit_tol, queue_ms, solve_ms, batch_size"
    )


class ModelList(BaseModel):
    models: list[dict[str, Any]]


class TuneRequest(BaseModel):
    """``POST /v1/models/{name}/tune-alpha``. An unknown field is 422: a misspelt
    ``"apply": false`` must not switch α in production."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["auto", "recent", "calibration"] = Field(
        "auto", description="auto: recent traffic if any, else the calibration batch"
    )
    # Strict, as every value a client sends: ``"false"``, ``0`` or ``"off"`` are refused, not
    # read as false (a guess that switches α in production when it is wrong), and
    # ``"2"``, ``2.0`` or ``true`` for a version are refused, not read as 2 or 1.
    apply: bool = Field(True, strict=True, description="switch the model to the α found")
    version: int | None = Field(None, ge=1, strict=True, description="default: the default version")


# ---- Open Inference Protocol extensions: statistics, model repository -------------------------


class DurationStat(BaseModel):
    count: int = Field(description="how many")
    ns: int = Field(description="their total duration, in nanoseconds")


class InferenceStats(BaseModel):
    success: DurationStat
    fail: DurationStat
    queue: DurationStat
    compute_input: DurationStat
    compute_infer: DurationStat
    compute_output: DurationStat
    cache_hit: DurationStat
    cache_miss: DurationStat


class BatchStats(BaseModel):
    batch_size: int
    compute_input: DurationStat
    compute_infer: DurationStat
    compute_output: DurationStat


class ModelStat(BaseModel):
    """One model version's counters since it was loaded (docs/service.md)."""

    name: str
    version: str
    last_inference: int = Field(description="milliseconds since the epoch; 0: none yet")
    inference_count: int = Field(description="samples answered")
    execution_count: int = Field(description="batched solves")
    inference_stats: InferenceStats
    response_stats: dict[str, Any]
    batch_stats: list[BatchStats]
    memory_usage: list[Any]


class StatsResponse(BaseModel):
    """``GET /v2/models[/{name}[/versions/{version}]]/stats``."""

    model_stats: list[ModelStat]


class RepositoryIndexRequest(BaseModel):
    """``POST /v2/repository/index``; no body means ``{}``."""

    model_config = ConfigDict(extra="forbid")

    ready: bool = Field(False, strict=True, description="list only the versions ready to serve")


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: Literal["READY", "LOADING", "UNAVAILABLE"]
    reason: str = Field(description="why it is not ready ('' when it is)")


class RepositoryLoadRequest(BaseModel):
    """``POST /v2/repository/models/{name}/load``: no body, ``{}`` or ``{"parameters": {}}``;
    Triton's ``config`` and ``file:`` overrides are refused (422): a model is its folder."""

    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, Any] | None = None


class RepositoryUnloadRequest(BaseModel):
    """``POST /v2/repository/models/{name}/unload``. ``unload_dependents`` is accepted and
    changes nothing: no model here depends on another."""

    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, Any] | None = None


class ReloadRequest(BaseModel):
    """``POST /v1/models/{name}/reload`` takes no parameters: no body, or ``{}``."""

    model_config = ConfigDict(extra="forbid")


MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "an image (PNG, JPEG, ...)"},
        "top_k": {"type": "integer", "minimum": 1, "default": 3},
        "tol": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "max_iter": {"type": "integer", "minimum": 1},
        "method": {"type": "string"},
        "stop": {"type": "string", "enum": ["tol", "label", "logits"]},
        "logit_tol": {"type": "number", "exclusiveMinimum": 0},
        "invert": {
            "type": "boolean",
            "default": False,
            "description": "invert intensities (dark object on a light background)",
        },
    },
}
