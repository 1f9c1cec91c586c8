"""The binary tensor data extension of the V2 HTTP protocol (docs/service.md), through a real
server on the default fmnist-fc model, with real Fashion-MNIST test images and real clients:
tritonclient's HTTP client and KServe's ``InferenceRESTClient``.

Binary and JSON answers are compared bit for bit; every malformed binary body is refused
with a 4xx naming what was wrong, and the requests around it are answered as before.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_support import ADMIN_TOKEN, LiveServer, metric, metric_samples

from training.data import DEBIAN_FASHION_MNIST, read_idx

ROOT = Path(__file__).resolve().parents[2]
MODEL = "fmnist-fc"
IMAGES = DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz"
HEADER = "Inference-Header-Content-Length"
ALL_OUTPUTS = (
    "logits",
    "probabilities",
    "label",
    "iterations",
    "residual",
    "converged",
    "certified_radius",
    "error_bound",
    "label_proven",
    "logit_error_bound",
)
NUMPY_TYPES = {"FP32": "<f4", "INT64": "<i8", "INT32": "<i4", "BOOL": "?"}

pytestmark = pytest.mark.skipif(
    not IMAGES.is_file(),
    reason="Debian package dataset-fashion-mnist is not installed (make test installs it)",
)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """The first 64 Fashion-MNIST test images, ``(64, 1, 28, 28)`` float32 in [0, 1]."""
    return (read_idx(IMAGES)[:64].astype(np.float32) / 255.0)[:, None]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real server on a copy of fmnist-fc, α as the checkpoint holds it (answers stay
    comparable: no tuning, no drift retunes)."""
    root = tmp_path_factory.mktemp("binary")
    shutil.copytree(ROOT / "models" / MODEL, root / MODEL)
    srv = LiveServer(
        model_dir=root,
        admin_token=ADMIN_TOKEN,
        tune_at_load=False,
        retune_factor=0,
        max_delay_ms=1,
    ).start()
    yield srv
    srv.stop()


def json_request(x: np.ndarray, outputs=ALL_OUTPUTS) -> dict:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ],
        "outputs": [{"name": n} for n in outputs],
    }


def binary_body(header: dict, *parts: bytes) -> tuple[bytes, dict]:
    """``(body, headers)`` of a binary-extension request: the JSON header, then the parts."""
    head = json.dumps(header).encode()
    return head + b"".join(parts), {
        HEADER: str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def binary_request(x: np.ndarray, outputs=ALL_OUTPUTS) -> tuple[bytes, dict]:
    raw = x.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in outputs],
    }
    return binary_body(header, raw)


def split_answer(r: httpx.Response) -> tuple[dict, dict[str, bytes]]:
    """A binary answer → its JSON header and each binary output's bytes."""
    n = int(r.headers[HEADER])
    head = json.loads(r.content[:n])
    parts, at = {}, n
    for o in head["outputs"]:
        if "data" in o:
            continue
        size = o["parameters"]["binary_data_size"]
        parts[o["name"]] = r.content[at : at + size]
        at += size
    assert at == len(r.content)
    return head, parts


def json_bytes(output: dict) -> bytes:
    """A JSON output's values as the little-endian bytes of its datatype (null: NaN)."""
    values = [float("nan") if v is None else v for v in output["data"]]
    return np.asarray(values).astype(NUMPY_TYPES[output["datatype"]]).tobytes()


def post(srv: LiveServer, content: bytes, headers: dict | list) -> httpx.Response:
    return httpx.post(f"{srv.url}/v2/models/{MODEL}/infer", content=content, headers=headers)


def json_labels(srv: LiveServer, images: np.ndarray) -> list[int]:
    """The JSON path's labels of ``images``, one request each."""
    with srv.client() as c:
        return [
            c.post(f"/v2/models/{MODEL}/infer", json=json_request(x[None], ["label"])).json()[
                "outputs"
            ][0]["data"][0]
            for x in images
        ]


# ---- the case: tritonclient's binary inputs ---------------------------------------------


def test_tritonclient_binary_inputs_get_the_json_paths_labels(served, images):
    """tritonclient 2.73 with binary inputs was answered "malformed JSON body"; now each of
    64 test images, sent as binary input with binary outputs, gets exactly the JSON path's
    label, logits and iterations."""
    import tritonclient.http as triton

    want = json_labels(served, images)
    client = triton.InferenceServerClient(served.url.removeprefix("http://"))
    labels = []
    for x in images:
        inp = triton.InferInput("input", [1, 1, 28, 28], "FP32")
        inp.set_data_from_numpy(x[None], binary_data=True)
        outputs = [triton.InferRequestedOutput(n, binary_data=True) for n in ALL_OUTPUTS]
        result = client.infer(MODEL, [inp], outputs=outputs)
        assert result.as_numpy("label").dtype == np.int64
        assert result.as_numpy("logits").shape == (1, 10)
        assert result.as_numpy("converged").dtype == np.bool_
        labels.append(int(result.as_numpy("label")[0]))
    assert labels == want
    # No outputs named: tritonclient asks for all of them as binary (binary_data_output).
    inp = triton.InferInput("input", [4, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(images[:4], binary_data=True)
    result = client.infer(MODEL, [inp])
    assert result.as_numpy("label").tolist() == want[:4]
    assert [o["name"] for o in result.get_response()["outputs"]] == list(ALL_OUTPUTS[:-1])
    # JSON inputs, binary outputs, and solver parameters through the client.
    inp = triton.InferInput("input", [1, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(images[:1], binary_data=False)
    out = [triton.InferRequestedOutput("iterations", binary_data=True)]
    result = client.infer(MODEL, [inp], outputs=out, parameters={"max_iter": 2})
    assert result.as_numpy("iterations").tolist() == [2]
    client.close()


def test_binary_and_json_answers_are_bit_identical(served, images):
    """Every output of a batch of 8 images, as binary bytes and as JSON numbers read back as
    their datatype: the same bits (a withheld radius is NaN in bytes, null in JSON)."""
    x = images[8:16]
    with served.client() as c:
        plain = c.post(f"/v2/models/{MODEL}/infer", json=json_request(x)).json()
    r = post(served, *binary_request(x))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    head, parts = split_answer(r)
    assert [o["name"] for o in head["outputs"]] == list(ALL_OUTPUTS)
    for o, p in zip(head["outputs"], plain["outputs"], strict=True):
        assert "data" not in o
        assert (o["name"], o["shape"], o["datatype"]) == (p["name"], p["shape"], p["datatype"])
        assert o["parameters"]["binary_data_size"] == len(parts[o["name"]])
        assert parts[o["name"]] == json_bytes(p), o["name"]
    assert head["parameters"]["batch_size"] == plain["parameters"]["batch_size"] == 8
    # BOOL is one byte a value, 1 or 0.
    assert set(parts["converged"]) <= {0, 1}
    assert len(parts["converged"]) == 8


def test_binary_output_flags_follow_the_spec(served, images):
    """``binary_data_output`` makes every output binary; an output's own ``binary_data``
    overrides it; with no binary output the answer is plain JSON without the header."""
    raw = images[0].astype("<f4").tobytes()
    inp = {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32"}
    header = {
        "inputs": [{**inp, "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "label"}, {"name": "logits", "parameters": {"binary_data": False}}],
    }
    head, parts = split_answer(post(served, *binary_body(header, raw)))
    assert list(parts) == ["label"]
    assert [len(o["data"]) for o in head["outputs"] if "data" in o] == [10]
    # Binary input, JSON answer.
    header = {"inputs": header["inputs"], "outputs": [{"name": "label"}]}
    r = post(served, *binary_body(header, raw))
    assert r.status_code == 200 and HEADER not in r.headers
    assert r.headers["content-type"] == "application/json"
    assert r.json()["outputs"][0]["data"] == json_labels(served, images[:1])


# KServe's client runs in a process of its own: its protobuf modules and tritonclient.grpc's
# (imported by other test modules in this process) register the same ``inference.*`` names,
# and protobuf refuses a second registration.
KSERVE_REST_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    import numpy as np
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    async def main(url, model, x):
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
        try:
            ready = [await client.is_server_ready(url), await client.is_model_ready(url, model)]
            inp = InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            outputs = [
                RequestedOutput("label", parameters={"binary_data": True}),
                RequestedOutput("probabilities", parameters={"binary_data": False}),
            ]
            request = InferRequest(model, [inp], request_outputs=outputs)
            res = await client.infer(url, request, model_name=model)
        finally:
            await client.close()
        by_name = {o.name: o for o in res.outputs}
        print(json.dumps({
            "ready": ready,
            "label": by_name["label"].as_numpy().tolist(),
            "probabilities": np.asarray(by_name["probabilities"].data, dtype=float).tolist(),
        }))

    url, model = sys.argv[1], sys.argv[2]
    x = np.asarray(json.loads(sys.stdin.read()), dtype=np.float32)
    asyncio.run(main(url, model, x))
    """
)


def test_kserve_rest_client_binary_in_and_out(served, images):
    """KServe's InferenceRESTClient (V2): readiness, then binary inputs with binary and JSON
    outputs; the labels are the JSON path's."""
    if importlib.util.find_spec("kserve") is None:
        pytest.skip("kserve is not installed (make test installs it)")
    want = json_labels(served, images[:8])
    run = subprocess.run(
        [sys.executable, "-c", KSERVE_REST_SCRIPT, served.url, MODEL],
        input=json.dumps(images[:8].tolist()), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["ready"] == [True, True]
    assert got["label"] == want
    probabilities = np.asarray(got["probabilities"], dtype=np.float64).reshape(8, 10)
    assert probabilities.argmax(axis=1).tolist() == want


# ---- refusals -----------------------------------------------------------------------------------

GOOD = np.full((1, 1, 28, 28), 0.5, dtype="<f4")
RAW = GOOD.tobytes()  # 3,136 bytes
INPUT = {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32"}


def framed(size: object = 3136, tail: bytes = RAW, **change) -> tuple[bytes, dict]:
    """A one-input binary request claiming ``size`` bytes and carrying ``tail``."""
    header = {"inputs": [{**INPUT, "parameters": {"binary_data_size": size}, **change}]}
    return binary_body(header, tail)


def headerless() -> tuple[bytes, dict]:
    """A body whose input claims binary data, sent without the header (JSON only)."""
    header = {"inputs": [{**INPUT, "parameters": {"binary_data_size": 3136}}]}
    return json.dumps(header).encode(), {"Content-Type": "application/json"}


def header_body(value: str) -> tuple[bytes, dict]:
    body, headers = framed()
    return body, {**headers, HEADER: value}


def header_twice(second: str) -> tuple[bytes, list]:
    """A framed body whose header is sent twice, the second time as ``second``."""
    body, headers = framed()
    return body, [*headers.items(), (HEADER, second)]


MALFORMED = {
    "header twice, different values": (
        header_twice("5"),
        "Inference-Header-Content-Length given with different values ['118', '5']: send it "
        "once",
    ),
    "header not a number": (
        header_body("abc"),
        "Inference-Header-Content-Length must be the JSON header's length in bytes, got 'abc'",
    ),
    "header negative": (
        header_body("-5"),
        "Inference-Header-Content-Length must be the JSON header's length in bytes, got '-5'",
    ),
    "header longer than the body": (
        header_body("99999"),
        "Inference-Header-Content-Length is 99999 bytes but the whole body holds only 3254",
    ),
    "header cuts the JSON": (
        header_body("20"),
        "malformed JSON body (Invalid JSON: EOF while parsing a value at line 1 column 20): the "
        "JSON is read from the body's first 20 bytes, as Inference-Header-Content-Length says; "
        "it must be the JSON's exact length",
    ),
    "header past the JSON's end": (  # was a bare "malformed JSON body (trailing characters)"
        header_body("128"),
        "malformed JSON body (Invalid JSON: trailing characters at line 1 column 119): the "
        "JSON is read from the body's first 128 bytes, as Inference-Header-Content-Length "
        "says; it must be the JSON's exact length",
    ),
    "size does not fit the shape": (
        framed(100, RAW[:100]),
        "input 'input' has 100 bytes of binary data; FP32 [1, 1, 28, 28] needs 3136 "
        "(4 bytes a value)",
    ),
    "body truncated": (
        framed(tail=RAW[:3000]),
        "binary data truncated: input 'input' needs bytes 0..3136 after the JSON header, "
        "which has 3000",
    ),
    "bytes no input claims": (
        framed(tail=RAW + b"\0" * 8),
        "8 bytes after the JSON header belong to no input (the inputs' binary_data_size add "
        "up to 3136, the binary part holds 3144)",
    ),
    "binary and JSON data in one input": (
        framed(data=[0.5] * 784),
        "input 'input' has both 'data' and binary_data_size: send one",
    ),
    "size not an integer": (
        framed("3136"),
        "input 'input': binary_data_size must be a non-negative integer count of bytes, "
        "got '3136'",
    ),
    "size negative": (
        framed(-1),
        "input 'input': binary_data_size must be a non-negative integer count of bytes, got -1",
    ),
    "size a boolean": (
        framed(True),
        "input 'input': binary_data_size must be a non-negative integer count of bytes, "
        "got True",
    ),
    "binary data without the header": (
        headerless(),
        "input 'input' has binary_data_size but the request has no "
        "Inference-Header-Content-Length header saying where the JSON ends",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_binary_bodies_are_400_naming_the_fault(served, case):
    (body, headers), message = MALFORMED[case]
    r = post(served, body, headers)
    assert r.status_code == 400, r.text
    assert r.json() == {"error": message}


def json_twin(**change) -> dict:
    return {"inputs": [{**INPUT, "data": GOOD.ravel().tolist(), **change}]}


@pytest.mark.parametrize(
    ("change", "raw", "message"),
    [
        ({"datatype": "INT8"}, b"\0" * 784, "input datatype must be FP32, got 'INT8'"),
        ({"datatype": "FP64"}, GOOD.astype("<f8").tobytes(), "input datatype must be FP32"),
        ({"shape": [1, 1, 8, 8]}, b"\0" * 256, "input shape must be [B, 1, 28, 28], got [1, 1"),
        ({"shape": [0, 1, 28, 28]}, b"", "batch size must lie in [1, "),
    ],
    ids=["INT8", "FP64", "shape", "empty batch"],
)  # fmt: skip
def test_a_well_framed_tensor_the_model_cannot_take_is_422_as_in_json(served, change, raw, message):
    """Datatype and shape mismatches are the JSON path's errors, word for word."""
    header = {"inputs": [{**INPUT, **change, "parameters": {"binary_data_size": len(raw)}}]}
    r = post(served, *binary_body(header, raw))
    with served.client() as c:
        plain = c.post(f"/v2/models/{MODEL}/infer", json=json_twin(**change))
    assert r.status_code == plain.status_code == 422, r.text
    assert r.json()["error"] == plain.json()["error"]
    assert r.json()["error"].startswith(message)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), "input data holds NaN or Inf"),
        (float("inf"), "input data holds NaN or Inf"),
        (2.0, "input data must hold pixel intensities in [0, 1] (found values in [0.5, 2])"),
    ],
)
def test_binary_pixels_obey_the_json_rules(served, value, message):
    x = GOOD.copy()
    x.flat[7] = value
    r = post(served, *framed(tail=x.tobytes()))
    assert r.status_code == 422
    assert r.json()["error"].startswith(message)


def test_content_type_and_output_flags_are_checked(served):
    body, headers = framed()
    r = post(served, body, {**headers, "Content-Type": "text/plain"})
    assert r.status_code == 415
    assert r.json()["error"] == (
        "content type 'text/plain': with Inference-Header-Content-Length, send "
        "application/octet-stream or JSON"
    )
    # No Content-Type at all (tritonclient sends none) and JSON are both fine.
    no_type = {HEADER: headers[HEADER]}
    assert post(served, body, no_type).status_code == 200
    assert post(served, body, {**no_type, "Content-Type": "application/json"}).status_code == 200
    raw_input = [{**INPUT, "parameters": {"binary_data_size": len(RAW)}}]
    classify = {"classification": 1}  # Triton's classification extension
    for header, message in (
        (
            {"inputs": raw_input, "parameters": {"binary_data_output": "yes"}},
            "parameters.binary_data_output must be true or false, got 'yes'",
        ),
        (
            {"inputs": raw_input, "outputs": [{"name": "label", "parameters": {"binary_data": 1}}]},
            "output 'label': binary_data must be true or false, got 1",
        ),
        (
            {"inputs": raw_input, "outputs": [{"name": "label", "parameters": classify}]},
            "output 'label': the classification extension is not served; ask for 'label' or "
            "'probabilities'",
        ),
    ):  # fmt: skip
        r = post(served, *binary_body(header, RAW))
        assert r.status_code == 422, r.text
        assert r.json()["error"] == message


def test_bad_binary_bodies_lose_nothing_for_the_requests_around_them(served, images):
    """32 good binary requests interleaved with 32 malformed ones, 8 at a time: every good
    one gets its JSON label, every bad one a 400, and the server counts no 5xx."""
    want = json_labels(served, images[:16])
    bad = [case[0] for case in MALFORMED.values()]
    url = f"/v2/models/{MODEL}/infer"
    with served.client() as c:
        before = metric_samples(c.get("/metrics").text)

        def good(i: int) -> int:
            body, headers = binary_request(images[i % 16][None], ["label"])
            r = c.post(url, content=body, headers=headers)
            assert r.status_code == 200, r.text
            return struct.unpack("<q", split_answer(r)[1]["label"])[0]

        def refused(i: int) -> int:
            body, headers = bad[i % len(bad)]
            return c.post(url, content=body, headers=headers).status_code

        with ThreadPoolExecutor(8) as pool:
            goods = [pool.submit(good, i) for i in range(32)]
            bads = [pool.submit(refused, i) for i in range(32)]
            assert [f.result() for f in goods] == [want[i % 16] for i in range(32)]
            assert {f.result() for f in bads} == {400}
        after = metric_samples(c.get("/metrics").text)
    for code in ("500", "503"):
        assert metric(after, "mondeq_requests_total", code=code) == metric(
            before, "mondeq_requests_total", code=code
        )
    added = metric(after, "mondeq_requests_total", endpoint="v2_infer", code="400") - metric(
        before, "mondeq_requests_total", endpoint="v2_infer", code="400"
    )
    assert added == 32
