"""A request message whose bytes give one value twice, found before protobuf drops one.

Protobuf reads a map entry given twice on the wire, or a field that is not repeated given
twice, by keeping the last one (Protocol Buffers encoding, "Last One Wins"; maps: "if there
are duplicate map keys the last key seen is used"). A client that sends ``stop`` twice in
``parameters`` with two values never learns that one was dropped, where the same request
over HTTP, a JSON object with a key twice, is refused (:func:`service.decoding.
duplicate_key`). An ``InferParameter`` with two of its ``parameter_choice`` values set is
read the same way: the last one counts.

The parsed message cannot tell: the entry it kept is all that is left. The bytes are read a
second time here, by protobuf's own parser (upb, in C), as a message type derived from the
request's own descriptor (:func:`strict_class`), in which

* a map is the repeated message of entries it is on the wire (``map_entry`` off), so every
  entry is kept, in order;
* every field that is not repeated is repeated, so each time it is given is kept
  (oneofs dissolved: each member a field of its own);
* fields that are repeated scalars (``raw_input_contents``, ``shape``, ``fp32_contents``...)
  are left out: they cannot be given "twice" and hold the bulk of the bytes, which the
  parser then keeps as unknown fields (one copy) instead of reading value by value.

No protobuf grammar is written here: only the walk over the parsed result
(:func:`first_ambiguity`). What it costs a ModelInfer request, against protobuf's own parse
of it (timeit, best of 5, on the 2-core development machine while other jobs ran; upb):

=======================================================  ==========  ========
request                                                  this check  parse
=======================================================  ==========  ========
one 28×28 image, raw contents (3.2 kB)                   4.3 µs      0.5 µs
64 images, raw contents (201 kB)                         8.6 µs      6.4 µs
64 images, typed ``fp32_contents`` (201 kB)              9.6 µs      6.1 µs
one 8×8 image, 2 parameters                              8.2 µs      0.7 µs
one image, 4 parameters, 2 outputs, one with 2           19 µs       1.0 µs
=======================================================  ==========  ========

A ModelInfer call of the tiny test model with 2 parameters took 2.4 ms (median) from the
client on loopback on the same machine: the check is under 1 % of it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

WHY_MAP = "a map may give each key once (protobuf keeps the last one and drops the other)"
WHY_FIELD = (
    "a field that is not repeated may be given once (protobuf keeps the last one and drops "
    "the other)"
)
WHY_ONEOF = "an InferParameter holds one value (protobuf keeps the last one and drops the other)"

_REPEATED = FieldDescriptor.LABEL_REPEATED
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def _loosen(message: descriptor_pb2.DescriptorProto) -> None:
    """``message`` (and its nested types) as the strict reading needs it: map entries plain
    messages, singular fields repeated, no oneofs, repeated scalars left out."""
    message.options.ClearField("map_entry")
    kept = []
    for field in message.field:
        if field.label == _REPEATED and field.type != _MESSAGE:
            continue  # a repeated scalar: nothing to find there, and most of the bytes
        if field.label != _REPEATED:
            field.label = _REPEATED
            field.ClearField("oneof_index")
            field.ClearField("proto3_optional")
        kept.append(field)
    del message.field[:]
    message.field.extend(kept)
    message.ClearField("oneof_decl")
    for nested in message.nested_type:
        _loosen(nested)


@functools.cache
def _strict_pool(file_name: str) -> descriptor_pool.DescriptorPool:
    """A pool of its own holding the loosened copy of the proto file ``file_name`` (same
    names: in its own pool they clash with nothing)."""
    original = descriptor_pool.Default().FindFileByName(file_name)
    proto = descriptor_pb2.FileDescriptorProto()
    original.CopyToProto(proto)
    proto.ClearField("service")
    for message in proto.message_type:
        _loosen(message)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool


@functools.cache
def strict_class(descriptor: Descriptor) -> type:
    """The loosened message class of the request type ``descriptor`` (see the module)."""
    pool = _strict_pool(descriptor.file.name)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(descriptor.full_name))


def _key_text(key: Any) -> str:
    """A map key as the message quotes it: a string in JSON's double quotes, as HTTP's."""
    return json.dumps(key, ensure_ascii=False) if isinstance(key, str) else repr(key)


_SINGLE, _MAP, _LIST = range(3)


@functools.cache
def _plan(descriptor: Descriptor) -> tuple[dict[int, tuple], tuple[frozenset[int], ...]]:
    """Per field number of the strict type of ``descriptor``: ``(name, kind, message type
    or None)``, kind one of a field not repeated, a map, repeated messages; and the field
    numbers of each oneof."""
    fields = {}
    for f in descriptor.fields:
        message = f.message_type if f.type == _MESSAGE else None
        if not f.is_repeated:
            fields[f.number] = (f.name, _SINGLE, message)
        elif message is not None:
            fields[f.number] = (f.name, _MAP if message.GetOptions().map_entry else _LIST, message)
    oneofs = tuple(frozenset(f.number for f in o.fields) for o in descriptor.oneofs)
    return fields, oneofs


def first_ambiguity(descriptor: Descriptor, data: bytes) -> str | None:
    """What the bytes ``data`` of a ``descriptor`` message (bytes that parsed as one) give
    twice, or ``None``; the first found, fields in their numbers' order, map entries and
    repeated messages in the order sent:

    * a map key given twice: ``duplicate key "stop" in parameters: ...``;
    * a field that is not repeated given twice: ``duplicate field "id" in the request: ...``,
      ``duplicate field "datatype" in inputs[0]: ...``;
    * two values of one oneof: ``parameters["stop"] gives 2 values (bool_param,
      string_param): ...`` (named in the oneof's order).

    Places are field paths: ``inputs[0].parameters``, ``outputs[1]``, ``parameters["tol"]``.
    """
    strict = strict_class(descriptor)()
    try:
        strict.ParseFromString(data)
    except DecodeError:  # the real parse accepted these bytes, so this one does too
        return None
    return _walk(descriptor, strict, ())


def _place(path: tuple) -> str:
    """A path of field names (str), indices (int) and map keys (1-tuples) as text:
    ``inputs[0].parameters["tol"]``; ``()`` is the request."""
    text = ""
    for part in path:
        if isinstance(part, str):
            text += f".{part}" if text else part
        elif isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f"[{_key_text(part[0])}]"
    return text or "the request"


def _walk(descriptor: Descriptor, strict: Any, path: tuple) -> str | None:
    """:func:`first_ambiguity` of one parsed strict message, whose real type is
    ``descriptor``, found at ``path`` (see :func:`_place`). The path is text only once
    something is found: this runs on every request."""
    plan, oneofs = _plan(descriptor)
    listed = strict.ListFields()
    for numbers in oneofs:
        given = [f.name for f, _ in listed if f.number in numbers]
        if len(given) > 1:
            return f"{_place(path)} gives {len(given)} values ({', '.join(given)}): {WHY_ONEOF}"
    for field, values in listed:
        name, kind, message = plan[field.number]
        found = None
        if kind == _SINGLE:
            if len(values) > 1:
                return f'duplicate field "{name}" in {_place(path)}: {WHY_FIELD}'
            if message is not None:
                found = _walk(message, values[0], (*path, name))
        elif kind == _MAP:
            found = _map(message, values, (*path, name))
        else:  # repeated messages (repeated scalars are not in the strict type)
            for i, value in enumerate(values):
                found = _walk(message, value, (*path, name, i))
                if found is not None:
                    break
        if found is not None:
            return found
    return None


def _map(entry: Descriptor, entries: Any, path: tuple) -> str | None:
    """The first key given twice among a map's ``entries``, or what an entry gives twice
    itself (its key, its value, or one of the value's own fields)."""
    value_type = entry.fields_by_name["value"].message_type
    seen = set()
    for e in entries:
        keys, values = e.key, e.value
        key = keys[-1] if keys else entry.fields_by_name["key"].default_value
        if len(keys) > 1 or len(values) > 1:
            twice = "key" if len(keys) > 1 else "value"
            return f'duplicate field "{twice}" in {_place((*path, (key,)))}: {WHY_FIELD}'
        if key in seen:
            return f"duplicate key {_key_text(key)} in {_place(path)}: {WHY_MAP}"
        seen.add(key)
        if values and value_type is not None:
            value = values[0]
            # The usual value, an InferParameter with one field set, has nothing more to
            # look at: skip the walk (a third of this check's time with 6 parameters).
            listed = value.ListFields()
            if len(listed) == 1 and len(listed[0][1]) == 1 and listed[0][0].message_type is None:
                continue
            found = _walk(value_type, value, (*path, (key,)))
            if found is not None:
                return found
    return None
