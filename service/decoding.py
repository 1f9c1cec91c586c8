"""Request bodies → what a solve takes: pixels ``(B, C, H, W)`` float32 in [0, 1] and a
:class:`SolveKey`.

Every rule a JSON body obeys lives here (content type, strict parsing, tensor shapes and
values), and the multipart form of ``:classify`` is read through the JSON body's model so
that both refuse the same things with the same words. A V2 body may carry its tensors as raw
bytes after the JSON (the binary tensor data extension: :func:`infer_body`); a tensor's
bytes and its JSON ``data`` pass the same checks (:func:`input_pixels`, which the gRPC
front end shares). Images are decoded by
:mod:`service.images`. Each function raises :class:`ApiError` (400, 415, 422) or
:class:`RequestValidationError` (422) saying what was wrong; none answers 5xx to input.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any, TypeVar

import numpy as np
import torch
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from . import schemas
from .encoding import DEFAULT_OUTPUTS, OUTPUT_TYPES
from .engine import ServedModel, SolveKey
from .errors import ApiError
from .images import ImageRejected, decode_image

Body = TypeVar("Body", bound=BaseModel)

# The numeric fields of ClassifyRequest: a form spells them as text, read as JSON.
NUMERIC_FORM_FIELDS = ("top_k", "tol", "max_iter", "logit_tol")

# The binary tensor data extension: the JSON header's length in bytes, and each fixed-size
# datatype's bytes per element (Open Inference Protocol, "Tensor Data Types"; BYTES elements
# carry their own length and are not accepted as input).
HEADER_LENGTH = "Inference-Header-Content-Length"
ELEMENT_BYTES = {
    "BOOL": 1,
    "UINT8": 1,
    "INT8": 1,
    "UINT16": 2,
    "INT16": 2,
    "FP16": 2,
    "BF16": 2,
    "UINT32": 4,
    "INT32": 4,
    "FP32": 4,
    "UINT64": 8,
    "INT64": 8,
    "FP64": 8,
}
DIGITS = re.compile(r"^[0-9]{1,18}$")


# The name of the model's one input tensor (V2 model metadata's ``inputs[0].name``).
INPUT_NAME = "input"


# ---- JSON bodies ------------------------------------------------------------------------------


def require_json(content_type: str | None, what: str) -> None:
    """Check that a body labelled ``content_type`` is JSON: ``application/json`` or a
    ``+json`` type, UTF-8 (RFC 8259 §8.1) when a charset is given. ``None`` (no header)
    passes: the endpoint takes JSON only.

    Raises:
        ApiError: 415 naming what the endpoint accepts (``what``).
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


def body_errors(e: ValidationError) -> RequestValidationError:
    """A body model's validation errors, located as FastAPI locates body errors:
    ``("body", field, ...)``."""
    errors = e.errors(include_url=False, include_input=False)
    return RequestValidationError([{**err, "loc": ("body", *err.get("loc", ()))} for err in errors])


class DuplicateKey(ApiError):
    """A JSON body with a key given twice in one object (400, :func:`refuse_duplicate_keys`)."""


# A JSON string token, from its opening quote; a key is a string followed by a colon.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_COLON = re.compile(rb"[ \t\r\n]*:")
_SPACE = (b" ", b"\t", b"\n", b"\r")


def _key_spelling(token: bytes) -> bytes:
    """A key's string token (quotes included) in one spelling: escapes decoded, so that
    ``"t\\u006fl"`` and ``"tol"`` are the same key, as every parser reads them."""
    if b"\\" not in token:
        return token
    return json.dumps(json.loads(token), ensure_ascii=False).encode("utf-8", "surrogatepass")


def duplicate_key(raw: bytes) -> tuple[int, bytes] | None:
    """The first key that the JSON text ``raw`` gives twice in one object, in reading order:
    ``(offset of its second string token, that token)``; ``None`` when there is none.

    Parsers keep the last of the two (pydantic's, Python's, most clients'), so the client's
    other value is dropped in silence; RFC 8259 §4 leaves such an object's meaning undefined
    and I-JSON (RFC 7493 §2.3) forbids it.

    This is on the request path of every JSON body, beside the parse, so it looks at as
    little as it can: it jumps from one string or brace to the next with ``bytes.find``
    (memchr) and never looks at the numbers between them (pixel arrays hold no quotes or
    braces). Its cost grows with the strings and braces, not the bytes: about 2 % of the
    parse of a 64-image V2 body, ~10 µs (a quarter of the parse) for one 28×28 image. Only
    meaningful on text a JSON parser accepted.
    """
    find, never = raw.find, len(raw)

    def next_at(char: bytes, start: int) -> int:
        found = find(char, start)
        return never if found < 0 else found

    opens, closes = next_at(b"{", 0), next_at(b"}", 0)  # the next brace of each kind
    seen: set[tuple[int, bytes]] = set()  # (object number, key) of the keys read
    enclosing: list[int] = []  # the numbers of the open objects around the current one
    current = numbered = 0
    pos = 0
    while True:
        quote = find(b'"', pos)
        if quote < 0:
            quote = never
        while opens < quote or closes < quote:  # objects open and close before the string
            if opens < closes:
                enclosing.append(current)
                numbered += 1
                current = numbered
                opens = next_at(b"{", opens + 1)
            else:
                current = enclosing.pop() if enclosing else 0
                closes = next_at(b"}", closes + 1)
        if quote == never:
            return None
        end = find(b'"', quote + 1)
        if end < 0:
            return None  # not JSON after all: the parser has said so
        if raw[end - 1] == 0x5C:  # a backslash before it: read the string by the grammar
            token = _STRING.match(raw, quote)
            if token is None:
                return None
            end = token.end() - 1
        pos = end + 1
        if opens < pos:  # braces inside the string are text, not objects
            opens = next_at(b"{", pos)
        if closes < pos:
            closes = next_at(b"}", pos)
        follows = raw[pos : pos + 1]
        if follows != b":":
            if follows not in _SPACE:
                continue  # a string value
            colon = _COLON.match(raw, pos)
            if colon is None:
                continue
            pos = colon.end()
        key = (current, _key_spelling(raw[quote : end + 1]))
        if key in seen:
            return quote, raw[quote : end + 1]
        seen.add(key)


# The most strings, braces and brackets :func:`json_place` follows (a few ms): a body nested
# deeper or wider than that is located by line and column instead.
PLACE_BUDGET = 20_000


def json_place(raw: bytes, at: int) -> str:
    """Where the object holding the byte offset ``at`` of the JSON text ``raw`` sits, located
    as validation errors are: ``body``, ``body.parameters``, ``body.inputs.0.parameters``.

    Only for a refused body's message: it follows every string, brace and bracket before
    ``at`` (thousands for a nested pixel array, against the few :func:`duplicate_key` reads),
    counting an array's elements by its commas. Past :data:`PLACE_BUDGET` of them (a body
    built to make this slow: ``[[0], [0], ...]`` by the million) it stops and gives the
    line and column instead (``the body at line 1 column 812``), as JSON parse errors do.
    """
    find, count, never = raw.find, raw.count, len(raw)
    following = {}
    for char in (b'"', b"{", b"}", b"[", b"]"):
        found = find(char, 0)
        following[char] = never if found < 0 else found
    frames: list[list] = []  # per open container: [is an array, its current key or index]
    pos = 0
    for _ in range(PLACE_BUDGET):
        char = min(following, key=following.__getitem__)
        i = following[char]
        if i >= at:
            return ".".join(["body", *(str(f[1]) for f in frames[:-1])])
        if frames and frames[-1][0]:  # an array: its elements so far are its commas
            frames[-1][1] += count(b",", pos, i)
        if char == b'"':
            token = _STRING.match(raw, i)
            if token is None:
                break
            pos = token.end()
            colon = _COLON.match(raw, pos)
            if colon is not None and frames and not frames[-1][0]:
                frames[-1][1] = json.loads(token.group())
                pos = colon.end()
            for c, j in following.items():  # anything inside the string is text
                if j < pos:
                    found = find(c, pos)
                    following[c] = never if found < 0 else found
            continue
        if char in (b"{", b"["):
            frames.append([char == b"[", 0 if char == b"[" else None])
        elif frames:
            frames.pop()
        pos = i + 1
        found = find(char, pos)
        following[char] = never if found < 0 else found
    line, column = count(b"\n", 0, at) + 1, at - raw.rfind(b"\n", 0, at)  # both from 1
    return f"the body at line {line} column {column}"


def refuse_duplicate_keys(raw: bytes) -> None:
    """Refuse a JSON body that gives a key twice in one object, rather than read the last
    one and drop the client's other value in silence (:func:`duplicate_key`).

    Raises:
        DuplicateKey: 400 naming the key and the object it is given twice in
            (:func:`json_place`).
    """
    found = duplicate_key(raw)
    if found is None:
        return
    at, token = found
    name = json.dumps(json.loads(token), ensure_ascii=False)
    raise DuplicateKey(
        400,
        f"duplicate key {name} in {json_place(raw, at)}: an object may give each key once "
        "(which of the two values counts is undefined, RFC 8259 §4)",
    )


def parse_json(raw: bytes, model: type[Body]) -> Body:
    """Parse and validate a JSON body in one pass of pydantic's own parser, refusing a key
    given twice in one object (:func:`refuse_duplicate_keys`).

    For a 28×28 image this is ~7× faster than ``json.loads`` plus validation (38 µs against
    280 µs: Python's float parsing dominates), and it is the request path's largest cost.
    NaN and ±Infinity tokens parse, so that the pixel check can name them.

    Raises:
        ApiError: 400 for bytes that are not JSON; :class:`DuplicateKey` (400) for a key
            given twice in one object, before any complaint about the JSON's shape (the
            value validated may not be the one the client meant).
        RequestValidationError: 422 for JSON of the wrong shape.
    """
    try:
        body = model.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        bad = next((err for err in errors if err.get("type") == "json_invalid"), None)
        if bad is not None:
            raise ApiError(400, f"malformed JSON body ({bad.get('msg')})") from None
        refuse_duplicate_keys(raw)
        raise body_errors(e) from None
    refuse_duplicate_keys(raw)
    if "_json_bools" in model.__private_attributes__:
        # A bare true/false token outside strings is the only way a boolean gets in; two
        # byte searches spare a good body the per-value scan of to_pixels.
        body._json_bools = b"true" in raw or b"false" in raw
    return body


async def json_body(request: Request, model: type[Body], what: str) -> Body:
    """The request's JSON body as ``model`` (:func:`require_json`, then :func:`parse_json`).

    Raises:
        ApiError: 415 for another content type (naming ``what`` is accepted), 400 for bytes
            that are not JSON.
        RequestValidationError: 422 for JSON of the wrong shape or an unknown field.
    """
    require_json(request.headers.get("content-type"), what)
    return parse_json(await request.body(), model)


async def optional_json_body(request: Request, model: type[Body]) -> Body:
    """An admin endpoint's optional body: none (or only whitespace) gives ``model()``'s
    defaults; anything else obeys every JSON endpoint's rules (415, 400, 422).

    Raises:
        ApiError: 415 for another content type, 400 for bytes that are not JSON.
        RequestValidationError: 422 for JSON of the wrong shape or an unknown field.
    """
    raw = await request.body()
    if not raw.strip():
        return model()
    require_json(request.headers.get("content-type"), "send application/json")
    return parse_json(raw, model)


# ---- solver parameters ------------------------------------------------------------------------


def solve_key(served: ServedModel, params: Any) -> SolveKey:
    """The solve key for a request's optional ``method``, ``tol``, ``max_iter``, ``stop``
    and ``logit_tol`` (read from ``params``, any object; absent attributes mean the model's
    and the server's defaults).

    Raises:
        ApiError: 422 naming the parameter outside the server's bounds, or a ``logit_tol``
            without ``stop`` ``"logits"`` (or that rule without one).
    """
    try:
        return served.key(
            getattr(params, "method", None),
            getattr(params, "tol", None),
            getattr(params, "max_iter", None),
            getattr(params, "stop", None),
            getattr(params, "logit_tol", None),
        )
    except ValueError as e:
        raise ApiError(422, str(e)) from None


# ---- tensors ----------------------------------------------------------------------------------


def to_pixels(data: Any, what: str, *, may_hold_bools: bool = True) -> np.ndarray:
    """A JSON array of numbers in [0, 1] → float32 numpy array of the same shape.

    Args:
        may_hold_bools: whether ``data`` may hold JSON ``true``/``false`` among its numbers
            (numpy reads them as 1 and 0, so they are looked for one by one: about a
            quarter of the conversion's time). False when the caller knows it cannot:
            the body had no such token (:func:`parse_json`), or the values are typed
            (raw bytes, gRPC's ``fp32_contents``).

    Raises:
        ApiError: 422 for a ragged array, non-numbers (``true`` among numbers too), NaN/Inf
            or values outside [0, 1] (``what`` names the field in the message).
    """
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        arr = None  # ragged, or nested in a way numpy cannot hold: located below
    if arr is None or arr.dtype.kind == "O":
        # numpy's own words ("inhomogeneous shape after 1 dimensions", "object") say
        # nothing a client can act on: name the first value at fault and where it is.
        fault = array_fault(data, what)
        if fault is not None:
            raise ApiError(422, fault)
        try:  # numbers only, rectangular: integers past 64 bits are what numpy kept as objects
            arr = np.asarray(data, dtype=np.float64)
        except OverflowError:
            raise ApiError(
                422, f"{what} holds an integer too large for a number; pixels lie in [0, 1]"
            ) from None
    if arr.dtype.kind not in "iuf":
        kind = {"b": "booleans", "U": "strings", "S": "strings"}
        raise ApiError(
            422, f"{what} must hold numbers only, got {kind.get(arr.dtype.kind, arr.dtype.name)}"
        )
    if may_hold_bools and not isinstance(data, np.ndarray) and _holds_bools(data, arr.ndim):
        # [true, 0.5] is float64 [1.0, 0.5] to numpy: a pixel the client never sent.
        raise ApiError(422, array_fault(data, what) or f"{what} must hold numbers only")
    if arr.size:
        lo, hi = float(arr.min()), float(arr.max())
        # One test for the common case: NaN fails every comparison and ±Inf the range.
        if lo >= 0.0 and hi <= 1.0:
            return arr.astype(np.float32)
        if not bool(np.isfinite(arr).all()):
            raise ApiError(422, f"{what} holds NaN or Inf")
        if lo < 0.0 or hi > 1.0:
            raise ApiError(
                422,
                f"{what} must hold pixel intensities in [0, 1] (found values in "
                f"[{_shortest(lo)}, {_shortest(hi)}]); the server applies the model's "
                "normalisation",
            )
    return arr.astype(np.float32)


def _holds_bools(data: Any, ndim: int) -> bool:
    """Whether the rectangular nested list ``data`` (``ndim`` levels) holds a ``bool``."""
    if ndim == 0:
        return isinstance(data, bool)
    flat = data
    for _ in range(ndim - 1):
        flat = itertools.chain.from_iterable(flat)
    return bool in set(map(type, flat))


def _json_kind(v: Any) -> str:
    """What a JSON value is, in the JSON's words (``null``, ``true``, a string, an object)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f"the string {v[:20]!r}" if len(v) <= 20 else f"the string {v[:20]!r}..."
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def array_fault(data: Any, what: str) -> str | None:
    """Why the JSON value ``data`` is not a rectangular array of numbers, naming the first
    place at fault in reading order (``input data[3][0]``), or ``None`` when it is one.

    The expected shape is read along the first elements (``data[0]``, ``data[0][0]``, ...);
    every array at a depth must hold as many values as the first one there, and numbers
    sit only at the deepest level. Only called on a body numpy refused, so its cost is
    never paid by a good request.
    """

    def loc(path: tuple[int, ...]) -> str:
        return what + "".join(f"[{i}]" for i in path)

    shape: list[int] = []
    node = data
    while isinstance(node, list):
        shape.append(len(node))
        if not node:
            break
        node = node[0]
    first = [(0,) * d for d in range(len(shape) + 1)]
    stack: list[tuple[Any, tuple[int, ...]]] = [(data, ())]
    while stack:
        node, path = stack.pop()
        depth = len(path)
        if isinstance(node, list):
            if depth >= len(shape):
                return (
                    f"{what} is not a rectangular array: {loc(path)} is an array, where "
                    f"{loc(first[depth])} is a number"
                )
            if len(node) != shape[depth]:
                return (
                    f"{what} is not a rectangular array: {loc(path)} holds {len(node)} "
                    f"value{'s' * (len(node) != 1)}, {loc(first[depth])} holds {shape[depth]}"
                )
            stack.extend((node[i], (*path, i)) for i in reversed(range(len(node))))
            continue
        if isinstance(node, bool) or not isinstance(node, int | float):
            return f"{what} must hold numbers only, got {_json_kind(node)} at {loc(path)}"
        if depth < len(shape):
            return (
                f"{what} is not a rectangular array: {loc(path)} is a number, where "
                f"{loc(first[depth])} is an array"
            )
    return None


def _shortest(v: float) -> str:
    """``v`` as the shortest text that reads back as it (``repr``), without a trailing
    ``.0``: ``2.0`` → ``2``, ``1.0000001`` → ``1.0000001`` (``:g`` wrote it ``1``, so a
    message said values in ``[1, 1]`` lay outside [0, 1])."""
    text = repr(v)
    return text[:-2] if text.endswith(".0") else text


def input_pixels(
    served: ServedModel,
    name: str,
    datatype: str,
    shape: list[int],
    data: list[Any] | bytes | None,
    max_rows: int,
    *,
    may_hold_bools: bool = True,
) -> torch.Tensor:
    """One V2 input tensor → ``(B, C, H, W)`` float32 pixels, whichever way it came: a JSON
    ``data`` array (flat row-major, or nested in exactly ``shape``) or raw bytes (the binary
    tensor data extension over HTTP, ``raw_input_contents`` over gRPC: little-endian,
    row-major, ``prod(shape)`` values of 4 bytes).

    Open Inference Protocol, "Tensor Data": the model takes one ``FP32`` tensor of shape
    ``[B, C, H, W]`` (the model's ``C, H, W``; 1 ≤ B ≤ ``max_rows``) of pixels in [0, 1].

    Args:
        served: the model version the request names.
        name: the tensor's name (named in the messages).
        datatype, shape: as the request declares them.
        data: the JSON values, the raw bytes, or ``None`` (no data sent).
        max_rows: the largest batch one request may send.
        may_hold_bools: JSON ``data`` may hold booleans (:func:`to_pixels`).

    Raises:
        ApiError: 422 for a name other than :data:`INPUT_NAME` (the model metadata's), a
            datatype other than FP32, another shape or batch size, no data,
            a value count that does not match the shape, or values :func:`to_pixels`
            refuses (the same words for bytes and JSON); 400 for raw bytes whose length is
            not ``4 × prod(shape)`` (they cannot be framed as the tensor declared).
    """
    if name != INPUT_NAME:
        # A tensor meant for another model (or misspelt) is refused rather than guessed at.
        raise ApiError(422, f"unknown input {name!r}: the model's input is {INPUT_NAME!r}")
    if datatype != "FP32":
        raise ApiError(422, f"input datatype must be FP32, got {datatype!r}")
    c, h, w = served.shape
    shape = list(shape)
    if len(shape) != 4 or shape[1:] != [c, h, w]:
        raise ApiError(422, f"input shape must be [B, {c}, {h}, {w}], got {shape}")
    if not 1 <= shape[0] <= max_rows:
        raise ApiError(422, f"batch size must lie in [1, {max_rows}], got {shape[0]}")
    need = math.prod(shape)
    if data is None:
        raise ApiError(
            422,
            f"input {name!r} has no data: send 'data', or binary_data_size with its bytes "
            f"after the JSON header ({HEADER_LENGTH})",
        )
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) != 4 * need:
            raise ApiError(
                400,
                f"input {name!r} has {len(data)} bytes of binary data; FP32 {shape} needs "
                f"{4 * need} (4 bytes a value)",
            )
        arr = to_pixels(np.frombuffer(data, dtype="<f4"), "input data")
        return torch.from_numpy(arr.reshape(shape))
    arr = to_pixels(data, "input data", may_hold_bools=may_hold_bools)
    if arr.size != need:
        raise ApiError(422, f"input data holds {arr.size} values; shape {shape} needs {need}")
    if arr.ndim != 1 and list(arr.shape) != shape:
        raise ApiError(
            422, f"nested input data has shape {list(arr.shape)}; expected flat or {shape}"
        )
    return torch.from_numpy(arr.reshape(shape))


def v2_pixels(
    served: ServedModel,
    inputs: list[schemas.InferInput],
    max_rows: int,
    raw: list[bytes | None] | None = None,
    *,
    may_hold_bools: bool = True,
) -> torch.Tensor:
    """The V2 request's single input tensor → ``(B, C, H, W)`` float32 pixels
    (:func:`input_pixels`).

    Args:
        raw: per input, its binary bytes or ``None`` for JSON ``data`` (from
            :func:`infer_body`); ``None``: every input is JSON.

    Raises:
        ApiError: 422 for other than exactly one input; :func:`input_pixels`'s errors.
    """
    if len(inputs) != 1:
        raise ApiError(422, f"expected exactly one input tensor, got {len(inputs)}")
    inp = inputs[0]
    data = raw[0] if raw is not None and raw[0] is not None else inp.data
    return input_pixels(
        served, inp.name, inp.datatype, inp.shape, data, max_rows, may_hold_bools=may_hold_bools
    )


# ---- the binary tensor data extension ---------------------------------------------------------


def split_body(raw: bytes, header_length: str) -> tuple[bytes, bytes]:
    """A binary-extension body → ``(JSON header, binary part)``, split where the request's
    ``Inference-Header-Content-Length`` says the JSON ends.

    Raises:
        ApiError: 400 for a header that is not a decimal count of bytes, or one larger
            than the body.
    """
    value = header_length.strip()
    if not DIGITS.match(value):
        raise ApiError(
            400, f"{HEADER_LENGTH} must be the JSON header's length in bytes, got {value!r}"
        )
    n = int(value)
    if n > len(raw):
        raise ApiError(
            400, f"{HEADER_LENGTH} is {n} bytes but the whole body holds only {len(raw)}"
        )
    return raw[:n], raw[n:]


def binary_size(inp: schemas.InferInput) -> int | None:
    """An input's ``binary_data_size`` parameter (``None`` when absent).

    Raises:
        ApiError: 400 for a value that is not a non-negative integer.
    """
    size = (inp.parameters or {}).get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ApiError(
            400,
            f"input {inp.name!r}: binary_data_size must be a non-negative integer count of "
            f"bytes, got {size!r}",
        )
    return size


def binary_inputs(inputs: list[schemas.InferInput], tail: bytes | None) -> list[bytes | None]:
    """Each input's bytes from the binary part ``tail`` (in the inputs' order, each
    ``binary_data_size`` long; ``None`` for an input sent as JSON ``data``).

    Args:
        tail: the bytes after the JSON header; ``None`` when the request had no
            ``Inference-Header-Content-Length`` (a JSON body).

    Raises:
        ApiError: 400 for an input with both ``data`` and ``binary_data_size``, binary data
            without the header, a binary part shorter than the sizes claim (truncated), or
            bytes that no input claims.
    """
    out: list[bytes | None] = []
    offset = 0
    for inp in inputs:
        size = binary_size(inp)
        if size is None:
            out.append(None)
            continue
        if inp.data is not None:
            raise ApiError(
                400, f"input {inp.name!r} has both 'data' and binary_data_size: send one"
            )
        if tail is None:
            raise ApiError(
                400,
                f"input {inp.name!r} has binary_data_size but the request has no "
                f"{HEADER_LENGTH} header saying where the JSON ends",
            )
        if offset + size > len(tail):
            raise ApiError(
                400,
                f"binary data truncated: input {inp.name!r} needs bytes {offset}..{offset + size}"
                f" after the JSON header, which has {len(tail)}",
            )
        out.append(tail[offset : offset + size])
        offset += size
    if tail is not None and offset != len(tail):
        raise ApiError(
            400,
            f"{len(tail) - offset} bytes after the JSON header belong to no input (the "
            f"inputs' binary_data_size add up to {offset}, the binary part holds {len(tail)})",
        )
    return out


def check_output_names(names: list[str]) -> None:
    """Check the output names a V2 request asks for, over HTTP or gRPC alike.

    Raises:
        ApiError: 422 for a name not in :data:`service.encoding.OUTPUT_TYPES`, or one named
            more than once (an answer holds each output once).
    """
    unknown = [n for n in names if n not in OUTPUT_TYPES]
    if unknown:
        raise ApiError(422, f"unknown outputs {unknown}; choose from {list(OUTPUT_TYPES)}")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ApiError(422, f"outputs requested more than once: {twice}")


def refuse_classification(name: str, params) -> None:
    """Refuse an output's ``classification`` parameter (Triton's classification extension),
    over HTTP or gRPC alike: it asks for top-k class strings in place of the tensor, which
    this server does not produce, so answering the plain tensor would be answering another
    question.

    Raises:
        ApiError: 422 when ``params`` (the output's parameters, a mapping) names it.
    """
    if "classification" in params:
        raise ApiError(
            422,
            f"output {name!r}: the classification extension is not served; ask for "
            "'label' or 'probabilities'",
        )


def requested_outputs(body: schemas.InferRequest) -> list[tuple[str, bool]]:
    """The outputs a V2 request asks for, each with whether it goes back as binary data.

    Named ``outputs`` (keys of :data:`service.encoding.OUTPUT_TYPES`), or
    :data:`service.encoding.DEFAULT_OUTPUTS`. An output's ``parameters.binary_data``
    overrides the request's ``parameters.binary_data_output`` (binary tensor data extension).

    Raises:
        ApiError: 422 for an unknown output, one named twice, a flag that is not a JSON
            boolean, or the
            classification extension's ``classification`` parameter (not served).
    """
    every = getattr(body.parameters, "binary_data_output", None)
    if every is None:
        every = False
    elif not isinstance(every, bool):
        raise ApiError(422, f"parameters.binary_data_output must be true or false, got {every!r}")
    if not body.outputs:
        return [(n, every) for n in DEFAULT_OUTPUTS]
    check_output_names([o.name for o in body.outputs])
    wanted = []
    for o in body.outputs:
        params = o.parameters or {}
        refuse_classification(o.name, params)
        binary = params.get("binary_data", every)
        if not isinstance(binary, bool):
            raise ApiError(
                422, f"output {o.name!r}: binary_data must be true or false, got {binary!r}"
            )
        wanted.append((o.name, binary))
    return wanted


async def infer_body(request: Request) -> tuple[schemas.InferRequest, list[bytes | None]]:
    """A V2 inference body, JSON or with binary tensors (Open Inference Protocol, binary
    tensor data extension): with an ``Inference-Header-Content-Length`` header the body is
    that many bytes of JSON followed by each binary input's ``binary_data_size`` bytes, in
    the inputs' order; its content type may then be ``application/octet-stream``, JSON, or
    none.

    Returns:
        the parsed request, and per input its bytes (``None``: JSON ``data``).

    Raises:
        ApiError: 415 for another content type; 400 for bytes that are not JSON, the
            header given twice with different values, or a body the header and the sizes
            do not frame (:func:`split_body`, :func:`binary_inputs`).
        RequestValidationError: 422 for JSON of the wrong shape.
    """
    values = request.headers.getlist(HEADER_LENGTH)
    if len(set(values)) > 1:  # which one frames the body? (RFC 9110 §8.6, as Content-Length)
        raise ApiError(400, f"{HEADER_LENGTH} given with different values {values}: send it once")
    header = values[0] if values else None
    if header is None:
        body = await json_body(request, schemas.InferRequest, "send application/json")
        return body, binary_inputs(body.inputs, None)
    ctype = request.headers.get("content-type")
    media = (ctype or "").partition(";")[0].strip().lower()
    if ctype is not None and media != "application/octet-stream":
        require_json(ctype, f"with {HEADER_LENGTH}, send application/octet-stream or JSON")
    head, tail = split_body(await request.body(), header)
    try:
        body = parse_json(head, schemas.InferRequest)
    except DuplicateKey:  # the JSON was read whole: its length is not in question
        raise
    except ApiError as e:  # most often a header off by some bytes: say which bytes were read
        raise ApiError(
            e.status,
            f"{e.message}: the JSON is read from the body's first {len(head)} bytes, as "
            f"{HEADER_LENGTH} says; it must be the JSON's exact length",
        ) from None
    return body, binary_inputs(body.inputs, tail)


def classify_pixels(
    served: ServedModel, data: Any, max_rows: int, *, may_hold_bools: bool = True
) -> torch.Tensor:
    """The friendly API's nested ``inputs`` → ``(B, C, H, W)`` float32 pixels.

    Accepts ``[H, W]`` (one-channel models), ``[C, H, W]`` or ``[B, C, H, W]`` with
    1 ≤ B ≤ ``max_rows``.

    Raises:
        ApiError: 422 for another shape, or values :func:`to_pixels` refuses.
    """
    arr = to_pixels(data, "inputs", may_hold_bools=may_hold_bools)
    sent = list(arr.shape)  # the message names it, not the shape it was lifted to
    c, h, w = served.shape
    if arr.ndim == 2 and c == 1:
        arr = arr[None, None]
    elif arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or list(arr.shape[1:]) != [c, h, w]:
        accepted = ([f"[{h}, {w}]"] if c == 1 else []) + [f"[{c}, {h}, {w}]", f"[B, {c}, {h}, {w}]"]
        raise ApiError(422, f"inputs have shape {sent}; expected {' or '.join(accepted)}")
    if not 1 <= arr.shape[0] <= max_rows:
        raise ApiError(422, f"batch size must lie in [1, {max_rows}], got {arr.shape[0]}")
    return torch.from_numpy(np.ascontiguousarray(arr))


# ---- multipart uploads ------------------------------------------------------------------------


def boolean(raw: str) -> bool:
    """A form's yes/no text: ``1/true/yes/on`` or ``0/false/no/off`` (any case).

    Raises:
        ValueError: for anything else, with ``raw`` as its argument.
    """
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def form_value(key: str, raw: str) -> Any:
    """A multipart text field as the JSON value it spells, for the numeric fields of
    :class:`schemas.ClassifyRequest` (``"30"`` → 30, ``"1e-3"`` → 0.001), so the form obeys
    the JSON body's strict rules: ``"3_0"`` or ``"true"`` for ``max_iter`` is refused there,
    not read as 30 or 1. Other fields (``method``, ``stop``) stay text."""
    if key not in NUMERIC_FORM_FIELDS:
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw  # the strict field refuses the text with the JSON body's message


async def upload_pixels(
    request: Request, served: ServedModel, max_pixels: int
) -> tuple[torch.Tensor, int, SolveKey]:
    """A ``multipart/form-data`` classify request → ``(pixels (1, C, H, W), top_k, key)``.

    The ``file`` field holds the image (decoded, converted and resized to the model's input
    by :func:`decode_image`, in a worker thread); ``invert`` is a yes/no field; every other
    field goes through :class:`schemas.ClassifyRequest`, so that an unknown one (a misspelt
    ``max_iter``) is 422 as in the JSON body, with the same message.

    Raises:
        ApiError: 422 without a ``file``, for a field that is not a plain value or one
            given more than once; the image's own status (400, 413, 415, 422) when it
            cannot be decoded.
        RequestValidationError: 422 for a field the JSON body would refuse.
    """
    form = await request.form(max_files=1, max_fields=16)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "multipart body needs a 'file' field holding an image")
    data = await upload.read()
    fields: dict[str, Any] = {}
    seen: set[str] = set()
    for k, raw in form.multi_items():
        if k == "file":
            continue
        if k in seen:
            # Which one did the client mean? A form read as a dict keeps the last and the
            # client never learns that its first top_k or tol was dropped.
            raise ApiError(422, f"form field {k!r} is given more than once: send it once")
        seen.add(k)
        if raw == "":
            continue
        if not isinstance(raw, str):
            raise ApiError(422, f"form field {k!r} must be a plain value")
        fields[k] = form_value(k, raw)
    try:
        invert = boolean(fields.pop("invert", "false"))
    except ValueError as e:
        raise ApiError(422, f"form field 'invert': cannot read {e.args[0]!r}") from None
    try:
        params = schemas.ClassifyRequest.model_validate({"inputs": [], **fields})
    except ValidationError as e:
        raise body_errors(e) from None
    key = solve_key(served, params)
    try:  # Pillow decodes in a worker thread: the event loop keeps serving
        pixels = await run_in_threadpool(
            decode_image, data, served.shape, max_pixels=max_pixels, invert=invert
        )
    except ImageRejected as e:
        raise ApiError(e.status, str(e)) from None
    return torch.from_numpy(pixels), params.top_k, key
