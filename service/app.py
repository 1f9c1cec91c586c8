"""The FastAPI application: ``create_app(settings)`` wires the routers together.

Routes: the Open Inference Protocol (KServe V2) under ``/v2``, the friendly API and the
admin endpoints under ``/v1``, Prometheus at ``/metrics``, OpenAPI docs at ``/docs``.
Models load in the lifespan (in the background: ``/v2/health/ready`` says 503 until they
have); nothing loads at import time. Every error is a JSON body ``{"error": "..."}``.
The lifespan also serves the Open Inference Protocol over gRPC on ``settings.grpc_port``
(:mod:`service.grpc`, in the same event loop; ``app.state.grpc``), unless that is 0.

Where things live: routes in :mod:`service.routers` (one module per topic), what they
depend on in :mod:`service.deps`, request parsing in :mod:`service.decoding`, answers in
:mod:`service.encoding`, errors in :mod:`service.errors`, the HTTP rules and request
metrics in :mod:`service.middleware`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from model_core import __version__
from model_core.runtime import tune_allocator

from . import schemas
from .deps import declare_version, require_admin
from .errors import install_exception_handlers
from .fastpath import InferRoute
from .metrics import Metrics
from .middleware import Guard
from .openapi import customise
from .query import strict_query
from .repository import Repository
from .routers import admin, extensions, ops, v1, v2
from .runtime import Runtime
from .settings import Settings


class App(FastAPI):
    """FastAPI with a front: ASGI layers that every HTTP request passes before FastAPI itself
    (its per-request telemetry check, its middleware, the app's added middleware, the routes).

    ``front`` (set by :func:`create_app`) wraps FastAPI's own ``__call__``. The inference hot
    path sits there, so that its requests skip the layers it has no use for: it renders its
    own errors, as the app's exception handlers would.
    """

    front: Callable[[ASGIApp], ASGIApp] | None = None
    _fronted: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is None or scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        if self._fronted is None:
            self._fronted = self.front(super().__call__)
        scope["app"] = self
        await self._fronted(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    repository: Callable[[Settings, Metrics], Repository] = Repository,
    hot_path: bool = True,
    share_grpc_port: bool = False,
) -> App:
    """Build the app. Models load when its lifespan starts, not here.

    Every request passes :class:`~service.middleware.Guard` (HTTP rules, the body, request
    metrics), then V2 inference is answered by :class:`~service.fastpath.InferRoute` and
    everything else by FastAPI (its middleware, any added with ``add_middleware``, routes).

    Args:
        settings: defaults to ``Settings()`` (the ``MONDEQ_*`` environment).
        repository: builds the repository in the lifespan from the settings and the app's
            metrics (a worker of ``--workers N`` passes :class:`~service.frontend.
            WorkerRepository`, the solver process's repository seen from a worker).
        hot_path: ``False`` sends V2 inference through the FastAPI route too (the answers are
            the same; tests compare the two).
        share_grpc_port: gRPC listens with ``SO_REUSEPORT`` (the workers of ``--workers N``
            all serve the one port, :class:`~service.grpc.server.GrpcServer`).
    """
    settings = settings or Settings()
    runtime = Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tune_allocator()  # also when uvicorn, not `mondeq serve`, started the process
        grpc_front = app.state.grpc = None
        if settings.grpc_port:  # imported only when on: see service.grpc
            from .grpc.server import GrpcServer

            grpc_front = app.state.grpc = GrpcServer(runtime, share_port=share_grpc_port)
            await grpc_front.start()  # before the models load: a taken port fails at once
        runtime.repo = repository(settings, runtime.metrics)
        await runtime.repo.start()
        try:
            yield
        finally:
            if grpc_front is not None:  # its calls in flight are answered before the queues close
                await grpc_front.stop()
            await runtime.repo.close()

    app = App(
        title="mondeq",
        version=__version__,
        description="Monotone operator equilibrium networks: classification with per-sample "
        "solver statistics. Open Inference Protocol under /v2, friendly API under /v1.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    install_exception_handlers(app)

    # Every route refuses query parameters it does not declare (service.query); the admin
    # routes check the token first, so an unauthenticated request is 401 whatever it carries.
    query, admin_first = [Depends(strict_query)], [Depends(require_admin), Depends(strict_query)]
    included = [  # (router, prefix, dependencies), in the router's order
        (v2.router, "", query),
        (extensions.router, "", query),  # before /v2/models/{name}: /v2/models/stats
        (extensions.repository_router, "", admin_first),
        (v2.model_router, "/v2/models/{name}", query),
        (
            v2.model_router,
            "/v2/models/{name}/versions/{version}",
            [Depends(declare_version), *query],
        ),
        (v1.router, "", query),
        (admin.router, "", admin_first),
        (ops.router, "", query),
    ]
    for router, prefix, dependencies in included:
        app.include_router(router, prefix=prefix, dependencies=dependencies)
    infer_route = next(r for r in v2.model_router.routes if getattr(r, "name", None) == "v2_infer")
    docs = (app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url)

    def front(fastapi: ASGIApp) -> ASGIApp:
        inner = InferRoute(fastapi, runtime=runtime, route=infer_route) if hot_path else fastapi
        return Guard(
            inner,
            max_body=settings.max_body_bytes,
            grace_s=settings.graceful_timeout_s,
            metrics=runtime.metrics,
            names=runtime.names,
            docs_paths=[p for p in docs if p],
            routes=[
                (compile_path(prefix + r.path)[0], r.name)
                for router, prefix, _ in included
                for r in router.routes
                if isinstance(r, APIRoute)
            ],
        )

    app.front = front
    customise(
        app,
        schemas.InferRequest,
        schemas.ClassifyRequest,
        schemas.TuneRequest,
        schemas.ReloadRequest,
        schemas.RepositoryIndexRequest,
        schemas.RepositoryLoadRequest,
        schemas.RepositoryUnloadRequest,
    )
    return app
