"""What FastAPI cannot infer for the OpenAPI document at ``/openapi.json``.

The JSON routes parse their bodies themselves (:func:`service.decoding.parse_json`, for
speed and strictness), so their request bodies are documented here, as are the error
answers each route may give.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from . import schemas

ERRORS = {
    400: {"model": schemas.ErrorBody, "description": "malformed request"},
    404: {"model": schemas.ErrorBody, "description": "unknown model or version"},
    413: {"model": schemas.ErrorBody, "description": "body too large"},
    415: {"model": schemas.ErrorBody, "description": "content type or encoding"},
    422: {"model": schemas.ErrorBody, "description": "invalid input"},
    429: {"model": schemas.ErrorBody, "description": "queue full; see Retry-After"},
    503: {"model": schemas.ErrorBody, "description": "not ready"},
}
ADMIN_ERRORS = {
    401: {"model": schemas.ErrorBody, "description": "missing or wrong bearer token"},
    403: {"model": schemas.ErrorBody, "description": "admin endpoints disabled"},
    404: ERRORS[404],
    409: {"model": schemas.ErrorBody, "description": "a search is running, or no data"},
    422: ERRORS[422],
}
# A load (admin reload, repository load) that an unload of the same model overtook.
UNLOADED_WHILE_LOADING = {
    "model": schemas.ErrorBody,
    "description": "the model was unloaded while it loaded; it stays unloaded",
}
VERSIONED_SUMMARY = " (one version)"  # appended to the summaries of the versioned V2 paths


def body_doc(model: type[BaseModel], more: dict | None = None, required: bool = True) -> dict:
    """``openapi_extra`` documenting a body that the route parses itself: ``model`` is
    referenced from ``components/schemas`` (:func:`customise`), ``more`` adds other media
    types (``{"multipart/form-data": {...}}``)."""
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    return {"requestBody": {"required": required, "content": {**content, **(more or {})}}}


def customise(app: FastAPI, *models: type[BaseModel]) -> None:
    """Wrap ``app.openapi``: add ``models`` (and the models they nest) to the components,
    and mark the summaries of the paths that name a ``{version}``."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in schema.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components.setdefault(model.__name__, schema)
        # One router serves both V2 model paths; the document tells them apart.
        for path, operations in doc.get("paths", {}).items():
            if "{version}" in path:
                for op in operations.values():
                    if "summary" in op and not op["summary"].endswith(VERSIONED_SUMMARY):
                        op["summary"] += VERSIONED_SUMMARY
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
