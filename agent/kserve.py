"""The KServe / Triton v2 inference protocol, with its binary tensor extension.

``POST /v2/models/{name}/infer`` takes a JSON header naming each input's shape and
datatype, and its values either inline (``"data"``, a flat list) or, with the binary
extension, as raw little-endian bytes after the header (``parameters.binary_data_size``,
the header's length in ``Inference-Header-Content-Length``). Outputs come back inline
or, if the request asks (``binary_data_output`` or an output's ``binary_data``), as raw
bytes the same way. An image then costs what its bytes cost, not 20 characters a float.

This module turns requests into ``(numpy dtype name, shape, bytes)`` tensors for the
model worker and answers back; it needs no numpy (``struct`` packs inline values), so
the agent process stays light. It does not run models.
"""

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from shared import smoke

HEADER = "Inference-Header-Content-Length"
#: v2 datatype -> (numpy dtype name, struct code)
DATATYPES = {"BOOL": ("bool", "?"), "UINT8": ("uint8", "B"), "INT8": ("int8", "b"),
             "UINT16": ("uint16", "H"), "INT16": ("int16", "h"), "UINT32": ("uint32", "I"),
             "INT32": ("int32", "i"), "UINT64": ("uint64", "Q"), "INT64": ("int64", "q"),
             "FP16": ("float16", "e"), "FP32": ("float32", "f"), "FP64": ("float64", "d")}
_BY_NUMPY = {numpy: v2 for v2, (numpy, _) in DATATYPES.items()}

#: numpy dtype name, shape, raw little-endian bytes (a view into the request body when
#: parsed from one: the worker copies it once, into its shared buffer)
Tensor = tuple[str, list[int], bytes | memoryview]


class ProtocolError(ValueError):
    """A request that does not follow the protocol; the message says how."""


@dataclass(frozen=True)
class Request:
    inputs: dict[str, Tensor]
    binary_outputs: bool
    id: str | None = None


def parse(body: bytes, header_length: str | None) -> Request:
    """A v2 inference request (JSON, or JSON header + binary data)."""
    try:
        size = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise ProtocolError(f"{HEADER} is not a number: {header_length!r}") from None
    if not 0 < size <= len(body):
        raise ProtocolError(f"{HEADER} {size} does not fit a body of {len(body)} bytes")
    try:
        head = json.loads(body[:size])
    except ValueError as exc:
        raise ProtocolError(f"the header is not JSON: {exc}") from None
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list):
        raise ProtocolError('the header must be {"inputs": [{"name", "shape", "datatype", '
                            '"data" | "parameters": {"binary_data_size"}}]}')
    offset, inputs, view = size, {}, memoryview(body)
    for item in head["inputs"]:
        name, tensor, used = _input(item, view, offset)
        inputs[name] = tensor
        offset += used
    if offset != len(body):
        raise ProtocolError(f"{len(body) - offset} bytes of binary data are left over")
    params = head.get("parameters") or {}
    wanted = head.get("outputs") or []
    binary = bool(params.get("binary_data_output")) or any(
        isinstance(o, dict) and (o.get("parameters") or {}).get("binary_data") for o in wanted)
    rid = head.get("id")
    return Request(inputs, binary, rid if isinstance(rid, str) else None)


def _input(item: Any, body: memoryview, offset: int) -> tuple[str, Tensor, int]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ProtocolError("each input needs a name")
    name, datatype, shape = item["name"], item.get("datatype"), item.get("shape")
    if datatype not in DATATYPES:
        raise ProtocolError(f"{name}: datatype {datatype!r} is not one of "
                            f"{', '.join(DATATYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"{name}: shape must be a list of non-negative integers")
    dtype, code = DATATYPES[datatype]
    count = math.prod(shape)
    binary_size = (item.get("parameters") or {}).get("binary_data_size")
    if binary_size is not None:
        want = count * struct.calcsize(code)
        if binary_size != want:
            raise ProtocolError(f"{name}: binary_data_size {binary_size} is not the {want} "
                                f"bytes of {datatype}{shape}")
        if offset + want > len(body):
            raise ProtocolError(f"{name}: the body ends before its {want} bytes")
        return name, (dtype, shape, body[offset:offset + want]), want
    data = item.get("data")
    flat = _flatten(data) if isinstance(data, list) else None
    if flat is None or len(flat) != count:
        raise ProtocolError(f"{name}: give {count} values in data (flat or nested), or "
                            "binary data")
    try:
        return name, (dtype, shape, struct.pack(f"<{count}{code}", *flat)), 0
    except struct.error as exc:
        raise ProtocolError(f"{name}: not {datatype} values: {exc}") from None


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def response(model: str, version: str, outputs: dict[str, Tensor], *, binary: bool,
             request_id: str | None = None) -> tuple[bytes, int | None]:
    """The answer's body, and the header length to send when it carries binary data."""
    items, blobs = [], []
    for name, (dtype, shape, data) in outputs.items():
        v2 = _BY_NUMPY.get(dtype)
        if v2 is None:
            raise ProtocolError(f"output {name} has type {dtype}, which v2 cannot carry")
        item: dict[str, Any] = {"name": name, "datatype": v2, "shape": shape}
        if binary:
            item["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            code = DATATYPES[v2][1]
            item["data"] = list(struct.unpack(f"<{len(data) // struct.calcsize(code)}{code}",
                                              data))
        items.append(item)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": items}
    if request_id is not None:
        head["id"] = request_id
    text = json.dumps(head, allow_nan=True).encode()
    return (text + b"".join(blobs), len(text)) if binary else (text, None)


def declared_bytes(inputs: dict[str, dict[str, Any]]) -> int | None:
    """The bytes one request's inputs take, from the model's description
    (``{name: {"type", "shape"}}``); None when a dimension is dynamic."""
    total = 0
    for spec in inputs.values():
        v2 = _BY_NUMPY.get(smoke.ONNX_DTYPES.get(spec.get("type", ""), ""))
        shape = spec.get("shape") or []
        if v2 is None or not all(isinstance(d, int) and d > 0 for d in shape):
            return None
        total += math.prod(shape) * struct.calcsize(DATATYPES[v2][1])
    return total
