"""A gRPC request whose bytes give one value twice is refused, as HTTP refuses a JSON key given
twice (tests/service/test_duplicate_keys.py): INVALID_ARGUMENT naming the key or field and
where it is, counted as 400. Protobuf reads such bytes by keeping the last value ("last one
wins"), so ``stop`` sent twice in ``parameters`` was solved with the second and the client
never learnt that its first was dropped.

The messages are written with tritonclient's copy of the protocol and joined on the wire:
protobuf reads two messages one after the other as one, which is how a map entry or a field
comes to be there twice. The server runs in a subprocess of its own (see
tests/service/test_grpc.py: the server's and the client's generated messages cannot share a
process).
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_support import (
    FC_CONFIG,
    free_port,
    make_checkpoint,
    metric,
    metric_samples,
    start_subprocess_server,
    wait_ready_url,
)

grpcclient = pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402  (after the skip: grpcio comes with tritonclient[grpc])
from tritonclient.grpc import service_pb2 as pb  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
WHY_MAP = "a map may give each key once (protobuf keeps the last one and drops the other)"
WHY_FIELD = (
    "a field that is not repeated may be given once (protobuf keeps the last one and drops "
    "the other)"
)
WHY_ONEOF = "an InferParameter holds one value (protobuf keeps the last one and drops the other)"
DEFAULT_OUTPUTS = [
    "logits",
    "probabilities",
    "label",
    "iterations",
    "residual",
    "converged",
    "certified_radius",
    "error_bound",
    "label_proven",
]
X = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(1, 1, 8, 8)


class Served:
    """``python -m service`` with HTTP on ``url`` and gRPC on ``target``."""

    def __init__(self, model_dir: Path):
        port, grpc_port = free_port(), free_port()
        self.url, self.target = f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
        self.proc = start_subprocess_server(
            model_dir, port, MONDEQ_GRPC_PORT=str(grpc_port), MONDEQ_TUNE_AT_LOAD="false"
        )
        try:
            wait_ready_url(self.url, 120)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-duplicates")
    make_checkpoint(root / "fc/1/model.pt", FC_CONFIG)
    srv = Served(root)
    yield srv
    srv.stop()


def field(number: int, body: bytes) -> bytes:
    """One length-delimited field (wire type 2) holding ``body``: a message or a string."""
    size, n = b"", len(body)
    while True:  # the length as a base-128 varint
        size += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return bytes([number << 3 | 2]) + size + body


def entry(key: str, value: pb.InferParameter) -> bytes:
    """One ``parameters`` map entry as the wire carries it: key (1) and value (2)."""
    return field(1, key.encode()) + field(2, value.SerializeToString())


INPUT = pb.ModelInferRequest.InferInputTensor(
    name="input", datatype="FP32", shape=list(X.shape)
).SerializeToString()


def infer(*, request: bytes = b"", tensor: bytes = b"") -> bytes:
    """A good ModelInfer request for fc (one raw 1×1×8×8 input), then ``request`` (fields of
    the request) and, inside the input tensor, ``tensor`` (fields of the tensor)."""
    return field(1, b"fc") + field(5, INPUT + tensor) + field(7, X.tobytes()) + request


def params(**given: pb.InferParameter) -> bytes:
    """Request-level parameters, one map entry each (field 4)."""
    return b"".join(field(4, entry(k, v)) for k, v in given.items())


def call(served, data: bytes, method: str = INFER) -> tuple[grpc.StatusCode, object]:
    """``(status, details)``, or ``(OK, output names)`` for an answer."""
    with grpc.insecure_channel(served.target) as channel:
        rpc = channel.unary_unary(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        try:
            answer = rpc(data, timeout=60)
        except grpc.RpcError as e:
            return e.code(), e.details()
    if method != INFER:
        return grpc.StatusCode.OK, None
    return grpc.StatusCode.OK, [o.name for o in pb.ModelInferResponse.FromString(answer).outputs]


def param(**value) -> pb.InferParameter:
    return pb.InferParameter(**value)


STOP_TOL, STOP_LABEL = param(string_param="tol"), param(string_param="label")
BINARY, NOT_BINARY = param(bool_param=True), param(bool_param=False)

# (case, the request's bytes, the whole message)
REFUSED = [
    (
        "request parameters: stop twice, two values",
        infer(request=field(4, entry("stop", STOP_TOL)) + field(4, entry("stop", STOP_LABEL))),
        f'duplicate key "stop" in parameters: {WHY_MAP}',
    ),
    (
        "two whole messages joined, each with its stop (protobuf reads them as one)",
        infer(request=params(stop=STOP_TOL))
        + pb.ModelInferRequest(parameters={"stop": STOP_LABEL}).SerializeToString(),
        f'duplicate key "stop" in parameters: {WHY_MAP}',
    ),
    (
        "request parameters: the same key with the same value is still given twice",
        infer(request=params(tol=param(double_param=0.5)) + params(tol=param(double_param=0.5))),
        f'duplicate key "tol" in parameters: {WHY_MAP}',
    ),
    (
        "request parameters: the second of three keys repeated after another",
        infer(
            request=params(max_iter=param(int64_param=5), tol=param(double_param=0.5))
            + params(max_iter=param(int64_param=50))
        ),
        f'duplicate key "max_iter" in parameters: {WHY_MAP}',
    ),
    (
        "an input's parameters",
        infer(tensor=field(4, entry("note", BINARY)) + field(4, entry("note", NOT_BINARY))),
        f'duplicate key "note" in inputs[0].parameters: {WHY_MAP}',
    ),
    (
        "the second output's parameters",
        infer(
            request=field(6, field(1, b"label"))
            + field(
                6,
                field(1, b"logits")
                + field(2, entry("binary_data", BINARY))
                + field(2, entry("binary_data", NOT_BINARY)),
            )
        ),
        f'duplicate key "binary_data" in outputs[1].parameters: {WHY_MAP}',
    ),
    (
        "a parameter with two values, a string and a bool",
        infer(
            request=field(
                4,
                field(1, b"stop")
                + field(2, STOP_LABEL.SerializeToString() + BINARY.SerializeToString()),
            )
        ),
        f'parameters["stop"] gives 2 values (bool_param, string_param): {WHY_ONEOF}',
    ),
    (
        "the request's id twice",
        infer(request=field(3, b"a") + field(3, b"b")),
        f'duplicate field "id" in the request: {WHY_FIELD}',
    ),
    (
        "model_name twice: which model?",
        infer(request=field(1, b"other")),
        f'duplicate field "model_name" in the request: {WHY_FIELD}',
    ),
    (
        "an input's datatype twice",
        infer(tensor=field(2, b"FP64")),
        f'duplicate field "datatype" in inputs[0]: {WHY_FIELD}',
    ),
]


@pytest.mark.parametrize("case,data,message", REFUSED, ids=[c[0] for c in REFUSED])
def test_a_value_given_twice_is_invalid_argument(served, case, data, message):
    assert call(served, data) == (grpc.StatusCode.INVALID_ARGUMENT, message)


def test_model_metadata_and_ready_refuse_a_name_given_twice(served):
    twice = field(1, b"fc") + field(1, b"nope")
    for method in ("ModelMetadata", "ModelReady"):
        assert call(served, twice, f"/inference.GRPCInferenceService/{method}") == (
            grpc.StatusCode.INVALID_ARGUMENT,
            f'duplicate field "name" in the request: {WHY_FIELD}',
        )
        assert call(served, field(1, b"fc"), f"/inference.GRPCInferenceService/{method}") == (
            grpc.StatusCode.OK,
            None,
        )


def test_what_is_given_once_is_answered(served):
    """The same key in different maps is no repeat, nor are keys that differ; a request as
    protobuf writes it is answered."""
    data = infer(
        request=params(stop=STOP_LABEL, tol=param(double_param=1e-3))
        + field(6, field(1, b"label") + field(2, entry("stop", BINARY)))
        + field(6, field(1, b"logits") + field(2, entry("stop", BINARY))),
        tensor=field(4, entry("stop", BINARY)),
    )
    assert call(served, data) == (grpc.StatusCode.OK, ["label", "logits"])
    assert call(served, infer()) == (grpc.StatusCode.OK, DEFAULT_OUTPUTS)


def test_refusals_are_counted_as_400_under_the_model(served):
    def count() -> float:
        text = httpx.get(f"{served.url}/metrics").text
        return metric(
            metric_samples(text), "mondeq_requests_total", model="fc", endpoint="grpc_infer",
            code="400",
        )  # fmt: skip

    before = count()
    assert call(served, REFUSED[0][1])[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert count() == before + 1


def test_inputs_and_outputs_named_twice_get_the_http_answer(served):
    """Two inputs named ``input``, or an output asked for twice: over gRPC the HTTP message,
    INVALID_ARGUMENT for HTTP's 422."""
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": X.ravel().tolist()}
        ]
        * 2
    }
    r = httpx.post(f"{served.url}/v2/models/fc/infer", json=body)
    assert (r.status_code, r.json()["error"]) == (422, "expected exactly one input tensor, got 2")
    two_inputs = field(1, b"fc") + field(5, INPUT) + field(5, INPUT) + field(7, X.tobytes()) * 2
    assert call(served, two_inputs) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected exactly one input tensor, got 2",
    )

    body = {**body, "inputs": body["inputs"][:1], "outputs": [{"name": "label"}] * 2}
    r = httpx.post(f"{served.url}/v2/models/fc/infer", json=body)
    assert (r.status_code, r.json()["error"]) == (
        422,
        "outputs requested more than once: ['label']",
    )
    assert call(served, infer(request=field(6, field(1, b"label")) * 2)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "outputs requested more than once: ['label']",
    )
