"""Route dependencies as ``Annotated`` aliases: a route's signature lists what it needs.

* :data:`RuntimeDep`: the app's :class:`Runtime` (settings, metrics, repository).
* :data:`ModelVersion`: the ``{version}`` path segment, ``None`` on the unversioned paths.
* :data:`Served`: the model version a V2 path names, or 404/503.
* :data:`Admin`: the admin bearer token check (403 when disabled, 401 when wrong).

Every dependency is ``async``: none blocks, and the repository is only touched from the
event loop.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .engine import ServedModel
from .errors import ApiError
from .runtime import Runtime

bearer = HTTPBearer(auto_error=False, description="MONDEQ_ADMIN_TOKEN")


async def get_runtime(request: Request) -> Runtime:
    """The :class:`Runtime` that ``create_app`` put on ``app.state``."""
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def declare_version(version: Annotated[str, Path()]) -> None:
    """Declares (and documents) the ``{version}`` path parameter: a router dependency of the
    versioned V2 paths (Open Inference Protocol: ``/v2/models/{name}/versions/{version}``)."""


async def model_version(request: Request) -> str | None:
    """The ``{version}`` path segment, or ``None`` on a path without one (the default
    version: the highest one ready)."""
    return request.path_params.get("version")


ModelVersion = Annotated[str | None, Depends(model_version)]


async def served_model(name: str, version: ModelVersion, runtime: RuntimeDep) -> ServedModel:
    """The model version ``{name}`` (and ``{version}``, when the path has one) names.

    Raises:
        ApiError: 404 for an unknown model or version, 503 when it cannot serve.
    """
    return runtime.served(name, version)


Served = Annotated[ServedModel, Depends(served_model)]


async def require_admin(
    runtime: RuntimeDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Check ``Authorization: Bearer <MONDEQ_ADMIN_TOKEN>`` in constant time. It runs before
    the body is read: an unauthenticated client learns nothing else.

    Raises:
        ApiError: 403 when no admin token is set (admin endpoints disabled), 401 with
            ``WWW-Authenticate: Bearer`` for a missing or wrong token.
    """
    token = runtime.settings.admin_token
    expected = token.get_secret_value() if token else ""
    if not expected:
        raise ApiError(403, "admin endpoints are disabled: set MONDEQ_ADMIN_TOKEN")
    given = creds.credentials if creds is not None else ""
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


Admin = Annotated[None, Depends(require_admin)]
