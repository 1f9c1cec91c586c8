"""Query parameters: a route takes the ones it declares, and a request with any other is
refused (422) naming it and saying where such a setting goes.

Only ``POST /v1/models/{name}:classify`` declares one (``version``). Everything else a
request can set travels in its body: a V2 inference's solver settings in its JSON
``parameters`` object, the friendly API's in its JSON body or form fields, the admin
endpoints' in their JSON bodies. A query parameter the server ignored was a setting the
client believed it had made: ``POST /v2/models/m/infer?tol=1e-4`` solved at the default
``tol``, and its answer looked like any other.

:func:`strict_query` is a dependency of every API route (``create_app`` includes each router
with it, after the admin token check on the admin routers: an unauthenticated request is
401 whatever it carries); the V2 inference hot path (:mod:`service.fastpath`) calls
:func:`refuse_unknown_query` itself. The OpenAPI document and documentation pages are
FastAPI's and keep their own rules.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.dependencies.models import Dependant

from .errors import ApiError

# Where the settings of each route go, for the message (by route name; the default is for
# the routes that take none: metadata, health, statistics, the model list, metrics).
WHERE_SETTINGS_GO = {
    "v2_infer": (
        "solver settings (tol, max_iter, method, stop, logit_tol) go in the JSON body's "
        '"parameters" object, outputs in its "outputs"'
    ),
    "v1_classify": (
        "top_k and the solver settings (tol, max_iter, method, stop, logit_tol) go in the "
        "JSON body, or in form fields beside an uploaded image"
    ),
    "v1_tune_alpha": 'source, apply and version go in the JSON body ({"apply": true})',
    "v1_reload": "it takes no settings",
    "v2_repository_index": 'ready goes in the JSON body ({"ready": true})',
    "v2_repository_load": "it takes no settings",
    "v2_repository_unload": ('unload_dependents goes in the JSON body\'s "parameters" object'),
}
NO_SETTINGS = "it takes no settings"


def declared_query(dependant: Dependant) -> frozenset[str]:
    """The query parameters a route declares (``Query``), in its signature or any of its
    dependencies, by the names a client sends (their aliases)."""
    names: set[str] = set()
    stack = [dependant]
    while stack:
        d = stack.pop()
        names.update(p.alias for p in d.query_params)
        stack.extend(d.dependencies)
    return frozenset(names)


def refuse_unknown_query(
    query_string: bytes, route: str, method: str, path: str, allowed: frozenset[str]
) -> None:
    """Refuse a query string that holds a parameter the route does not take, or one it
    takes given more than once (which did the client mean?). An empty query string passes
    without being parsed.

    Args:
        query_string: the request's raw query (ASGI ``scope["query_string"]``).
        route: the route's name (:data:`WHERE_SETTINGS_GO`).
        method, path: as the client sent them, for the message.
        allowed: the parameters the route declares (:func:`declared_query`).

    Raises:
        ApiError: 422 naming every unknown parameter, what the route takes and where its
            settings go; or naming a parameter given twice.
    """
    if not query_string:
        return
    items = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    names = [k for k, _ in items]
    unknown = sorted(set(names) - allowed, key=names.index)
    if unknown:
        listed = ", ".join(repr(k) for k in unknown)
        takes = (
            f"its only query parameter is {', '.join(repr(k) for k in sorted(allowed))}"
            if allowed
            else "it takes no query parameters"
        )
        raise ApiError(
            422,
            f"unknown query parameter{'s' * (len(unknown) > 1)} {listed} on {method} {path}: "
            f"{takes}; {WHERE_SETTINGS_GO.get(route, NO_SETTINGS)}",
        )
    twice = sorted({k for k in names if names.count(k) > 1})
    if twice:
        raise ApiError(422, f"query parameter {twice[0]!r} is given more than once: send it once")


async def strict_query(request: Request) -> None:
    """Dependency: :func:`refuse_unknown_query` for the route the request matched.

    Raises:
        ApiError: 422 for a query parameter the route does not take, or one given twice.
    """
    query_string = request.scope.get("query_string", b"")
    if not query_string:  # nearly every request: nothing to look up
        return
    route = request.scope["route"]
    # Less the path's parameters: a router's route declared under an included prefix
    # (/v2/models/{name}) reads {name} as a query parameter of its own path ("").
    allowed = declared_query(route.dependant) - request.path_params.keys()
    refuse_unknown_query(query_string, route.name, request.method, request.url.path, allowed)
