"""Errors: every one is answered as a JSON body ``{"error": "..."}`` (schema ``ErrorBody``).

Routes raise :class:`ApiError`; :func:`install_exception_handlers` turns it, Starlette's
404/405, request validation errors and anything unexpected into that body with the right
status and headers.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .encoding import finite

log = logging.getLogger("mondeq.service")

HEAD_SCOPE_KEY = "mondeq.head"  # set on the scope of a HEAD request served as GET
METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


# Retry-After (seconds) of a 503 that a shutdown caused: the request may go again at once to
# another replica, or here once the server is back; a load balancer has stopped sending here.
SHUTDOWN_RETRY_AFTER = "1"


def grace_ran_out(grace_s: float) -> str:
    """The words of a request the server stopped holding because its shutdown grace
    (``graceful_timeout_s``, ``grace_s`` seconds) ran out: answered 503 over HTTP and
    ``UNAVAILABLE`` over gRPC, both with :data:`SHUTDOWN_RETRY_AFTER`."""
    return (
        f"the server is shutting down and its grace period (graceful_timeout_s, {grace_s:g} s) "
        "ran out before this request was answered; send it again (another replica, or this "
        "server once it is back)"
    )


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with HTTP ``status`` and ``headers``.

    Args:
        status: the HTTP status code (4xx for what the client sent, 503 while not ready).
        message: what was wrong, in words; the body's ``error`` field.
        headers: extra response headers (``Retry-After`` on 429, ``WWW-Authenticate`` on 401).
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The JSON answer ``{"error": message, **extra}`` with ``status`` and ``headers``."""
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def allowed_methods(allow: str) -> list[str]:
    """The ``Allow`` header's methods (RFC 9110 §10.2.1) in a stable order, with ``HEAD``
    wherever ``GET`` is (the :class:`~service.middleware.Guard` answers it).

    Args:
        allow: a comma-separated method list, as Starlette's 405 carries it.
    """
    methods = {m.strip().upper() for m in allow.split(",") if m.strip()}
    if "GET" in methods:
        methods.add("HEAD")
    last = len(METHOD_ORDER)
    return sorted(methods, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else last, m))


def summarise_validation(errors: list[dict]) -> tuple[str, list[dict]]:
    """Pydantic/FastAPI validation errors → ``(message, detail)``.

    ``message`` names the first error's location and text, and how many more there are
    (``"invalid request: body.top_k: ... (and 2 more)"``); ``detail`` lists every error as
    ``{"loc": [str, ...], "msg": str, "type": str}``.
    """
    detail = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        detail.append({"loc": loc, "msg": str(err.get("msg", "")), "type": str(err.get("type"))})
    if not detail:
        return "invalid request", detail
    first = detail[0]
    where = ".".join(first["loc"])
    more = f" (and {len(detail) - 1} more)" if len(detail) > 1 else ""
    return f"invalid request: {where}: {first['msg']}{more}", detail


async def api_error(request: Request, e: ApiError) -> JSONResponse:
    """:class:`ApiError` → its status, message and headers."""
    return error_response(e.status, e.message, e.headers)


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Starlette's routing errors: 404 names the path; 405 names the method and lists the
    allowed ones in the body and in ``Allow`` (``HEAD`` beside ``GET``). The text never
    names ``HEAD`` for a 404, so a ``HEAD`` answer carries ``GET``'s Content-Length."""
    detail = e.detail if isinstance(e.detail, str) else json.dumps(finite(e.detail))
    headers = dict(getattr(e, "headers", None) or {})
    method = "HEAD" if request.scope.get(HEAD_SCOPE_KEY) else request.method
    if e.status_code == 404 and detail == "Not Found":
        detail = f"no such path: {request.url.path}"
    elif e.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(headers.get("Allow", "")))
        detail = f"method {method} not allowed on {request.url.path}; allowed: {headers['Allow']}"
    return error_response(e.status_code, detail, headers or None)


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    """Bytes that are not JSON are malformed (400); JSON of the wrong shape is invalid (422,
    with ``detail`` from :func:`summarise_validation`)."""
    errors = list(e.errors())
    bad = next((err for err in errors if err.get("type") == "json_invalid"), None)
    if bad is not None:
        return error_response(400, f"malformed JSON body ({bad.get('msg')})")
    message, detail = summarise_validation(errors)
    return error_response(422, message, detail=detail)


async def internal_error(request: Request, e: Exception) -> JSONResponse:
    """Anything unexpected: logged with its traceback, answered 500 naming only its type."""
    log.exception("unhandled error on %s", request.url.path)
    return error_response(500, f"internal server error ({type(e).__name__})")


def install_exception_handlers(app: FastAPI) -> None:
    """Register the handlers above on ``app``."""
    app.add_exception_handler(ApiError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, internal_error)
