"""The request path's hot route, V2 inference, answered without FastAPI's per-request machinery.

``POST /v2/models/{name}/infer`` (and ``.../versions/{version}/infer``) is nearly every request
a busy server gets, and in one process it shares a core with the solver. Through FastAPI, each
such request passes FastAPI's telemetry check, Starlette's route table, dependency resolution
(which builds the query parameters and runs four dependency functions) and four
exception-handling layers before the route's own work starts: on the 2-core machine that was
about two thirds of the event loop's time per request at saturation, and the event loop, not
the solver, was what bounded the rate.

:class:`InferRoute` is an ASGI middleware that matches those two paths itself and answers them
with the route's own function (:func:`service.routers.v2.infer_answer`), raising and rendering
exactly the errors the FastAPI route does. Every other request goes to FastAPI unchanged, and the
FastAPI route stays registered (the OpenAPI document describes it, and it answers identically).
"""

from __future__ import annotations

import re

from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError, error_response, internal_error, validation_error
from .middleware import route_path
from .query import refuse_unknown_query
from .routers.v2 import infer_answer
from .runtime import Runtime

# The two inference paths of the Open Inference Protocol, as Starlette's ``{param}`` converter
# matches them: a segment is anything but "/" (the ASGI path is already percent-decoded).
INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
NO_QUERY: frozenset[str] = frozenset()  # the query parameters V2 inference takes


class InferRoute:
    """Pure ASGI middleware: answers V2 inference requests without entering FastAPI.

    It sits inside :class:`~service.middleware.Guard` (which has read the body, enforced the
    HTTP rules and counts the request) and outside FastAPI, in the app's front
    (:class:`service.app.App`). A match sets ``scope["route"]``
    and ``scope["path_params"]`` as Starlette's router would, so the request metrics label it
    ``endpoint="v2_infer"`` with its model.

    Errors are the FastAPI route's: :class:`~service.errors.ApiError` with its status and
    headers, a body of the wrong shape 422 with FastAPI's ``detail``, anything unexpected
    500 (logged), each as the exception handlers of :mod:`service.errors` render them.
    """

    def __init__(self, app: ASGIApp, *, runtime: Runtime, route: BaseRoute):
        """Args:
        app: the FastAPI app, for every other request.
        runtime: the app's runtime (settings, repository).
        route: the FastAPI route ``v2_infer`` (named in ``scope["route"]`` for the metrics).
        """
        self.app, self.runtime, self.route = app, runtime, route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.fullmatch(route_path(scope))
        if match is None:
            await self.app(scope, receive, send)
            return
        name, version = match["name"], match["version"]
        scope["route"] = self.route
        scope["path_params"] = {"name": name} if version is None else match.groupdict()
        request = Request(scope, receive)
        try:
            query = scope.get("query_string")
            if query:  # as the route's strict_query dependency, before all the route does
                refuse_unknown_query(query, "v2_infer", "POST", request.url.path, NO_QUERY)
            response = await infer_answer(name, version, request, self.runtime)
        except ApiError as e:
            response = error_response(e.status, e.message, e.headers)
        except RequestValidationError as e:
            response = await validation_error(request, e)
        except Exception as e:  # the FastAPI app's last-resort handler, as there
            response = await internal_error(request, e)
        await response(scope, receive, send)
