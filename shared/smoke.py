"""Smoke tests: what an operator gives with a version, and how a result is judged.

A smoke test is a few golden inputs with the outputs they must produce, a tolerance and a
latency budget. The controller completes it (fills in what was left out, computes each
variant's own expected outputs) and ships it as a signed TUF target of its own, pinned by
hash from the variant's target (``SmokeRef`` in its ``custom``), so a smoke test of any
size (a 640x640 image) costs ``targets.json`` one entry; the agent downloads and verifies
it with the model and runs it before it reports an install as good. Both judge results
with the functions here, so "passes" means the same on either side.

- ONNX: ``inputs`` is a list of feeds ``{input name: nested list}``; ``expected`` the
  matching ``{output name: nested list}``; ``tolerance`` the largest allowed
  ``|actual - expected| / (1 + |expected|)`` over every element.
- GGUF: ``inputs`` is a list of prompts; ``expected`` the greedy token ids each must
  produce (``max_tokens`` of them); ``tolerance`` the fraction of tokens that may differ.
  An embedding GGUF (``"kind": "embed"``): ``expected`` the embedding of each text;
  ``tolerance`` the largest allowed ``1 - cosine similarity``.

The completed test is a JSON file (``encode``/``decode``): inputs, expected, tolerance,
latency budget (and ``max_tokens`` for GGUF).

This module does not load models; ``controller.registry.derive`` and the agent do.
"""

import json
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: the largest smoke-test file the agent accepts (its signed length is checked first)
MAX_BYTES = 256 << 20
DEFAULT_TOLERANCE = {"onnx": 1e-3, "gguf": 0.25, "embed": 1e-3}
DEFAULT_LATENCY_BUDGET_MS = {"onnx": 1000.0, "gguf": 30000.0}
DEFAULT_PROMPTS = ["The quick brown fox", "Edge devices run models"]
#: the context llama.cpp models run with, on the device and when the controller measures them
GGUF_CONTEXT = 512
GENERATED_INPUTS = 8
#: numpy dtypes of the ONNX input types smoke tests (and the local API) accept
ONNX_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64",
               "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32",
               "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


class SmokeRef(BaseModel):
    """Where a variant's smoke test is: a signed target, pinned by its hash and length
    (the ``smoke_test`` field of the variant's TUF ``custom``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    target: Annotated[str, Field(max_length=512)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    length: Annotated[int, Field(ge=0, le=MAX_BYTES)]

    @classmethod
    def of(cls, custom: dict[str, Any]) -> "SmokeRef | None":
        """The reference in a variant's ``custom``, or None if it has no smoke test;
        raises ValueError if it is malformed."""
        value = custom.get("smoke_test")
        return None if value is None else cls.model_validate(value)


class SmokeTest(BaseModel):
    """A smoke test as given by an operator (anything left out is filled in on push)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inputs: Annotated[list[dict[str, Any]] | list[str] | None,
                      Field(min_length=1, max_length=64)] = None
    expected: list[Any] | None = None
    tolerance: Annotated[float | None, Field(gt=0)] = None
    latency_budget_ms: Annotated[float | None, Field(gt=0)] = None
    max_tokens: Annotated[int, Field(ge=1, le=256)] = 16

    @model_validator(mode="after")
    def _expected_matches_inputs(self) -> "SmokeTest":
        if self.expected is not None:
            if self.inputs is None:
                raise ValueError("expected outputs were given without the inputs they belong to")
            if len(self.expected) != len(self.inputs):
                raise ValueError(f"{len(self.inputs)} inputs but {len(self.expected)} "
                                 "expected outputs")
        return self


def deviation(actual: dict[str, Any], expected: dict[str, Any]) -> float:
    """The largest ``|a - e| / (1 + |e|)`` over all outputs; inf if shapes or names differ."""
    import numpy as np

    if set(actual) != set(expected):
        return float("inf")
    worst = 0.0
    for name, want in expected.items():
        a, e = np.asarray(actual[name], dtype=np.float64), np.asarray(want, dtype=np.float64)
        if a.shape != e.shape:
            return float("inf")
        if e.size:
            worst = max(worst, float(np.max(np.abs(a - e) / (1.0 + np.abs(e)))))
    return worst


def onnx_feed(model_inputs: Iterable[Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` ({input name: nested list}) as arrays for onnxruntime, checked against the
    model's inputs (``session.get_inputs()``: names, types, fixed dimensions). Raises
    ValueError saying what does not fit."""
    import numpy as np

    wanted = {arg.name: arg for arg in model_inputs}
    if set(given) != set(wanted):
        raise ValueError(f"inputs are {sorted(given)}; the model takes {sorted(wanted)}")
    feed = {}
    for name, values in given.items():
        arg = wanted[name]
        dtype = ONNX_DTYPES.get(arg.type)
        if dtype is None:
            raise ValueError(f"{name}: inputs of type {arg.type} are not supported")
        try:
            array = np.asarray(values, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: not {dtype} values: {exc}") from None
        want = list(arg.shape)
        if array.ndim != len(want) or any(isinstance(d, int) and d > 0 and d != got
                                          for d, got in zip(want, array.shape, strict=True)):
            raise ValueError(f"{name}: shape {list(array.shape)} does not fit {want}")
        feed[name] = array
    return feed


def greedy_tokens(llm: Any, prompt: str, max_tokens: int) -> list[int]:
    """The token ids a ``llama_cpp.Llama`` generates greedily from ``prompt``: what a GGUF
    smoke test expects, computed the same way on the controller and on the device."""
    llm.reset()
    ids: list[int] = []
    for token in llm.generate(llm.tokenize(prompt.encode()), top_k=1, temp=0.0):
        if token == llm.token_eos() or len(ids) >= max_tokens:
            break
        ids.append(int(token))
    return ids


def distance(fmt: str, actual: Any, expected: Any, kind: str = "generate") -> float:
    """How far one result is from its expected value, in the unit ``tolerance`` uses."""
    if fmt == "gguf" and kind == "embed":
        return 1.0 - cosine(actual, expected)
    if fmt == "gguf":
        return 1.0 - token_agreement(actual, expected)
    return deviation(actual, expected)


def cosine(a: list[float], b: list[float]) -> float:
    """Cosine similarity of two vectors (0.0 if either is zero or they differ in length)."""
    import math

    if len(a) != len(b):
        return 0.0
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)


def token_agreement(actual: list[int], expected: list[int]) -> float:
    """The fraction of positions where two generations agree (1.0 for two empty ones)."""
    n = max(len(actual), len(expected))
    if n == 0:
        return 1.0
    return sum(a == e for a, e in zip(actual, expected, strict=False)) / n


def encode(completed: dict[str, Any]) -> bytes:
    """A completed smoke test (with ``expected``) as its file's bytes."""
    return json.dumps(completed, separators=(",", ":"), sort_keys=True,
                      allow_nan=False).encode()


def decode(data: bytes | str) -> dict[str, Any]:
    """The inverse of ``encode``; raises ValueError on anything else."""
    value = json.loads(data)
    if not isinstance(value, dict) or "inputs" not in value or "expected" not in value:
        raise ValueError("not a completed smoke test")
    return value
