"""The Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``), served
by ``grpc.aio`` in the HTTP server's event loop.

Every call goes the HTTP routes' way: the model through :meth:`Runtime.served`, the input
through :func:`service.decoding.input_pixels`, the solver parameters through
:class:`schemas.SolverOverrides` and :func:`service.decoding.solve_key`, the solve through
:func:`service.runtime.solve` (the same batcher, queue limit and work limit), so a request
refused over HTTP is refused here with the same words. :class:`ApiError`'s HTTP status
becomes a gRPC status code (:data:`STATUS_CODES`); every call is counted in
``mondeq_requests_total`` / ``mondeq_request_duration_seconds`` under an ``endpoint`` of its
own (``grpc_infer``, ...) with the HTTP status the same answer has over HTTP as ``code``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import torch
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from .. import schemas
from ..batcher import Answer
from ..decoding import check_output_names, input_pixels, refuse_classification, solve_key
from ..encoding import DEFAULT_OUTPUTS, OUTPUT_TYPES, output_bytes, solver_info
from ..errors import SHUTDOWN_RETRY_AFTER, ApiError, grace_ran_out, summarise_validation
from ..repository import NotFound, NotReady
from ..routers import v2
from ..runtime import Runtime, solve
from . import open_inference_grpc_pb2 as pb
from . import open_inference_grpc_pb2_grpc as pb_grpc
from .strict import first_ambiguity

log = logging.getLogger("mondeq.service")

# HTTP status of an ApiError → gRPC status code, after google.rpc.Code's HTTP mapping.
# 413 is RESOURCE_EXHAUSTED as gRPC itself answers a message over the receive limit; 429
# (queue full) is RESOURCE_EXHAUSTED too, told apart by its retry-after trailer.
STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# The client went away (or its deadline passed) before the answer: nginx's 499.
CLIENT_GONE = 499

# The field of InferTensorContents that holds each output datatype (encoding.OUTPUT_TYPES).
TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
}


def status_code(http_status: int) -> grpc.StatusCode:
    """The gRPC status code of an HTTP error status (:data:`STATUS_CODES`; another 4xx is
    ``INVALID_ARGUMENT``, anything else ``INTERNAL``)."""
    if http_status in STATUS_CODES:
        return STATUS_CODES[http_status]
    if 400 <= http_status < 500:
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


# ---- requests ---------------------------------------------------------------------------------


def parameter_value(p: pb.InferParameter) -> Any:
    """An ``InferParameter``'s value as Python: bool, int (int64 and uint64), str or float
    (double); ``None`` when none of its ``parameter_choice`` is set."""
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def solver_overrides(params) -> schemas.SolverOverrides:
    """A request's ``parameters`` map → :class:`schemas.SolverOverrides`, validated as the
    HTTP body's ``parameters`` are (strict types: a ``tol`` sent as a string or a
    ``max_iter`` as a double is refused, not converted; unknown names pass).

    Raises:
        ApiError: 422 naming the first bad parameter (``parameters.tol: ...``).
    """
    values = {name: parameter_value(p) for name, p in params.items()}
    try:
        return schemas.SolverOverrides.model_validate(values)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        located = [{**err, "loc": ("parameters", *err.get("loc", ()))} for err in errors]
        raise ApiError(422, summarise_validation(located)[0]) from None


def requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    """The output names a request asks for (none: :data:`DEFAULT_OUTPUTS`).

    Raises:
        ApiError: 422 as :func:`service.decoding.check_output_names` and
            :func:`service.decoding.refuse_classification` (HTTP's words).
    """
    if not request.outputs:
        return list(DEFAULT_OUTPUTS)
    wanted = [o.name for o in request.outputs]
    check_output_names(wanted)
    for o in request.outputs:
        refuse_classification(o.name, o.parameters)
    return wanted


def request_pixels(
    served, request: pb.ModelInferRequest, max_rows: int
) -> tuple[torch.Tensor, bool]:
    """The request's single input tensor → ``(pixels (B, C, H, W) float32, raw)``, ``raw``
    telling whether it came as ``raw_input_contents`` (else as typed ``contents``).

    The tensor's rules and messages are :func:`input_pixels`' (FP32, ``[B, C, H, W]``,
    values in [0, 1], ``4 × prod(shape)`` raw bytes); the protocol adds that raw contents
    come one per input and never beside typed contents.

    Raises:
        ApiError: 422 for other than one input or FP32 values outside ``fp32_contents``;
            400 for raw contents that do not frame the inputs; :func:`input_pixels`' errors.
    """
    inputs = request.inputs
    if len(inputs) != 1:
        raise ApiError(422, f"expected exactly one input tensor, got {len(inputs)}")
    inp = inputs[0]
    raw = request.raw_input_contents
    if raw:
        if len(raw) != len(inputs):
            raise ApiError(
                400,
                f"raw_input_contents holds {len(raw)} tensors for {len(inputs)} input(s): "
                "send one per input, in the inputs' order",
            )
        if inp.HasField("contents"):
            raise ApiError(
                400, f"input {inp.name!r} has both contents and raw_input_contents: send one"
            )
        data: Any = raw[0]
    else:
        c = inp.contents
        if inp.datatype == "FP32" and not c.fp32_contents:
            other = next((f.name for f, v in c.ListFields() if v), None)
            if other is not None:
                raise ApiError(
                    422,
                    f"FP32 input {inp.name!r} carries its values in contents.{other}; "
                    "FP32 values go in contents.fp32_contents",
                )
        data = list(c.fp32_contents)
    # fp32_contents holds floats only (protobuf's typed field): no boolean to look for
    x = input_pixels(
        served, inp.name, inp.datatype, list(inp.shape), data, max_rows, may_hold_bools=False
    )
    return x, bool(raw)


# ---- answers ----------------------------------------------------------------------------------


def parameter(value: Any) -> pb.InferParameter | None:
    """A Python value as an ``InferParameter`` (``None`` for ``None``: left out)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def infer_response(
    name: str, served, request_id: str, ans: Answer, wanted: list[str], raw: bool
) -> pb.ModelInferResponse:
    """The ``ModelInferResponse`` of a solve: the outputs in ``wanted`` with their
    datatypes and shapes (``[B]`` per sample, ``[B, K]`` for logits, probabilities and
    logit_error_bound), as ``raw_output_contents`` when ``raw`` (the request sent raw
    contents) or typed ``contents`` otherwise; ``parameters`` as the HTTP answer's (α,
    method, tol, max_iter, stop, logit_tol when set, queue_ms, solve_ms, batch_size).
    Non-finite values (a withheld radius) stay NaN/inf: unlike JSON, both forms carry them.
    """
    outputs, contents = [], []
    for out in wanted:
        t, datatype = ans.rows[out], OUTPUT_TYPES[out]
        tensor = pb.ModelInferResponse.InferOutputTensor(
            name=out, datatype=datatype, shape=list(t.shape)
        )
        if raw:
            contents.append(output_bytes(t, datatype))
        else:
            getattr(tensor.contents, TYPED_FIELDS[datatype]).extend(t.flatten().tolist())
        outputs.append(tensor)
    params = {k: p for k, v in solver_info(ans).items() if (p := parameter(v)) is not None}
    return pb.ModelInferResponse(
        model_name=name,
        model_version=str(served.version),
        id=request_id,
        parameters=params,
        outputs=outputs,
        raw_output_contents=contents,
    )


# ---- the service ------------------------------------------------------------------------------

Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[tuple[Any, int]]]


def rpc(endpoint: str, model_field: str | None = None) -> Callable[[Handler], Callable]:
    """Wrap a handler that returns ``(response, http_status)``: count it in the request
    metrics under ``endpoint`` (``model`` from the request's ``model_field``, ``"unknown"``
    when the repository has no such name), and answer an :class:`ApiError` with its gRPC
    status code, message and headers (``retry-after`` on a full queue) as trailers.
    Anything else is logged and answered ``INTERNAL`` naming only its type. A call still
    running when the shutdown's grace ends (:meth:`InferenceService.end_grace` cancels it)
    is answered ``UNAVAILABLE`` with HTTP's 503 words and a ``retry-after`` trailer."""

    def wrap(handler: Handler) -> Callable:
        @functools.wraps(handler)
        async def call(self: InferenceService, request, context: grpc.aio.ServicerContext):
            t0 = time.perf_counter()
            status = 500
            metrics = self.runtime.metrics
            metrics.inflight.inc()
            task = asyncio.current_task()
            self.calls.add(task)
            try:
                if isinstance(request, MalformedMessage):
                    raise ApiError(400, request.message)
                response, status = await handler(self, request, context)
                return response
            except ApiError as e:
                status = e.status
                trailers = tuple((k.lower(), v) for k, v in (e.headers or {}).items())
                await context.abort(status_code(e.status), e.message, trailers)
            except asyncio.CancelledError:
                if self.grace_over is None:
                    status = CLIENT_GONE
                    raise
                # The shutdown's grace ran out: say so (gRPC's own stop would cancel the
                # call with "Cancelling all calls", read as the client's doing).
                task.uncancel()
                status = 503
                trailers = (("retry-after", SHUTDOWN_RETRY_AFTER),)
                await context.abort(grpc.StatusCode.UNAVAILABLE, self.grace_over, trailers)
            except Exception as e:
                log.exception("unhandled error in gRPC %s", endpoint)
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"internal server error ({type(e).__name__})"
                )
            finally:
                self.calls.discard(task)
                metrics.inflight.dec()
                self.observe(request, model_field, endpoint, status, time.perf_counter() - t0)

        return call

    return wrap


# Seconds past the grace at which gRPC's own stop cancels what is left: the calls cut off by
# InferenceService.end_grace are answered within this, so in practice nothing is.
STOP_MARGIN_S = 5.0

# The protocol extensions ServerMetadata lists over gRPC (see ServerMetadata).
GRPC_EXTENSIONS: tuple[str, ...] = ()


class MalformedMessage:
    """A request whose bytes are no message of its method's type, as :class:`DecodeGuard`
    hands it on: the handler's :func:`rpc` answers it ``INVALID_ARGUMENT`` (HTTP's 400 for
    bytes that are not JSON) where gRPC's own deserializer failure is ``UNKNOWN``."""

    def __init__(self, kind: str, error: Exception):
        self.message = f"malformed {kind} message: {error}"


class AmbiguousMessage(MalformedMessage):
    """A request whose bytes give a map key, a field that is not repeated or a oneof twice
    (:func:`service.grpc.strict.first_ambiguity`), which protobuf would read by dropping one
    in silence: answered ``INVALID_ARGUMENT`` as HTTP answers a JSON key given twice (400).
    ``request`` is the message as protobuf read it (its model names the metrics' label)."""

    def __init__(self, request: Any, message: str):
        self.request, self.message = request, message


def request_type(method: str) -> Descriptor | None:
    """The request message type of the full method name ``/inference.GRPCInferenceService/
    ModelInfer`` (``None`` for a method the protocol does not have)."""
    service, _, name = method.strip("/").rpartition("/")
    found = pb.DESCRIPTOR.services_by_name.get(service.rpartition(".")[2])
    rpc_method = found.methods_by_name.get(name) if found is not None else None
    return rpc_method.input_type if rpc_method is not None else None


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Wraps each method's request deserializer so that bytes which do not parse become a
    :class:`MalformedMessage` for the handler instead of an exception inside gRPC, and bytes
    that give one value twice an :class:`AmbiguousMessage` instead of the message protobuf
    reads from them (the last one kept)."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = self._handlers.get(method)  # one wrapped handler per method, built once
        if handler is None:
            handler = await continuation(handler_call_details)
            if handler is None:  # no such method (not cached: names are the client's)
                return None
            if handler.request_deserializer is not None:
                handler = handler._replace(
                    request_deserializer=self._guard(handler.request_deserializer, method)
                )
            self._handlers[method] = handler
        return handler

    @staticmethod
    def _guard(deserialize: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
        kind = method.rsplit("/", 1)[-1] + "Request"
        descriptor = request_type(method)
        if descriptor is not None and not descriptor.fields:
            descriptor = None  # an empty message (ServerLive...): nothing to give twice

        def read(data: bytes) -> Any:
            try:
                request = deserialize(data)
            except DecodeError as e:
                return MalformedMessage(f"inference.{kind}", e)
            if descriptor is not None:
                twice = first_ambiguity(descriptor, data)
                if twice is not None:
                    return AmbiguousMessage(request, twice)
            return request

        return read


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over one app's :class:`Runtime`.

    ``calls`` holds the tasks of the calls being answered; ``grace_over`` is ``None`` until
    :meth:`end_grace`, then the words those calls are answered with."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.calls: set[asyncio.Task] = set()
        self.grace_over: str | None = None

    def end_grace(self) -> None:
        """The shutdown's grace (``graceful_timeout_s``) is over: cancel every call still
        running, each answered ``UNAVAILABLE`` by :func:`rpc` (503 in the metrics) and its
        queued or running solve dropped, as HTTP's requests are answered 503."""
        self.grace_over = grace_ran_out(self.runtime.settings.graceful_timeout_s)
        for task in list(self.calls):
            task.cancel()

    def observe(
        self, request, model_field: str | None, endpoint: str, status: int, seconds: float
    ) -> None:
        """One call in ``mondeq_requests_total`` and ``mondeq_request_duration_seconds``."""
        model = ""
        if isinstance(request, AmbiguousMessage):
            request = request.request
        if model_field is not None:
            name = getattr(request, model_field, "")  # "": a MalformedMessage
            model = name if name in self.runtime.names() else "unknown"
        try:
            m = self.runtime.metrics
            m.requests.labels(model, endpoint, str(status)).inc()
            m.request_duration.labels(model, endpoint).observe(seconds)
        except Exception:  # metrics never fail a call
            log.exception("gRPC request metrics")

    @rpc("grpc_server_live")
    async def ServerLive(self, request, context):
        """Live while the process answers."""
        return pb.ServerLiveResponse(live=True), 200

    @rpc("grpc_server_ready")
    async def ServerReady(self, request, context):
        """Ready as ``GET /v2/health/ready`` is (first load done, a model can serve, not
        shutting down); ``ready: false`` is an answer, not an error."""
        repo = self.runtime.repo
        ready = repo is not None and repo.ready
        return pb.ServerReadyResponse(ready=ready), 200 if ready else 503

    @rpc("grpc_model_ready", "name")
    async def ModelReady(self, request, context):
        """``ready: false`` while the model (version) cannot serve; ``NOT_FOUND`` for an
        unknown model or version (as HTTP's 404)."""
        try:
            self.runtime.repository().entry(request.name, request.version or None)
        except NotFound as e:
            raise ApiError(404, str(e)) from None
        except NotReady:
            return pb.ModelReadyResponse(ready=False), 503
        return pb.ModelReadyResponse(ready=True), 200

    @rpc("grpc_server_metadata")
    async def ServerMetadata(self, request, context):
        """``GET /v2``'s name and version, and the extensions this gRPC service serves:
        none (binary tensors are HTTP's framing, raw contents are gRPC's own; statistics and
        the model repository are served over HTTP only, so listing them here would send
        Triton's tooling to RPCs that answer UNIMPLEMENTED)."""
        d = await v2.server_metadata()
        return pb.ServerMetadataResponse(**{**d, "extensions": GRPC_EXTENSIONS}), 200

    @rpc("grpc_model_metadata", "name")
    async def ModelMetadata(self, request, context):
        """``GET /v2/models/{name}[/versions/{version}]``'s metadata."""
        version = request.version or None
        served = self.runtime.served(request.name, version)
        d = await v2.model_metadata(request.name, version, served, self.runtime)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return (
            pb.ModelMetadataResponse(
                name=d["name"],
                versions=d["versions"],
                platform=d["platform"],
                inputs=[tensor(**t) for t in d["inputs"]],
                outputs=[tensor(**t) for t in d["outputs"]],
            ),
            200,
        )

    @rpc("grpc_infer", "model_name")
    async def ModelInfer(self, request, context):
        """``POST /v2/models/{name}/infer`` over gRPC: one FP32 input ``[B, C, H, W]`` of
        pixels in [0, 1] as raw or typed contents; ``parameters`` may set ``method``,
        ``tol``, ``max_iter``, ``stop`` and ``logit_tol`` (double, int64 or string
        parameters as their JSON counterparts); ``outputs`` picks among
        :data:`OUTPUT_TYPES`. The answer mirrors the input's form (raw or typed)."""
        rt = self.runtime
        served = rt.served(request.model_name, request.model_version or None)
        key = solve_key(served, solver_overrides(request.parameters))
        wanted = requested_outputs(request)
        x, raw = request_pixels(served, request, rt.settings.max_request_batch)
        ans = await solve(served, x, key)
        return infer_response(request.model_name, served, request.id, ans, wanted, raw), 200


class GrpcServer:
    """The gRPC front end of one app: ``grpc.aio`` on ``settings.host:settings.grpc_port``.

    Messages over ``max_body_bytes`` are refused by gRPC itself (``RESOURCE_EXHAUSTED``)
    before they reach a handler. On shutdown it stops taking calls and lets those in flight
    finish within ``graceful_timeout_s``, as uvicorn does for HTTP; those still running then
    are answered ``UNAVAILABLE`` saying so (:meth:`InferenceService.end_grace`), before
    gRPC's own stop, :data:`STOP_MARGIN_S` later, would cancel them without a word.

    Args:
        runtime: the app's runtime.
        share_port: listen with ``SO_REUSEPORT``, so that every worker of ``--workers N``
            serves the port and the kernel spreads connections over them (the solver process
            holds the port bound with it, :func:`service.frontend.reserve_port`, so that no
            other program can take it). Off, a port in use is an error.
    """

    def __init__(self, runtime: Runtime, *, share_port: bool = False):
        self.runtime = runtime
        self.share_port = share_port
        s = runtime.settings
        host = f"[{s.host}]" if ":" in s.host and not s.host.startswith("[") else s.host
        self.address = f"{host}:{s.grpc_port}"
        self.server: grpc.aio.Server | None = None
        self.service = InferenceService(runtime)
        self._stopping: asyncio.Task | None = None
        self._grace_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            RuntimeError: the address cannot be bound (in use, or no such interface).
        """
        s = self.runtime.settings
        server = grpc.aio.server(
            interceptors=[DecodeGuard()],
            options=[
                ("grpc.max_receive_message_length", s.max_body_bytes),
                # A port in use is an error, not a second server sharing it silently,
                # unless the workers of one server share it on purpose.
                ("grpc.so_reuseport", 1 if self.share_port else 0),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.service, server)
        try:
            bound = server.add_insecure_port(self.address)
        except RuntimeError as e:
            raise RuntimeError(f"cannot serve gRPC on {self.address}: {e}") from None
        if not bound:  # older grpcio reports a failed bind as port 0
            raise RuntimeError(f"cannot serve gRPC on {self.address}")
        await server.start()
        self.server = server
        log.info("gRPC (Open Inference Protocol) on %s", self.address)

    def drain(self) -> None:
        """Stop taking calls now; those in flight get ``graceful_timeout_s`` to finish, then
        are answered ``UNAVAILABLE`` (idempotent; :meth:`stop` waits for it)."""
        if self.server is not None and self._stopping is None:
            grace = self.runtime.settings.graceful_timeout_s
            loop = asyncio.get_running_loop()
            self._grace_timer = loop.call_later(grace, self.service.end_grace)
            self._stopping = asyncio.ensure_future(self.server.stop(grace + STOP_MARGIN_S))

    async def stop(self) -> None:
        """:meth:`drain`, and wait until every call has been answered (or the grace ran out)."""
        self.drain()
        if self._stopping is not None:
            await self._stopping
        if self._grace_timer is not None:
            self._grace_timer.cancel()
