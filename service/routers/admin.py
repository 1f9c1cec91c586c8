"""Admin endpoints, behind ``Authorization: Bearer $MONDEQ_ADMIN_TOKEN``: the α search
and the reload of a model's folder."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .. import schemas
from ..alpha import NoTuningData, TuningBusy, in_search_thread
from ..decoding import optional_json_body
from ..deps import Admin, RuntimeDep
from ..encoding import finite
from ..errors import ApiError
from ..openapi import ADMIN_ERRORS, ERRORS, UNLOADED_WHILE_LOADING, body_doc
from ..repository import NotFound, Unloaded

router = APIRouter(tags=["admin"])
RESPONSES = {**ADMIN_ERRORS, 400: ERRORS[400], 415: ERRORS[415]}


@router.post(
    "/v1/models/{name}/tune-alpha",
    name="v1_tune_alpha",
    responses=RESPONSES,
    openapi_extra=body_doc(schemas.TuneRequest, required=False),
)
async def tune(name: str, request: Request, _admin: Admin, runtime: RuntimeDep):
    """Run the α search on recent traffic or the calibration batch; returns the curve
    (iterations against α) and, with ``apply``, switches the model to the best α.
    The body (a :class:`schemas.TuneRequest`) is optional.

    Errors: 409 while a search runs or without data to search on, 422 when the search
    cannot run as asked.
    """
    body = await optional_json_body(request, schemas.TuneRequest)
    version = str(body.version) if body.version is not None else None
    served = runtime.served(name, version)
    try:
        out = await in_search_thread(served.tuner.tune, "admin", body.source, body.apply)
    except (TuningBusy, NoTuningData) as e:
        raise ApiError(409, str(e)) from None
    except ValueError as e:
        raise ApiError(422, str(e)) from None
    return JSONResponse(finite({"model": name, "version": str(served.version), **out}))


@router.post(
    "/v1/models/{name}/reload",
    name="v1_reload",
    responses={**RESPONSES, 409: UNLOADED_WHILE_LOADING},
    openapi_extra=body_doc(schemas.ReloadRequest, required=False),
)
async def reload(name: str, request: Request, _admin: Admin, runtime: RuntimeDep):
    """Reread the model's folder: load new versions, reload every version from disk,
    drop removed ones (the V2 repository extension's load does the same; a model it
    unloaded is loaded again). Requests in flight finish on the versions they started on. A file
    still changing stays ``pending``; a reload that fails keeps the loaded weights.
    No body, or ``{}``: a body is read by the JSON rules of every endpoint, so that a
    malformed one is refused (400) rather than ignored."""
    await optional_json_body(request, schemas.ReloadRequest)
    repo = runtime.repository()
    try:
        report = await repo.load(name)
    except NotFound as e:
        raise ApiError(404, str(e)) from None
    except Unloaded as e:
        raise ApiError(409, str(e)) from None
    item = next((m for m in repo.describe() if m["name"] == name), None)
    versions = [
        {k: v.get(k) for k in ("version", "status", "error", "reload")}
        for v in (item["versions"] if item else [])
    ]
    return JSONResponse(
        finite(
            {
                "model": name,
                **report,
                "default_version": item["default_version"] if item else None,
                "versions": versions,
            }
        )
    )
