"""The Open Inference Protocol (KServe V2 REST): server metadata, health, and per model
metadata, readiness and inference.

:data:`router` holds the server-wide paths under ``/v2``. :data:`model_router` holds the
per-model paths relative to a model's prefix; ``create_app`` includes it twice, under
``/v2/models/{name}`` (the default version: the highest one ready) and under
``/v2/models/{name}/versions/{version}``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from model_core import __version__

from .. import schemas
from ..decoding import (
    HEADER_LENGTH,
    INPUT_NAME,
    infer_body,
    requested_outputs,
    solve_key,
    v2_pixels,
)
from ..deps import ModelVersion, RuntimeDep, Served
from ..encoding import (
    OUTPUT_TYPES,
    AnswerResponse,
    render_json,
    solver_info,
    v2_binary_outputs,
    v2_outputs,
)
from ..errors import ApiError, error_response
from ..openapi import ERRORS, body_doc
from ..repository import NotFound, NotReady
from ..runtime import Runtime, solve

SERVER_NAME = "mondeq"
PLATFORM = "mondeq_pytorch"
# The protocol extensions served (Server Metadata's "extensions", as Triton names them).
EXTENSIONS = ("binary_tensor_data", "statistics", "model_repository")
PER_SAMPLE_OUTPUTS = (
    "label",
    "iterations",
    "residual",
    "converged",
    "certified_radius",
    "error_bound",
    "label_proven",
)

router = APIRouter(prefix="/v2", tags=["v2"])
model_router = APIRouter(tags=["v2"])


@router.get("", name="v2_server", response_model=schemas.ServerMetadata)
async def server_metadata():
    """Server metadata (V2 "Server Metadata"): name, version and the extensions served:
    binary tensor data, statistics and the model repository."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


@router.get("/health/live", name="v2_live", response_model=schemas.LiveBody)
async def live():
    """The process is up (V2 "Server Live")."""
    return {"live": True}


@router.get(
    "/health/ready",
    name="v2_ready",
    response_model=schemas.ReadyBody,
    responses={503: ERRORS[503]},
    response_model_exclude_none=True,
)
async def ready(runtime: RuntimeDep):
    """Ready when the first load is done and some model can serve (V2 "Server Ready");
    otherwise 503 ``{"error": "not ready: <why>", "ready": false}``."""
    repo = runtime.repo
    if repo is not None and repo.ready:
        return {"ready": True}
    if repo is None or not repo.initial_load_done:
        why = "models are loading"
    elif repo.closing:
        why = "shutting down"
    else:
        why = f"no model ready in {runtime.settings.model_dir}"
    return error_response(503, f"not ready: {why}", ready=False)


@model_router.get(
    "",
    name="v2_model",
    response_model=schemas.ModelMetadata,
    responses=ERRORS,
    summary="Model metadata",
)
async def model_metadata(name: str, version: ModelVersion, served: Served, runtime: RuntimeDep):
    """Model metadata (V2 "Model Metadata"): the versions that can serve (the one named, on
    a versioned path), the input ``[-1, C, H, W]`` FP32, and the outputs with their
    datatypes and shapes (``[-1, K]`` for logits, probabilities and logit_error_bound,
    ``[-1]`` per sample)."""
    if version:
        versions = [str(served.version)]  # the version's one spelling, as answers give it
    else:
        entries = runtime.repository().versions(name)
        versions = [str(e.version) for e in entries if e.status == "ready"]
    k = len(served.class_names)
    return {
        "name": name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *served.shape]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, k]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            *({"name": n, "datatype": OUTPUT_TYPES[n], "shape": [-1]} for n in PER_SAMPLE_OUTPUTS),
            {"name": "logit_error_bound", "datatype": "FP32", "shape": [-1, k]},
        ],
    }


@model_router.get(
    "/ready",
    name="v2_model_ready",
    response_model=schemas.ReadyBody,
    responses=ERRORS,
    summary="Model readiness",
)
async def model_ready(name: str, version: ModelVersion, runtime: RuntimeDep):
    """Model readiness (V2 "Model Ready"): ``{"name", "ready": true}``; 503 with
    ``"ready": false`` and why while it cannot serve; 404 for an unknown model or version."""
    try:
        runtime.repository().entry(name, version)
    except NotFound as e:
        raise ApiError(404, str(e)) from None
    except NotReady as e:
        return error_response(503, str(e), name=name, ready=False)
    return {"name": name, "ready": True}


@model_router.post(
    "/infer",
    name="v2_infer",
    response_model=schemas.InferResponse,
    responses=ERRORS,
    openapi_extra=body_doc(schemas.InferRequest),
    summary="Inference",
)
async def infer(name: str, request: Request, runtime: RuntimeDep):
    """Inference (V2 "Inference Request/Response JSON Object"): one FP32 input
    ``[B, C, H, W]`` of pixels in [0, 1]; ``parameters`` may set ``method``, ``tol``,
    ``max_iter``, ``stop`` and ``logit_tol``; ``outputs`` picks among :data:`OUTPUT_TYPES`
    (default: :data:`DEFAULT_OUTPUTS`, all but ``logit_error_bound``). The answer's
    ``parameters`` carry the solver's settings and timings.

    Binary tensor data extension: with an ``Inference-Header-Content-Length`` header the
    input may follow the JSON as raw little-endian bytes (``parameters.binary_data_size``);
    outputs flagged ``binary_data`` (or all, with the request's ``binary_data_output``) come
    back as raw bytes after the JSON, whose length the answer's
    ``Inference-Header-Content-Length`` gives.

    Errors: 400 malformed JSON or binary framing, 415 content type, 422 invalid input or
    parameters, 429 queue full (``Retry-After``), 503 not ready; 404 unknown model or version.
    """
    return await infer_answer(name, request.path_params.get("version"), request, runtime)


async def infer_answer(
    name: str, version: str | None, request: Request, runtime: Runtime
) -> Response:
    """The answer to a V2 inference request for model ``name`` (``version``: ``None`` for the
    default version), as :func:`infer` documents it: the FastAPI route and the hot path
    (:class:`service.fastpath.InferRoute`) both answer with this.

    Raises:
        ApiError: 404 unknown model or version, 503 not ready (checked before the
            body is read); then the body's and the solve's errors.
        RequestValidationError: 422 for JSON of the wrong shape.
    """
    served = runtime.served(name, version)
    body, raw = await infer_body(request)
    key = solve_key(served, body.parameters)
    wanted = requested_outputs(body)
    x = v2_pixels(
        served,
        body.inputs,
        runtime.settings.max_request_batch,
        raw,
        may_hold_bools=body._json_bools,
    )
    ans = await solve(served, x, key)
    head = {
        "model_name": name,
        "model_version": str(served.version),
        "id": body.id,
        "parameters": solver_info(ans),
    }
    if not any(binary for _, binary in wanted):
        return AnswerResponse({**head, "outputs": v2_outputs(ans, [n for n, _ in wanted])})
    outputs, tail = v2_binary_outputs(ans, wanted)
    header = render_json({**head, "outputs": outputs})  # as the JSON answer renders
    return Response(
        header + tail,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )
