"""The ASGI middleware every request passes: :class:`Guard` (HTTP rules and request metrics)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Collection
from types import SimpleNamespace

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import HEAD_SCOPE_KEY, SHUTDOWN_RETRY_AFTER, error_response, grace_ran_out
from .metrics import ENDPOINTS, Metrics

log = logging.getLogger("mondeq.service")

CLOSE = {"Connection": "close"}


def route_path(scope: Scope) -> str:
    """The request's path below the app's ``root_path`` (a proxy's prefix: uvicorn
    ``--root-path`` puts it in front of every path), as Starlette's router matches it."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


class Guard:
    """Pure ASGI middleware: the HTTP rules every route shares, and the request metrics.

    * ``HEAD`` is answered as ``GET`` without the body: same status and headers, Content-Length
      included (RFC 9110 §9.3.2), so load balancers can probe any ``GET`` route.
    * A declared ``Content-Length`` over ``max_body_bytes`` is refused with 413 before any of
      the body is read: a client that sent ``Expect: 100-continue`` gets the 413 instead of
      ``100 Continue`` (uvicorn sends that on the first ``receive()``) and sends nothing.
    * A body without a declared length (chunked) is counted while it is read; past the limit
      nothing more is kept, the rest is drained up to ``8 × max_body_bytes`` (so the client
      can finish sending and read the answer) and the answer is 413.
    * A ``Content-Encoding`` other than ``identity`` is 415 with ``Accept-Encoding: identity``
      (RFC 7694): bodies are read as sent, never decompressed.

    An answer given before the whole body was read closes the connection when the client may
    not send the rest (``Expect: 100-continue``) or when draining it would cost too much.
    The body read here is replayed to the app.

    A request still held when a shutdown's grace (``graceful_timeout_s``) runs out is
    cancelled by uvicorn, which answered it 500 ``Internal Server Error``: it is answered
    here instead, 503 with ``Retry-After`` (:func:`~service.errors.grace_ran_out`). Nothing
    else cancels a request's task (uvicorn reads a client gone as a disconnect, not a
    cancellation); its queued or running solve is dropped as any abandoned one is.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body: int,
        metrics: Metrics,
        names: Callable[[], Collection[str]],
        docs_paths: Collection[str],
        routes: Collection[tuple[re.Pattern, str]] = (),
        grace_s: float = 30.0,
    ):
        """Args:
        app: the ASGI app to guard.
        max_body: the largest request body accepted, in bytes.
        metrics: where ``mondeq_requests`` and ``mondeq_request_duration_seconds`` go.
        names: the repository's model names now (a ``model`` label outside them is
            ``"unknown"``, so that the labels stay bounded).
        docs_paths: the OpenAPI document's and documentation pages' paths, counted as
            ``endpoint="docs"``.
        routes: ``(path regex, route name)`` of the app's routes, in its router's order, to
            label a request refused here, before any router saw it, with the endpoint and
            model it was sent to.
        grace_s: the server's shutdown grace (``graceful_timeout_s``), named in the 503 of
            a request it cut off.
        """
        self.app, self.max_body, self.metrics, self.names = app, max_body, metrics, names
        self.grace_s = grace_s
        self.docs_paths = frozenset(docs_paths)
        self.routes = tuple(routes)
        # (model, endpoint, code) → its request counter and duration histogram. Bounded as the
        # labels are: models of the repository (or "unknown"), ENDPOINTS, HTTP statuses.
        self._series: dict[tuple[str, str, int], tuple] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500, "started": False}
        path = route_path(scope)
        counted = path != "/metrics"
        head = scope["method"] == "HEAD"
        if head:
            # The app sees GET; uvicorn keeps its own scope (HEAD) and sends no body either.
            scope = {**scope, "method": "GET", HEAD_SCOPE_KEY: True}
        if counted:
            self.metrics.inflight.inc()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if isinstance(body, JSONResponse):
                self._name_route(scope)
                await body(scope, receive, send_wrapper)
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_wrapper)
        except asyncio.CancelledError:
            if status["started"]:
                raise  # too late for a status: uvicorn closes the connection
            # The shutdown's grace ran out (uvicorn cancels what it still holds): the server's
            # availability, not a fault of the request nor a bug. Answered, not re-raised, so
            # that uvicorn sees a complete answer instead of an exception to answer with 500.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            refusal = error_response(
                503, grace_ran_out(self.grace_s), {"Retry-After": SHUTDOWN_RETRY_AFTER}
            )
            await refusal(scope, receive, send_wrapper)
        finally:
            if counted:
                self.metrics.inflight.dec()
            self._observe(scope, path, status["code"], time.perf_counter() - t0)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | JSONResponse:
        declared, encoding, expect = None, b"", False
        for k, v in scope.get("headers") or []:
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    return error_response(400, "invalid Content-Length header", CLOSE)
            elif k == b"content-encoding":
                encoding = v.strip().lower()
            elif k == b"expect":
                expect = v.strip().lower() == b"100-continue"
        # Refused before reading: close unless the client will send the body regardless
        # and draining it stays cheap (uvicorn then discards it and keeps the connection).
        early = CLOSE if expect or (declared or 0) > 8 * self.max_body else None
        if declared is not None and declared > self.max_body:
            return error_response(
                413,
                f"request body of {declared} bytes exceeds the limit of {self.max_body} bytes",
                early,
            )
        if encoding not in (b"", b"identity") and declared != 0:
            return error_response(
                415,
                f"Content-Encoding {encoding.decode('latin-1')!r} is not supported: send the "
                "body uncompressed",
                {"Accept-Encoding": "identity", **(early or {})},
            )
        chunks, size, drained = [], 0, 0
        complete = True
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            part = message.get("body", b"")
            size += len(part)
            if size > self.max_body:
                drained += len(part)
                if drained > 8 * self.max_body:  # stop reading a hostile upload
                    complete = False
                    break
            else:
                chunks.append(part)
            if not message.get("more_body", False):
                break
        if size > self.max_body:
            return error_response(
                413,
                f"request body of {'over ' if not complete else ''}{size} bytes exceeds the "
                f"limit of {self.max_body} bytes",
                None if complete else CLOSE,
            )
        return b"".join(chunks)

    def _name_route(self, scope: Scope) -> None:
        """Put in ``scope`` the route (and path parameters) the router would have given a
        request refused before routing (413, 415, a bad ``Content-Length``): without it an
        oversized or compressed inference body was counted as ``endpoint="other"`` with no
        model, out of sight of the endpoint's error rate."""
        path = route_path(scope)
        for regex, name in self.routes:
            match = regex.fullmatch(path)
            if match:
                scope["route"] = SimpleNamespace(name=name)
                scope["path_params"] = match.groupdict()
                return

    def _observe(self, scope: Scope, path: str, code: int, seconds: float) -> None:
        # The docs pages are Starlette routes whose endpoint names are FastAPI's business:
        # they are known by path (below a proxy's prefix). Every other route's name is its label.
        name = getattr(scope.get("route"), "name", None)
        endpoint = name if name in ENDPOINTS else "other"
        if path in self.docs_paths:
            endpoint = "docs"
        params = scope.get("path_params") or {}
        model = ""
        if "name" in params:
            model = params["name"] if params["name"] in self.names() else "unknown"
        try:
            key = (model, endpoint, code)
            series = self._series.get(key)
            if series is None:  # labels() costs a lock and a tuple; the series are never removed
                series = self._series[key] = (
                    self.metrics.requests.labels(model, endpoint, str(code)),
                    self.metrics.request_duration.labels(model, endpoint),
                )
            series[0].inc()
            series[1].observe(seconds)
        except Exception:  # metrics never fail a request
            log.exception("request metrics")
