"""The FastAPI application: ``create_app(settings)``.

Routes: the Open Inference Protocol (KServe V2) under ``/v2``, the friendly API and the
admin endpoints under ``/v1``, Prometheus at ``/metrics``, OpenAPI docs at ``/docs``.
Models load in the lifespan (in the background: ``/v2/health/ready`` says 503 until they
have); nothing loads at import time. Every error is a JSON body ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_core.runtime import tune_allocator

from . import schemas
from .alpha import NoTuningData, TuningBusy
from .batcher import Answer, Closed, QueueFull, SolveFailed
from .engine import ServedModel, SolveKey, TooMuchWork
from .images import ImageRejected, decode_image
from .metrics import ENDPOINTS, Metrics
from .repository import NAME_RE, NotFound, NotReady, Repository
from .settings import Settings

log = logging.getLogger("mondeq.service")

SERVER_NAME = "mondeq"
PLATFORM = "mondeq_pytorch"
OUTPUT_TYPES = {
    "logits": "FP32",
    "probabilities": "FP32",
    "label": "INT64",
    "iterations": "INT32",
    "residual": "FP32",
    "converged": "BOOL",
    "certified_radius": "FP32",
}
DOC_ROUTES = {"openapi", "swagger_ui_html", "swagger_ui_redirect", "redoc_html"}
HEAD_SCOPE_KEY = "mondeq.head"  # set on the scope of a HEAD request served as GET
CLOSE = {"Connection": "close"}


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


# ---- conversions ------------------------------------------------------------------------------


def json_list(t: torch.Tensor) -> list:
    """Tensor → nested list; non-finite floats become ``null`` (JSON has no NaN)."""
    values = t.tolist()
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        values = finite(values)
    return values


def finite(value: Any) -> Any:
    """Replace non-finite floats anywhere in a JSON-like value by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def to_pixels(data: Any, what: str) -> np.ndarray:
    """A JSON array of numbers in [0, 1] → float32 numpy array. Raises 422 saying why not."""
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise ApiError(422, f"{what} is not a rectangular array of numbers ({e})") from None
    if arr.dtype.kind not in "iuf":
        kind = {"b": "booleans", "U": "strings", "S": "strings", "O": "mixed or nested values"}
        raise ApiError(
            422, f"{what} must hold numbers only, got {kind.get(arr.dtype.kind, arr.dtype.name)}"
        )
    if arr.size:
        if not bool(np.isfinite(arr).all()):
            raise ApiError(422, f"{what} holds NaN or Inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ApiError(
                422,
                f"{what} must hold pixel intensities in [0, 1] (found values in "
                f"[{lo:g}, {hi:g}]); the server applies the model's normalisation",
            )
    return arr.astype(np.float32)


def v2_pixels(served: ServedModel, inputs: list[schemas.InferInput], max_rows: int) -> torch.Tensor:
    """The V2 request's single input → ``(B, C, H, W)`` float32 pixels."""
    if len(inputs) != 1:
        raise ApiError(422, f"expected exactly one input tensor, got {len(inputs)}")
    inp = inputs[0]
    if inp.datatype != "FP32":
        raise ApiError(422, f"input datatype must be FP32, got {inp.datatype!r}")
    c, h, w = served.shape
    shape = list(inp.shape)
    if len(shape) != 4 or shape[1:] != [c, h, w]:
        raise ApiError(422, f"input shape must be [B, {c}, {h}, {w}], got {shape}")
    if not 1 <= shape[0] <= max_rows:
        raise ApiError(422, f"batch size must lie in [1, {max_rows}], got {shape[0]}")
    arr = to_pixels(inp.data, "input data")
    need = math.prod(shape)
    if arr.size != need:
        raise ApiError(422, f"input data holds {arr.size} values; shape {shape} needs {need}")
    if arr.ndim != 1 and list(arr.shape) != shape:
        raise ApiError(
            422, f"nested input data has shape {list(arr.shape)}; expected flat or {shape}"
        )
    return torch.from_numpy(arr.reshape(shape))


def classify_pixels(served: ServedModel, data: Any, max_rows: int) -> torch.Tensor:
    """Nested ``[H, W]`` (one channel), ``[C, H, W]`` or ``[B, C, H, W]`` → 4-D pixels."""
    arr = to_pixels(data, "inputs")
    c, h, w = served.shape
    if arr.ndim == 2 and c == 1:
        arr = arr[None, None]
    elif arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or list(arr.shape[1:]) != [c, h, w]:
        accepted = ([f"[{h}, {w}]"] if c == 1 else []) + [f"[{c}, {h}, {w}]", f"[B, {c}, {h}, {w}]"]
        raise ApiError(
            422, f"inputs have shape {list(arr.shape)}; expected {' or '.join(accepted)}"
        )
    if not 1 <= arr.shape[0] <= max_rows:
        raise ApiError(422, f"batch size must lie in [1, {max_rows}], got {arr.shape[0]}")
    return torch.from_numpy(np.ascontiguousarray(arr))


# ---- middleware -------------------------------------------------------------------------------


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
    """

    def __init__(self, app: ASGIApp, *, max_body: int, metrics: Metrics, names):
        self.app, self.max_body, self.metrics, self.names = app, max_body, metrics, names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}
        counted = scope["path"] != "/metrics"
        head = scope["method"] == "HEAD"
        if head:
            # The app sees GET; uvicorn keeps its own scope (HEAD) and sends no body either.
            scope = {**scope, "method": "GET", HEAD_SCOPE_KEY: True}
        if counted:
            self.metrics.inflight.inc()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if isinstance(body, JSONResponse):
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
        finally:
            if counted:
                self.metrics.inflight.dec()
            self._observe(scope, status["code"], time.perf_counter() - t0)

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

    def _observe(self, scope: Scope, code: int, seconds: float) -> None:
        # FastAPI's routes put themselves in the scope; Starlette's plain routes (the docs
        # pages, /openapi.json) leave only their endpoint, whose name is the route's.
        route = scope.get("route")
        name = getattr(route, "name", None) or getattr(scope.get("endpoint"), "__name__", None)
        endpoint = name if name in ENDPOINTS else ("docs" if name in DOC_ROUTES else "other")
        params = scope.get("path_params") or {}
        model = ""
        if "name" in params:
            model = params["name"] if params["name"] in self.names() else "unknown"
        try:
            self.metrics.requests.labels(model, endpoint, str(code)).inc()
            self.metrics.request_duration.labels(model, endpoint).observe(seconds)
        except Exception:  # metrics never fail a request
            log.exception("request metrics")


# ---- the app ----------------------------------------------------------------------------------


class Runtime:
    """What the routes share: settings, metrics and (once the lifespan started) the models."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.repo: Repository | None = None

    def repository(self) -> Repository:
        if self.repo is None:
            raise ApiError(503, "the server is starting")
        return self.repo

    def names(self) -> list[str]:
        return list(self.repo.entries) if self.repo is not None else []


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
bearer = HTTPBearer(auto_error=False, description="MONDEQ_ADMIN_TOKEN")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Models load when its lifespan starts, not here.

    Args:
        settings: defaults to ``Settings()`` (the ``MONDEQ_*`` environment).
    """
    settings = settings or Settings()
    rt = Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tune_allocator()  # also when uvicorn, not `mondeq serve`, started the process
        repo = Repository(settings, rt.metrics)
        rt.repo = repo
        await repo.start()
        try:
            yield
        finally:
            await repo.close()

    app = FastAPI(
        title="mondeq",
        version=_version(),
        description="Monotone operator equilibrium networks: classification with per-sample "
        "solver statistics. Open Inference Protocol under /v2, friendly API under /v1.",
        lifespan=lifespan,
    )
    app.state.runtime = rt
    app.add_middleware(Guard, max_body=settings.max_body_bytes, metrics=rt.metrics, names=rt.names)
    _exception_handlers(app)

    # ---- helpers -------------------------------------------------------------------------------
    def served_or_error(name: str, version: str | None) -> ServedModel:
        try:
            return rt.repository().served(name, version)
        except NotFound as e:
            raise ApiError(404, str(e)) from None
        except NotReady as e:
            raise ApiError(503, str(e)) from None

    def solve_key(served: ServedModel, p: Any) -> SolveKey:
        try:
            return served.key(
                getattr(p, "method", None), getattr(p, "tol", None), getattr(p, "max_iter", None)
            )
        except ValueError as e:
            raise ApiError(422, str(e)) from None

    async def run(served: ServedModel, x: torch.Tensor, key: SolveKey) -> Answer:
        try:
            return await served.infer(x, key)
        except TooMuchWork as e:
            raise ApiError(422, str(e)) from None
        except QueueFull as e:
            raise ApiError(429, str(e), {"Retry-After": str(e.retry_after)}) from None
        except Closed as e:
            raise ApiError(503, str(e)) from None
        except SolveFailed as e:
            raise ApiError(500, str(e)) from None

    def solver_info(served: ServedModel, ans: Answer) -> dict:
        i = ans.info
        return {
            "alpha": i["alpha"],
            "method": i["method"],
            "tol": i["tol"],
            "max_iter": i["max_iter"],
            "queue_ms": round(ans.queue_s * 1000, 3),
            "solve_ms": round(i["solve_s"] * 1000, 3),
            "batch_size": ans.batch_rows,
        }

    def admin(creds: HTTPAuthorizationCredentials | None) -> None:
        token = settings.admin_token.get_secret_value() if settings.admin_token else ""
        if not token:
            raise ApiError(403, "admin endpoints are disabled: set MONDEQ_ADMIN_TOKEN")
        given = creds.credentials if creds is not None else ""
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    # ---- Open Inference Protocol ---------------------------------------------------------------
    @app.get("/v2", name="v2_server", response_model=schemas.ServerMetadata, tags=["v2"])
    async def server_metadata():
        """Server metadata."""
        return {"name": SERVER_NAME, "version": _version(), "extensions": []}

    @app.get("/v2/health/live", name="v2_live", response_model=schemas.LiveBody, tags=["v2"])
    async def live():
        """The process is up."""
        return {"live": True}

    @app.get(
        "/v2/health/ready",
        name="v2_ready",
        response_model=schemas.ReadyBody,
        tags=["v2"],
        responses={503: ERRORS[503]},
        response_model_exclude_none=True,
    )
    async def ready():
        """Ready when the first load is done and some model can serve."""
        repo = rt.repo
        if repo is not None and repo.ready:
            return {"ready": True}
        if repo is None or not repo.initial_load_done:
            why = "models are loading"
        elif repo.closing:
            why = "shutting down"
        else:
            why = f"no model ready in {settings.model_dir}"
        return error_response(503, f"not ready: {why}", ready=False)

    async def model_metadata(name: str, version: str | None):
        served = served_or_error(name, version)
        repo = rt.repository()
        versions = (
            [version]
            if version
            else [str(v) for v, e in sorted(repo.entries[name].items()) if e.status == "ready"]
        )
        k = len(served.class_names)
        per_sample = [
            (n, OUTPUT_TYPES[n], [-1])
            for n in ("label", "iterations", "residual", "converged", "certified_radius")
        ]
        return {
            "name": name,
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *served.shape]}],
            "outputs": [
                {"name": "logits", "datatype": "FP32", "shape": [-1, k]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
                *({"name": n, "datatype": d, "shape": s} for n, d, s in per_sample),
            ],
        }

    async def model_ready(name: str, version: str | None):
        repo = rt.repository()
        try:
            repo.entry(name, version)
        except NotFound as e:
            raise ApiError(404, str(e)) from None
        except NotReady as e:
            return error_response(503, str(e), name=name, ready=False)
        return {"name": name, "ready": True}

    async def infer(name: str, version: str | None, request: Request):
        served = served_or_error(name, version)
        _json_content_type(request.headers.get("content-type"), "send application/json")
        body = _parse_json(await request.body(), schemas.InferRequest)
        key = solve_key(served, body.parameters)
        wanted = list(OUTPUT_TYPES)
        if body.outputs:
            wanted = [o.name for o in body.outputs]
            unknown = [n for n in wanted if n not in OUTPUT_TYPES]
            if unknown:
                raise ApiError(422, f"unknown outputs {unknown}; choose from {list(OUTPUT_TYPES)}")
        x = v2_pixels(served, body.inputs, settings.max_request_batch)
        ans = await run(served, x, key)
        outputs = []
        for n in wanted:
            t = ans.rows[n]
            outputs.append(
                {
                    "name": n,
                    "shape": list(t.shape),
                    "datatype": OUTPUT_TYPES[n],
                    "data": json_list(t.flatten()),
                }
            )
        return JSONResponse(
            {
                "model_name": name,
                "model_version": str(served.version),
                "id": body.id,
                "parameters": solver_info(served, ans),
                "outputs": outputs,
            }
        )

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        versioned = "{version}" in prefix
        app.add_api_route(
            prefix,
            _bind(model_metadata, versioned),
            methods=["GET"],
            name="v2_model",
            response_model=schemas.ModelMetadata,
            responses=ERRORS,
            tags=["v2"],
            summary="Model metadata" + (" (one version)" if versioned else ""),
        )
        app.add_api_route(
            prefix + "/ready",
            _bind(model_ready, versioned),
            methods=["GET"],
            name="v2_model_ready",
            response_model=schemas.ReadyBody,
            responses=ERRORS,
            tags=["v2"],
            summary="Model readiness" + (" (one version)" if versioned else ""),
        )
        app.add_api_route(
            prefix + "/infer",
            _bind_infer(infer, versioned),
            methods=["POST"],
            name="v2_infer",
            response_model=schemas.InferResponse,
            responses=ERRORS,
            openapi_extra=_json_body(schemas.InferRequest),
            tags=["v2"],
            summary="Inference" + (" (one version)" if versioned else ""),
        )

    # ---- friendly API --------------------------------------------------------------------------
    @app.get("/v1/models", name="v1_models", response_model=schemas.ModelList, tags=["v1"])
    async def list_models():
        """Every model: versions, architecture, parameters, input spec, class names,
        accuracy (card.json), α, tol, Lipschitz bound and load status."""
        return JSONResponse(finite({"models": rt.repository().describe()}))

    @app.post(
        "/v1/models/{name}:classify",
        name="v1_classify",
        tags=["v1"],
        response_model=schemas.ClassifyResponse,
        responses={**ERRORS, 415: {"model": schemas.ErrorBody, "description": "content type"}},
        openapi_extra=_json_body(
            schemas.ClassifyRequest, {"multipart/form-data": {"schema": schemas.MULTIPART_SCHEMA}}
        ),
    )
    async def classify(
        name: str,
        request: Request,
        version: str | None = Query(None, description="default: the default version"),
    ):
        """Classify JSON pixel arrays or an uploaded image (decoded, converted and resized
        to the model's input). Returns the top-k classes and the solver stats."""
        served = served_or_error(name, version)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            x, top_k, key = await _classify_upload(request, served)
        elif ctype == "application/json" or ctype.endswith("+json"):
            _json_content_type(request.headers.get("content-type"), "")
            req = _parse_json(await request.body(), schemas.ClassifyRequest)
            key = solve_key(served, req)
            x = classify_pixels(served, req.inputs, settings.max_request_batch)
            top_k = req.top_k
        else:
            raise ApiError(
                415,
                f"content type {ctype or '(none)'!r}: send application/json or "
                "multipart/form-data with a 'file' field",
            )
        ans = await run(served, x, key)
        return JSONResponse(classify_answer(served, ans, top_k))

    def classify_answer(served: ServedModel, ans: Answer, top_k: int) -> dict:
        r = ans.rows
        k = min(top_k, len(served.class_names))
        probs, idx = r["probabilities"].topk(k, dim=1)
        preds = []
        for i in range(r["label"].shape[0]):
            tops = [
                {"label": j, "class_name": served.class_names[j], "probability": p}
                for j, p in zip(idx[i].tolist(), probs[i].tolist(), strict=True)
            ]
            preds.append(
                {
                    **tops[0],
                    "top_k": tops,
                    "iterations": int(r["iterations"][i]),
                    "residual": finite(float(r["residual"][i])),
                    "converged": bool(r["converged"][i]),
                    "certified_radius": finite(float(r["certified_radius"][i])),
                }
            )
        return {
            "model": served.name,
            "version": str(served.version),
            "predictions": preds,
            "solver": solver_info(served, ans),
        }

    async def _classify_upload(request: Request, served: ServedModel):
        form = await request.form(max_files=1, max_fields=16)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "multipart body needs a 'file' field holding an image")
        data = await upload.read()

        # Every field but the file goes through the JSON body's model: an unknown one
        # (a misspelt max_iter) is 422 there too, with the same message.
        fields: dict[str, str] = {}
        for k, raw in form.multi_items():
            if k == "file" or raw == "":
                continue
            if not isinstance(raw, str):
                raise ApiError(422, f"form field {k!r} must be a plain value")
            fields[k] = _form_value(k, raw)
        try:
            invert = _boolean(fields.pop("invert", "false"))
        except ValueError as e:
            raise ApiError(422, f"form field 'invert': cannot read {e.args[0]!r}") from None
        # The fields obey the JSON body's rules (the same model, the same 422s).
        try:
            params = schemas.ClassifyRequest.model_validate({"inputs": [], **fields})
        except ValidationError as e:
            errors = e.errors(include_url=False, include_input=False)
            raise RequestValidationError(
                [{**err, "loc": ("body", *err.get("loc", ()))} for err in errors]
            ) from None
        top_k = params.top_k
        key = solve_key(served, params)
        try:  # Pillow decodes in a worker thread: the event loop keeps serving
            pixels = await run_in_threadpool(
                decode_image,
                data,
                served.shape,
                max_pixels=settings.max_image_pixels,
                invert=invert,
            )
        except ImageRejected as e:
            raise ApiError(e.status, str(e)) from None
        x = torch.from_numpy(pixels)
        return x, top_k, key

    # ---- admin ---------------------------------------------------------------------------------
    @app.post(
        "/v1/models/{name}/tune-alpha",
        name="v1_tune_alpha",
        tags=["admin"],
        responses={**ADMIN_ERRORS, 400: ERRORS[400], 415: ERRORS[415]},
        openapi_extra=_json_body(schemas.TuneRequest, required=False),
    )
    async def tune(
        name: str,
        request: Request,
        creds: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ):
        """Run the α search on recent traffic or the calibration batch; returns the curve
        (iterations against α) and, with ``apply``, switches the model to the best α.
        The body (a :class:`schemas.TuneRequest`) is optional."""
        admin(creds)  # before the body: an unauthenticated client learns nothing else
        body = await _optional_json_body(request, schemas.TuneRequest)
        version = str(body.version) if body.version is not None else None
        served = served_or_error(name, version)
        try:
            out = await asyncio.to_thread(served.tuner.tune, "admin", body.source, body.apply)
        except TuningBusy as e:
            raise ApiError(409, str(e)) from None
        except NoTuningData as e:
            raise ApiError(409, str(e)) from None
        except ValueError as e:
            raise ApiError(422, str(e)) from None
        return JSONResponse(finite({"model": name, "version": str(served.version), **out}))

    @app.post(
        "/v1/models/{name}/reload",
        name="v1_reload",
        tags=["admin"],
        responses={**ADMIN_ERRORS, 400: ERRORS[400], 415: ERRORS[415]},
        openapi_extra=_json_body(schemas.ReloadRequest, required=False),
    )
    async def reload(
        name: str,
        request: Request,
        creds: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ):
        """Reread the model's folder: load new versions, reload every version from disk,
        drop removed ones. Requests in flight finish on the versions they started on. A file
        still changing stays ``pending``; a reload that fails keeps the loaded weights.
        No body, or ``{}``: a body is read by the JSON rules of every endpoint, so that a
        malformed one is refused (400) rather than ignored."""
        admin(creds)
        await _optional_json_body(request, schemas.ReloadRequest)
        repo = rt.repository()
        if not NAME_RE.match(name) or not (
            name in repo.entries or (settings.model_dir / name).is_dir()
        ):
            raise ApiError(404, f"unknown model {name!r}; available: {repo.names()}")
        report = await repo.refresh(only=name, force=True)
        item = next((m for m in repo.describe() if m["name"] == name), None)
        return JSONResponse(
            finite(
                {
                    "model": name,
                    **report,
                    "default_version": item["default_version"] if item else None,
                    "versions": [
                        {k: v.get(k) for k in ("version", "status", "error", "reload")}
                        for v in item["versions"]
                    ]
                    if item
                    else [],
                }
            )
        )

    # ---- metrics -------------------------------------------------------------------------------
    @app.get("/metrics", name="metrics", tags=["ops"], response_class=Response)
    async def metrics():
        """Prometheus text exposition."""
        return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _document_bodies(
        app,
        schemas.InferRequest,
        schemas.ClassifyRequest,
        schemas.TuneRequest,
        schemas.ReloadRequest,
    )
    return app


# ---- small helpers ----------------------------------------------------------------------------


def _version() -> str:
    from model_core import __version__

    return __version__


def _boolean(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _form_value(key: str, raw: str) -> Any:
    """A multipart text field as the JSON value it spells, for the numeric fields of
    :class:`schemas.ClassifyRequest` (``"30"`` → 30, ``"1e-3"`` → 0.001), so the form obeys
    the JSON body's strict rules: ``"3_0"`` or ``"true"`` for ``max_iter`` is refused there,
    not read as 30 or 1. Other fields (``method``) stay text."""
    if key not in _NUMERIC_FORM_FIELDS:
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw  # the strict field refuses the text with the JSON body's message


_NUMERIC_FORM_FIELDS = ("top_k", "tol", "max_iter")


async def _optional_json_body(request: Request, model: type[schemas.BaseModel]):
    """An admin endpoint's optional body: none (or only whitespace) gives ``model()``'s
    defaults; anything else obeys every JSON endpoint's rules (415, 400, 422).

    Raises:
        ApiError: 415 for another content type, 400 for bytes that are not JSON.
        RequestValidationError: 422 for JSON of the wrong shape or an unknown field.
    """
    raw = await request.body()
    if not raw.strip():
        return model()
    _json_content_type(request.headers.get("content-type"), "send application/json")
    return _parse_json(raw, model)


def _parse_json(raw: bytes, model: type[schemas.BaseModel]):
    """Parse and validate a JSON body in one pass of pydantic's own parser.

    For a 28×28 image this is ~7× faster than ``json.loads`` plus validation (38 µs against
    280 µs: Python's float parsing dominates), and it is the request path's largest cost.
    NaN and ±Infinity tokens parse, so that the pixel check can name them.

    Raises:
        ApiError: 400 for bytes that are not JSON.
        RequestValidationError: 422 for JSON of the wrong shape.
    """
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        bad = next((err for err in errors if err.get("type") == "json_invalid"), None)
        if bad is not None:
            raise ApiError(400, f"malformed JSON body ({bad.get('msg')})") from None
        # Located as FastAPI locates body errors: ("body", field, ...).
        raise RequestValidationError(
            [{**err, "loc": ("body", *err.get("loc", ()))} for err in errors]
        ) from None


def _json_body(
    model: type[schemas.BaseModel], more: dict | None = None, required: bool = True
) -> dict:
    """``openapi_extra`` documenting a body that the route parses itself (:func:`_parse_json`):
    the model is referenced from ``components/schemas`` (see :func:`_document_bodies`)."""
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    return {"requestBody": {"required": required, "content": {**content, **(more or {})}}}


def _document_bodies(app: FastAPI, *models: type[schemas.BaseModel]) -> None:
    """Add ``models`` (and the models they nest) to the app's OpenAPI components."""
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
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _bind(handler, versioned: bool):
    """A route function with the right path parameters for FastAPI to document."""
    if versioned:

        async def route(name: str, version: str):
            return await handler(name, version)
    else:

        async def route(name: str):
            return await handler(name, None)

    route.__doc__ = handler.__doc__
    return route


def _bind_infer(handler, versioned: bool):
    if versioned:

        async def route(name: str, version: str, request: Request):
            return await handler(name, version, request)
    else:

        async def route(name: str, request: Request):
            return await handler(name, None, request)

    route.__doc__ = handler.__doc__
    return route


def _allowed(allow: str) -> list[str]:
    """The ``Allow`` header's methods in a stable order; ``HEAD`` wherever ``GET`` is (the
    :class:`Guard` answers it)."""
    methods = {m.strip().upper() for m in allow.split(",") if m.strip()}
    if "GET" in methods:
        methods.add("HEAD")
    order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


def _json_content_type(content_type: str | None, what: str) -> None:
    """Check that a body labelled ``content_type`` is JSON: ``application/json`` or a
    ``+json`` type, UTF-8 (RFC 8259 §8.1) when a charset is given. ``None`` (no header)
    passes: the endpoint takes JSON only.

    Raises:
        ApiError: 415 naming what the endpoint accepts.
    """
    if content_type is None:
        return
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise ApiError(415, f"content type {media or '(empty)'!r}: {what}")
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
            if charset not in ("utf-8", "utf8"):
                raise ApiError(415, f"JSON bodies are UTF-8 (RFC 8259), got charset={charset}")


def _summarise(errors: list[dict]) -> tuple[str, list[dict]]:
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


def _exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        detail = e.detail if isinstance(e.detail, str) else json.dumps(finite(e.detail))
        headers = dict(getattr(e, "headers", None) or {})
        method = "HEAD" if request.scope.get(HEAD_SCOPE_KEY) else request.method
        if e.status_code == 404 and detail == "Not Found":
            # No method in the text: HEAD must get GET's headers, Content-Length included.
            detail = f"no such path: {request.url.path}"
        elif e.status_code == 405:
            allowed = _allowed(headers.get("Allow", ""))
            headers["Allow"] = ", ".join(allowed)
            detail = (
                f"method {method} not allowed on {request.url.path}; allowed: {headers['Allow']}"
            )
        return error_response(e.status_code, detail, headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = list(e.errors())
        bad = next((err for err in errors if err.get("type") == "json_invalid"), None)
        if bad is not None:  # bytes that are not JSON: malformed (400), not invalid (422)
            return error_response(400, f"malformed JSON body ({bad.get('msg')})")
        message, detail = _summarise(errors)
        return error_response(422, message, detail=detail)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal server error ({type(e).__name__})")
