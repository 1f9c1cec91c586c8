"""Two extensions of the Open Inference Protocol that Triton's clients call, as Triton
defines them: statistics and the model repository.

* Statistics (public, like ``/metrics``): ``GET /v2/models/stats`` (every loaded version),
  ``GET /v2/models/{name}/stats`` (each version of one model),
  ``GET /v2/models/{name}/versions/{version}/stats``. The counters are
  :class:`service.stats.ModelStats`.
* Model repository (behind the admin token): ``POST /v2/repository/index`` (every version on
  disk with its state), ``POST /v2/repository/models/{name}/load`` (the admin reload:
  :meth:`Repository.load`) and ``.../unload`` (:meth:`Repository.unload`).

``create_app`` includes :data:`router` (statistics) before the per-model V2 paths, so that
``/v2/models/stats`` is not read as the metadata of a model named ``stats``, and
:data:`repository_router` (the model repository) with the admin token check first.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .. import schemas
from ..decoding import optional_json_body
from ..deps import Admin, RuntimeDep
from ..errors import ApiError
from ..openapi import ADMIN_ERRORS, ERRORS, UNLOADED_WHILE_LOADING, body_doc
from ..repository import NotFound, NotReady, Repository, Unloaded, scan
from ..stats import empty_snapshot

router = APIRouter(tags=["v2 extensions"])
repository_router = APIRouter(tags=["v2 extensions"])
ADMIN_RESPONSES = {**ADMIN_ERRORS, 400: ERRORS[400], 415: ERRORS[415], 503: ERRORS[503]}
# A version's load state as the repository extension names it.
STATES = {"ready": "READY", "loading": "LOADING", "pending": "LOADING", "failed": "UNAVAILABLE"}


# ---- statistics -------------------------------------------------------------------------------


def model_stats(repo: Repository, name: str | None = None, version: str | None = None) -> dict:
    """``{"model_stats": [...]}``: one ``$model_stat`` per version of every model (``name``
    ``None``), of ``name``, or of ``name``'s ``version``. A version that is not loaded
    (loading, failed) counts nothing.

    Raises:
        ApiError: 404 for an unknown (or unloaded) model or version.
    """
    if name is None:
        entries = [e for n in repo.names() for e in repo.versions(n)]
    else:
        try:
            repo.entry(name, version)
        except NotFound as e:
            raise ApiError(404, str(e)) from None
        except NotReady:
            pass  # known, not serving: its counters are zero
        entries = repo.versions(name)
        if version is not None:
            entries = [e for e in entries if e.version == int(version)]
    stats = [
        e.served.stats.snapshot(e.name, str(e.version))
        if e.served is not None
        else empty_snapshot(e.name, str(e.version))
        for e in entries
    ]
    return {"model_stats": stats}


@router.get(
    "/v2/models/stats",
    name="v2_stats",
    response_model=schemas.StatsResponse,
    summary="Statistics of every model",
)
async def all_stats(runtime: RuntimeDep):
    """Statistics extension: every version of every model, since it was loaded."""
    return JSONResponse(model_stats(runtime.repository()))


@router.get(
    "/v2/models/{name}/stats",
    name="v2_stats",
    response_model=schemas.StatsResponse,
    responses={404: ERRORS[404]},
    summary="Statistics of a model",
)
async def stats(name: str, runtime: RuntimeDep):
    """Statistics extension: each version of ``name`` (docs/service.md says what each
    counter counts); 404 for an unknown model."""
    return JSONResponse(model_stats(runtime.repository(), name))


@router.get(
    "/v2/models/{name}/versions/{version}/stats",
    name="v2_stats",
    response_model=schemas.StatsResponse,
    responses={404: ERRORS[404]},
    summary="Statistics of a model",  # the versioned paths' summaries say "(one version)"
)
async def version_stats(name: str, version: str, runtime: RuntimeDep):
    """Statistics extension: one version of ``name``; 404 for an unknown model or version."""
    return JSONResponse(model_stats(runtime.repository(), name, version))


# ---- model repository -------------------------------------------------------------------------


async def repository_index(repo: Repository, ready_only: bool) -> list[dict]:
    """Every ``name/version`` in the model folder or known to the repository, with its state
    (``READY``, ``LOADING`` or ``UNAVAILABLE``) and why it is not ready, by name and
    version; ``ready_only`` keeps the ``READY`` ones."""
    found = await asyncio.to_thread(scan, repo.settings.model_dir)
    rows: dict[tuple[str, int], tuple[str, str]] = {}
    for name, versions in found.items():
        why = "unloaded" if name in repo.unloaded else "not loaded yet (new on disk)"
        for v in versions:
            rows[(name, v)] = ("UNAVAILABLE", why)
    for name in repo.names():
        for e in repo.versions(name):
            state = STATES.get(e.status, "UNAVAILABLE")
            rows[(name, e.version)] = (state, "" if state == "READY" else e.error or e.status)
    return [
        {"name": n, "version": str(v), "state": state, "reason": reason}
        for (n, v), (state, reason) in sorted(rows.items())
        if not ready_only or state == "READY"
    ]


@repository_router.post(
    "/v2/repository/index",
    name="v2_repository_index",
    response_model=list[schemas.RepositoryModel],
    responses=ADMIN_RESPONSES,
    openapi_extra=body_doc(schemas.RepositoryIndexRequest, required=False),
    summary="Model repository index",
)
async def index(request: Request, _admin: Admin, runtime: RuntimeDep):
    """Model repository extension, Index: every version in the model folder, loaded or
    not, with its state; ``{"ready": true}`` lists only those ready to serve."""
    body = await optional_json_body(request, schemas.RepositoryIndexRequest)
    return JSONResponse(await repository_index(runtime.repository(), body.ready))


@repository_router.post(
    "/v2/repository/models/{name}/load",
    name="v2_repository_load",
    responses={**ADMIN_RESPONSES, 409: UNLOADED_WHILE_LOADING},
    openapi_extra=body_doc(schemas.RepositoryLoadRequest, required=False),
    summary="Load a model",
)
async def load(name: str, request: Request, _admin: Admin, runtime: RuntimeDep):
    """Model repository extension, Load: load ``name`` from its folder to pick up what
    changed (as ``POST /v1/models/{name}/reload`` does, without rereading unchanged
    versions); a model unloaded before serves again. 200 once a version serves, with the
    rescan's report.

    Errors: 404 no such model folder; 409 an unload of ``name`` came while it loaded (the
    model stays unloaded); 422 load parameters (``config``, ``file:...``: a model
    is what its folder holds) or no version loaded (each one's error named); 503 with
    ``Retry-After`` while its files are still changing on disk.
    """
    body = await optional_json_body(request, schemas.RepositoryLoadRequest)
    if body.parameters:
        raise ApiError(
            422,
            f"load parameters are not supported (got {sorted(body.parameters)}): a model is "
            "loaded from its folder as it is on disk",
        )
    repo = runtime.repository()
    try:
        report = await repo.load(name, force=False)  # Triton: a load picks up changes
    except NotFound as e:
        raise ApiError(404, str(e)) from None
    except Unloaded as e:  # the later request wins; this one's work was dropped
        raise ApiError(409, str(e)) from None
    if repo.default_entry(name) is None:
        errors = [f"{name}/{e.version}: {e.error or e.status}" for e in repo.versions(name)]
        if report["pending"] and not report["failed"]:
            settle = max(1, round(runtime.settings.settle_s))
            raise ApiError(
                503, f"model {name!r} is still changing on disk: {'; '.join(errors)}",
                {"Retry-After": str(settle)},
            )  # fmt: skip
        raise ApiError(422, f"model {name!r} did not load: {'; '.join(errors) or 'no versions'}")
    return JSONResponse({"model": name, **report})


@repository_router.post(
    "/v2/repository/models/{name}/unload",
    name="v2_repository_unload",
    responses=ADMIN_RESPONSES,
    openapi_extra=body_doc(schemas.RepositoryUnloadRequest, required=False),
    summary="Unload a model",
)
async def unload(name: str, request: Request, _admin: Admin, runtime: RuntimeDep):
    """Model repository extension, Unload: stop serving every version of ``name`` and leave
    it unloaded (the folder poller skips it) until it is loaded again. Queued requests are
    answered; later ones are 404. ``parameters.unload_dependents`` is accepted (no model
    depends on another).

    Errors: 404 unknown model; 422 another parameter.
    """
    body = await optional_json_body(request, schemas.RepositoryUnloadRequest)
    params = dict(body.parameters or {})
    dependents = params.pop("unload_dependents", False)
    if params or not isinstance(dependents, bool):
        bad = sorted(params) or ["unload_dependents (true or false)"]
        raise ApiError(422, f"unsupported unload parameters: {bad}")
    try:
        unloaded = await runtime.repository().unload(name)
    except NotFound as e:
        raise ApiError(404, str(e)) from None
    return JSONResponse({"model": name, "unloaded": unloaded})
