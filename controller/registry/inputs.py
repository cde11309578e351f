"""Sample inputs of an ONNX version: declared, given as files, or generated when safe.

A version's derivation and its smoke test run the model on sample inputs, and the
figures they record mean only as much as those inputs do. They come from, in order:

1. a samples file the pusher gave (an ``.npz`` whose arrays are named ``NNNN/input``:
   sample number, input name; ``edgefleet model push --samples`` writes it from
   ``.npy``, ``.npz`` or JSON);
2. the operator's smoke-test inputs (JSON, small);
3. declarations (``--input NAME=SPEC``), one per input, completing what the model's
   own description leaves open::

       float32[1,3,320,320]    uniform random values in [0, 1) of that shape
       int64:16000             a constant (a sample rate); int64[1,16]:0..30522 random ids
       zeros / zeros[2,1,64]   zeros (state tensors), of the model's or the given shape

4. generation from the model's own input description, only where that is safe: every
   dimension fixed, a float type, and a name that is not a recurrent state. Anything
   else (dynamic sizes that may have a minimum, integer inputs with meaning, state that
   must start at zero) is refused by ``missing`` with what to declare, rather than
   invented.

This module does not load models; callers pass ``TensorSpec``s read from onnxruntime.
"""

import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared import smoke

MAX_SAMPLES = 256
GENERATED = smoke.GENERATED_INPUTS
_STATE_NAMES = re.compile(r"(^|[_.])(state|states|h0|c0|hidden|cache|past|memory|mem)"
                          r"($|[_.\d])|^(h|c)$", re.IGNORECASE)
_SPEC = re.compile(r"^(?P<fill>zeros|ones|random)?(?P<dtype>[a-z]+[0-9]*)?"
                   r"(?P<shape>\[[0-9, ]*\])?(?::(?P<value>.+))?$")
_SAMPLE_KEY = re.compile(r"^(\d{1,4})/(.+)$")


class InputError(ValueError):
    """Sample inputs that cannot be used; the message says what to give instead."""


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as onnxruntime describes it."""

    name: str
    type: str  # "tensor(float)", "tensor(int64)", ...
    shape: tuple[int | str | None, ...]

    @property
    def dtype(self) -> str | None:
        return smoke.ONNX_DTYPES.get(self.type)

    @property
    def fixed(self) -> bool:
        return all(isinstance(d, int) and d > 0 for d in self.shape)


def specs(args: Iterable[Any]) -> list[TensorSpec]:
    """``session.get_inputs()`` (or outputs) as ``TensorSpec``s."""
    return [TensorSpec(a.name, a.type, tuple(d if isinstance(d, int) else None
                                             for d in a.shape)) for a in args]


@dataclass(frozen=True)
class Declaration:
    fill: str  # "zeros" | "ones" | "random" | "constant"
    dtype: str | None
    shape: tuple[int, ...] | None
    low: float = 0.0
    high: float = 1.0


def parse_declaration(text: str) -> Declaration:
    """One ``--input`` SPEC (see the module docstring); raises InputError."""
    match = _SPEC.match(text.strip().replace(" ", ""))
    if match is None or not text.strip():
        raise InputError(f"{text!r} is not an input spec like float32[1,3,224,224], "
                         "int64:16000 or zeros")
    dtype = match["dtype"]
    if dtype is not None and dtype not in smoke.ONNX_DTYPES.values():
        raise InputError(f"{text!r}: unknown type {dtype!r}; use one of "
                         f"{', '.join(sorted(set(smoke.ONNX_DTYPES.values())))}")
    shape = None if match["shape"] is None else tuple(
        int(d) for d in match["shape"].strip("[]").split(",") if d)
    if shape is not None and any(d <= 0 for d in shape):
        raise InputError(f"{text!r}: dimensions must be positive")
    if match["fill"] and match["value"]:
        raise InputError(f"{text!r}: give either {match['fill']} or a value, not both")
    if match["fill"]:
        return Declaration(match["fill"], dtype, shape)
    value = match["value"]
    if value is None:
        if shape is None:
            raise InputError(f"{text!r} says neither a shape nor a value")
        return Declaration("random", dtype, shape)
    low, sep, high = value.partition("..")
    try:
        if sep:
            return Declaration("random", dtype, shape, float(low), float(high))
        return Declaration("constant", dtype, shape, float(value), float(value))
    except ValueError:
        raise InputError(f"{text!r}: {value!r} is not a number or a range LOW..HIGH") from None


def parse_declarations(given: Mapping[str, str], model_inputs: list[TensorSpec]
                       ) -> dict[str, Declaration]:
    """Every declaration, checked against the model's inputs; raises InputError."""
    names = {t.name: t for t in model_inputs}
    out = {}
    for name, text in given.items():
        if name not in names:
            raise InputError(f"--input {name}: the model has no input {name!r} "
                             f"(its inputs: {', '.join(names)})")
        decl = parse_declaration(text)
        if decl.dtype is not None and decl.dtype != names[name].dtype:
            raise InputError(f"--input {name}: the model takes {names[name].dtype}, "
                             f"not {decl.dtype}")
        if decl.shape is not None:
            _check_shape(name, decl.shape, names[name])
        out[name] = decl
    return out


def missing(model_inputs: list[TensorSpec], declared: Mapping[str, Declaration]
            ) -> list[str]:
    """What must be declared before inputs can be generated: one line per input."""
    out = []
    for t in model_inputs:
        decl = declared.get(t.name)
        if decl is not None:
            if decl.shape is None and not t.fixed and decl.fill != "constant":
                out.append(f"{t.name}: its shape {shape_text(t.shape)} has dynamic "
                           f"dimensions; give one, e.g. --input {t.name}={decl.fill}"
                           f"{_example_shape(t.shape)}")
            continue
        if t.dtype is None:
            out.append(f"{t.name}: inputs of type {t.type} cannot be generated")
        elif not t.fixed:
            out.append(f"{t.name}: {shape_text(t.shape)} has dynamic dimensions (the model "
                       f"may need a minimum size); declare one, e.g. --input {t.name}="
                       f"{t.dtype}{_example_shape(t.shape)}, or give --samples")
        elif not t.dtype.startswith("float"):
            out.append(f"{t.name}: {t.dtype} values usually mean something (ids, a sample "
                       f"rate, a length); declare them, e.g. --input {t.name}={t.dtype}:16000 "
                       f"or {t.dtype}{shape_text(t.shape)}:0..100, or give --samples")
        elif _STATE_NAMES.search(t.name):
            out.append(f"{t.name}: looks like a recurrent state, which must start as the "
                       f"model expects; declare it, e.g. --input {t.name}=zeros, or give "
                       "--samples")
    return out


def generate(model_inputs: list[TensorSpec], declared: Mapping[str, Declaration],
             *, count: int = GENERATED, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Seeded inputs from declarations and safe model inputs; raises InputError with what
    is ``missing``."""
    needs = missing(model_inputs, declared)
    if needs:
        raise InputError("cannot generate sample inputs safely:\n" + "\n".join(needs))
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for t in model_inputs:
            decl = declared.get(t.name, Declaration("random", None, None))
            feed[t.name] = _values(rng, t, decl)
        feeds.append(feed)
    return feeds


def _values(rng: np.random.Generator, t: TensorSpec, decl: Declaration) -> np.ndarray:
    dtype = np.dtype(decl.dtype or t.dtype or "float32")
    if decl.shape is not None:
        shape: tuple[int, ...] = decl.shape
    elif t.fixed:
        shape = tuple(int(d) for d in t.shape if d is not None and not isinstance(d, str))
    else:  # a constant for a dynamic input: a scalar (``missing`` allowed only that)
        shape = ()
    if decl.fill == "zeros":
        return np.zeros(shape, dtype)
    if decl.fill == "ones":
        return np.ones(shape, dtype)
    if decl.fill == "constant":
        return np.full(shape, decl.low, dtype)
    if dtype.kind in "iu":
        return rng.integers(int(decl.low), max(int(decl.high), int(decl.low) + 1),
                            shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.uniform(decl.low, decl.high, shape).astype(dtype)


# -- sample files ---------------------------------------------------------------------

def write_samples(feeds: Sequence[Mapping[str, Any]]) -> bytes:
    """Feeds as the ``.npz`` the registry stores (``NNNN/input`` arrays)."""
    if not 1 <= len(feeds) <= MAX_SAMPLES:
        raise InputError(f"give between 1 and {MAX_SAMPLES} samples, not {len(feeds)}")
    arrays: dict[str, Any] = {f"{i:04d}/{name}": np.asarray(value)
                              for i, feed in enumerate(feeds) for name, value in feed.items()}
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def read_samples(data: bytes | io.BufferedIOBase) -> list[dict[str, np.ndarray]]:
    """The feeds of a samples ``.npz``; raises InputError on anything else."""
    try:
        with np.load(io.BytesIO(data) if isinstance(data, bytes) else data,
                     allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"not a samples .npz: {exc}") from None
    feeds: dict[int, dict[str, np.ndarray]] = {}
    for key, array in arrays.items():
        match = _SAMPLE_KEY.match(key)
        if match is None:
            raise InputError(f"samples .npz: array {key!r} is not named NNNN/input")
        feeds.setdefault(int(match[1]), {})[match[2]] = array
    if not 1 <= len(feeds) <= MAX_SAMPLES:
        raise InputError(f"samples .npz: between 1 and {MAX_SAMPLES} samples, not {len(feeds)}")
    return [feeds[i] for i in sorted(feeds)]


def check_feeds(feeds: Sequence[Mapping[str, Any]], model_inputs: list[TensorSpec]
                ) -> list[dict[str, np.ndarray]]:
    """Each feed checked against the model's inputs (names, types, fixed dimensions)."""
    out = []
    for n, feed in enumerate(feeds):
        try:
            out.append(smoke.onnx_feed(model_inputs, dict(feed)))
        except ValueError as exc:
            raise InputError(f"sample {n}: {exc}") from None
    return out


def _check_shape(name: str, shape: tuple[int, ...], t: TensorSpec) -> None:
    if len(shape) != len(t.shape) or any(isinstance(d, int) and d > 0 and d != g
                                         for d, g in zip(t.shape, shape, strict=True)):
        raise InputError(f"--input {name}: shape {list(shape)} does not fit the model's "
                         f"{shape_text(t.shape)}")


def shape_text(shape: tuple[int | str | None, ...]) -> str:
    """``[1,?,4]``: a shape as a message shows it ("?" for a dynamic dimension)."""
    return "[" + ",".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in shape) + "]"


def _example_shape(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) and d > 0 else "N" for d in shape) + "]"


def samples_from_files(given: list[str]) -> bytes:
    """The samples ``.npz`` for ``model push --samples`` arguments, each one of:

    - ``FILE.npz`` named ``NNNN/input`` (as stored), or named by input with the samples
      along the first axis;
    - ``INPUT=FILE.npy``: one input's samples along the first axis;
    - ``FILE.json``: a list of feeds ``{input name: nested list}``.
    """
    feeds: list[Mapping[str, Any]] = []
    stacked: dict[str, np.ndarray] = {}
    for arg in given:
        try:
            _read_sample_file(arg, feeds, stacked)
        except InputError:
            raise
        except (OSError, ValueError) as exc:
            raise InputError(f"{arg}: {exc}") from None
    if stacked:
        counts = {len(a) if a.ndim else 0 for a in stacked.values()}
        if len(counts) != 1 or 0 in counts:
            raise InputError("every input's samples need the same number along the first "
                             f"axis; got {({k: a.shape for k, a in stacked.items()})}")
        feeds += [{k: a[i] for k, a in stacked.items()} for i in range(counts.pop())]
    return write_samples(feeds)


def _read_sample_file(arg: str, feeds: list[Mapping[str, Any]],
                      stacked: dict[str, np.ndarray]) -> None:
    import json
    from pathlib import Path

    name, sep, file = arg.rpartition("=") if arg.endswith(".npy") else ("", "", arg)
    path = Path(file)
    if path.suffix == ".npy":
        if not sep:
            raise InputError(f"{arg}: say which input it holds: INPUT={arg}")
        stacked[name] = np.load(path, allow_pickle=False)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            if all(_SAMPLE_KEY.match(k) for k in npz.files):
                feeds += read_samples(path.read_bytes())
            else:
                stacked |= {k: npz[k] for k in npz.files}
    elif path.suffix == ".json":
        value = json.loads(path.read_text())
        if not isinstance(value, list) or not all(isinstance(f, dict) for f in value):
            raise InputError(f"{arg}: expected a JSON list of {{input: values}}")
        feeds += value
    else:
        raise InputError(f"{arg}: samples are .npz, .npy or .json files")
