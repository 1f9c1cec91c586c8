"""A JSON body that gives a key twice in one object is refused on every endpoint that reads
JSON, through a real server: 400 naming the key and the object it is in. It used to be read
as the parser reads it, last one wins, so ``"tol"`` given twice solved with the second and
the client never learnt that its first was dropped (RFC 8259 §4 leaves the meaning
undefined; I-JSON, RFC 7493 §2.3, forbids it)."""

from __future__ import annotations

import json

import pytest
from service_support import ADMIN_TOKEN

from service.decoding import duplicate_key, json_place

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JSON = {"content-type": "application/json"}
PIXELS = json.dumps([0.25] * 64)
ROWS = json.dumps([[0.25] * 8 for _ in range(8)])
INPUT = f'{{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": {PIXELS}}}'
WHY = "an object may give each key once (which of the two values counts is undefined, RFC 8259 §4)"


def refused(key: str, where: str) -> dict:
    return {"error": f"duplicate key {key} in {where}: {WHY}"}


# (label, path, headers, body, the key as the message quotes it, where it is)
CASES = [
    (
        "V2 inputs twice: the first was dropped",
        "/v2/models/fc/infer",
        {},
        f'{{"inputs": [{INPUT}], "inputs": [{INPUT}]}}',
        '"inputs"',
        "body",
    ),
    (
        "V2 tol twice in parameters",
        "/v2/models/fc/infer",
        {},
        f'{{"inputs": [{INPUT}], "parameters": {{"tol": 0.5, "tol": 1e-4}}}}',
        '"tol"',
        "body.parameters",
    ),
    (
        "V2 versioned path, the same key spelt with an escape",
        "/v2/models/fc/versions/1/infer",
        {},
        f'{{"inputs": [{INPUT}], "parameters": {{"max_iter": 3, "max_\\u0069ter": 50}}}}',
        '"max_iter"',
        "body.parameters",
    ),
    (
        "V2 a tensor's field twice",
        "/v2/models/fc/infer",
        {},
        '{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", '
        f'"data": {PIXELS}, "datatype": "FP32"}}]}}',
        '"datatype"',
        "body.inputs.0",
    ),
    (
        "V2 an output's parameters: the second output's flag twice",
        "/v2/models/fc/infer",
        {},
        f'{{"inputs": [{INPUT}], "outputs": [{{"name": "label"}}, '
        '{"name": "logits", "parameters": {"binary_data": true, "binary_data": false}}]}',
        '"binary_data"',
        "body.outputs.1.parameters",
    ),
    (
        "V2 a key twice where the shape is also wrong: the duplicate is named first",
        "/v2/models/fc/infer",
        {},
        '{"inputs": 3, "inputs": "x"}',
        '"inputs"',
        "body",
    ),
    (
        "classify top_k twice",
        "/v1/models/fc:classify",
        JSON,
        f'{{"inputs": {ROWS}, "top_k": 1, "top_k": 3}}',
        '"top_k"',
        "body",
    ),
    (
        "tune-alpha apply twice: which one switches α?",
        "/v1/models/fc/tune-alpha",
        {**AUTH, **JSON},
        '{"apply": true, "source": "calibration", "apply": false}',
        '"apply"',
        "body",
    ),
    (
        "reload: an empty object's key twice is still refused",
        "/v1/models/fc/reload",
        {**AUTH, **JSON},
        '{"version": 1, "version": 2}',
        '"version"',
        "body",
    ),
    (
        "repository index ready twice",
        "/v2/repository/index",
        {**AUTH, **JSON},
        '{"ready": true, "ready": false}',
        '"ready"',
        "body",
    ),
    (
        "repository load parameters twice",
        "/v2/repository/models/fc/load",
        {**AUTH, **JSON},
        '{"parameters": {}, "parameters": {"config": "{}"}}',
        '"parameters"',
        "body",
    ),
    (
        "repository unload: unload_dependents twice",
        "/v2/repository/models/fc/unload",
        {**AUTH, **JSON},
        '{"parameters": {"unload_dependents": false, "unload_dependents": true}}',
        '"unload_dependents"',
        "body.parameters",
    ),
]


@pytest.mark.parametrize(
    ("path", "headers", "body", "key", "where"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_a_key_given_twice_is_400_naming_it_and_its_object(client, path, headers, body, key, where):
    """Nothing is acted on: fc still answers from version 1, unloaded by no one (the unload
    and load cases would otherwise change what the next request gets)."""
    r = client.post(path, content=body.encode(), headers=headers)
    assert r.status_code == 400, r.text
    assert r.json() == refused(key, where)
    ready = client.get("/v2/models/fc/ready")
    assert ready.status_code == 200 and ready.json() == {"name": "fc", "ready": True}


def test_binary_extension_header_with_a_key_twice(client):
    """The JSON header of a binary body is read whole: the message names the key, not the
    header's length (which is right)."""
    raw = bytes(256)  # 64 zeros as FP32
    header = (
        b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", '
        b'"parameters": {"binary_data_size": 256, "binary_data_size": 256}}]}'
    )
    r = client.post(
        "/v2/models/fc/infer",
        content=header + raw,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 400, r.text
    assert r.json() == refused('"binary_data_size"', "body.inputs.0.parameters")


def test_a_body_too_wide_to_follow_is_located_by_line_and_column(client):
    """30,000 one-value arrays before the repeat: following each bracket to name the place
    would cost the event loop more than the parse, so the place is a line and column."""
    data = ", ".join(["[0.25]"] * 30_000)
    body = (
        '{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", '
        f'"data": [{data}]}}],\n "parameters": {{"tol": 0.5,\n  "tol": 0.001}}}}'
    )
    r = client.post("/v2/models/fc/infer", content=body.encode(), headers=JSON)
    assert r.status_code == 400, r.text
    assert r.json() == refused('"tol"', "the body at line 3 column 3")


def test_the_multipart_form_of_classify_refuses_a_field_twice_too(client):
    """The form's own rule (already in place), with its own words: the same kind of fault."""
    r = client.post(
        "/v1/models/fc:classify",
        files=[("file", ("a.png", b"not read", "image/png"))],
        data={"top_k": ["1", "3"]},
    )
    assert r.status_code == 422, r.text
    assert r.json() == {"error": "form field 'top_k' is given more than once: send it once"}


@pytest.mark.parametrize(
    "body",
    [
        # the same key in different objects: each output has its "name", each its parameters
        f'{{"inputs": [{INPUT}], "outputs": [{{"name": "label", "parameters": {{}}}}, '
        '{"name": "logits", "parameters": {}}], "parameters": {"tol": 0.001}}',
        # a key's text inside a string value, braces and escaped quotes in strings
        f'{{"id": "\\"tol\\": {{\\"tol\\": 1}}}} \\\\", "inputs": [{INPUT}], '
        '"parameters": {"tol": 0.001, "note": "}{"}}',
        # whitespace between a key and its colon, nested pixel data
        '{"inputs" : [{"name" : "input", "shape": [1, 1, 8, 8], "datatype": "FP32", '
        f'"data": [[{ROWS}]]}}]}}',
    ],
    ids=["same key in other objects", "keys' text in strings", "spacing and nesting"],
)
def test_keys_repeated_across_objects_or_inside_strings_pass(client, body):
    r = client.post("/v2/models/fc/infer", content=body.encode(), headers=JSON)
    assert r.status_code == 200, r.text
    assert r.json()["model_name"] == "fc"


@pytest.mark.parametrize(
    ("raw", "key", "where"),
    [
        (b'{"a": 1, "a": 2}', b'"a"', "body"),
        (b'{"a": {"x": 1, "x": 2}, "a": 3}', b'"x"', "body.a"),  # reading order
        (b'{"t\\u006fl": 1, "tol": 2}', b'"tol"', "body"),
        (b'{"\\u00e9": 1, "\xc3\xa9": 2}', b'"\xc3\xa9"', "body"),
        (b'{"a\\"b": 1, "a\\u0022b": 2}', b'"a\\u0022b"', "body"),
        (b'{"x": [1, "s,]", [2, {"k": []}], {"z": {"q": 1, "q" \n : 1}}]}', b'"q"', "body.x.3.z"),
        (b'{"a[": {"b{": {"c": 1, "c": 1}}}', b'"c"', "body.a[.b{"),
        (b'[{"a": 1}, {"a": 1}]', None, None),
        (b'{"a": "}{", "b": {"a": 1}}', None, None),
        (b'{"k": {}, "k2": {"k": 1}, "s": "\\\\"}', None, None),
    ],
)
def test_duplicate_key_reads_strings_and_objects_as_json_does(raw, key, where):
    found = duplicate_key(raw)
    if key is None:
        assert found is None
        return
    assert found is not None
    at, token = found
    assert token == key
    assert raw[at : at + len(token)] == token
    assert json_place(raw, at) == where
