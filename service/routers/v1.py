"""The friendly API: the model list, and ``:classify`` for JSON pixel arrays or an image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from .. import schemas
from ..decoding import classify_pixels, json_body, solve_key, upload_pixels
from ..deps import RuntimeDep
from ..encoding import finite, predictions, solver_info
from ..errors import ApiError
from ..openapi import ERRORS, body_doc
from ..runtime import solve

router = APIRouter(tags=["v1"])


@router.get("/v1/models", name="v1_models", response_model=schemas.ModelList)
async def list_models(runtime: RuntimeDep):
    """Every model: versions, architecture, parameters, input spec, class names,
    accuracy (card.json), α, tol, Lipschitz bound and load status."""
    return JSONResponse(finite({"models": runtime.repository().describe()}))


@router.post(
    "/v1/models/{name}:classify",
    name="v1_classify",
    response_model=schemas.ClassifyResponse,
    responses={**ERRORS, 415: {"model": schemas.ErrorBody, "description": "content type"}},
    openapi_extra=body_doc(
        schemas.ClassifyRequest, {"multipart/form-data": {"schema": schemas.MULTIPART_SCHEMA}}
    ),
)
async def classify(
    name: str,
    request: Request,
    runtime: RuntimeDep,
    version: Annotated[str | None, Query(description="default: the default version")] = None,
):
    """Classify JSON pixel arrays or an uploaded image (decoded, converted and resized
    to the model's input). Returns the top-k classes and the solver stats."""
    served = runtime.served(name, version)
    settings = runtime.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        x, top_k, key = await upload_pixels(request, served, settings.max_image_pixels)
    elif ctype == "application/json" or ctype.endswith("+json"):
        req = await json_body(request, schemas.ClassifyRequest, "")
        key = solve_key(served, req)
        x = classify_pixels(
            served, req.inputs, settings.max_request_batch, may_hold_bools=req._json_bools
        )
        top_k = req.top_k
    else:
        raise ApiError(
            415,
            f"content type {ctype or '(none)'!r}: send application/json or "
            "multipart/form-data with a 'file' field",
        )
    ans = await solve(served, x, key)
    return JSONResponse(
        {
            "model": served.name,
            "version": str(served.version),
            "predictions": predictions(served, ans, top_k),
            "solver": solver_info(ans),
        }
    )
