"""The derive worker: completes a version's smoke test and builds its quantised variants.

Runs as a child process (``python -m controller.registry.derive``), one per job, so a
runtime that aborts (llama.cpp does, on some bad input) or eats memory takes down only
the job. It reads a JSON spec from the file named by its argument::

    {"format": "onnx" | "gguf", "source": path, "workdir": path, "smoke_test": {...}}

and writes JSON lines on stdout: ``{"progress": 0.4, "message": ...}`` while it works,
then ``{"result": {...}}`` or ``{"error": "..."}``. It never touches the database or the
blob store; ``controller.registry.jobs`` does, with what this returns.

ONNX sources get an ``int8`` variant (onnxruntime dynamic quantisation); f16/f32 GGUF
sources get ``q8_0`` and ``q4_k_m`` (llama.cpp's quantiser). Each variant is compared
with the source on the smoke inputs, and its own outputs become its expected outputs.
"""

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared import smoke

Emit = Callable[..., None]

#: GGUF variants to build, with llama.cpp's ``llama_ftype`` for each.
GGUF_VARIANTS = (("q8_0", 7), ("q4_k_m", 15))
GGUF_SOURCES = ("f32", "f16", "bf16")


class DeriveError(Exception):
    """The job cannot be done; the message says why, for the operator."""


def derive(spec: dict[str, Any], emit: Emit) -> dict[str, Any]:
    test = smoke.SmokeTest.model_validate(spec.get("smoke_test") or {})
    source, workdir = Path(spec["source"]), Path(spec["workdir"])
    if spec["format"] == "onnx":
        return _derive_onnx(source, workdir, test, emit,
                            quantize=spec.get("quantization") == "fp32")
    return _derive_gguf(source, workdir, test, emit,
                        quantize=spec.get("quantization") in GGUF_SOURCES)


# -- ONNX -------------------------------------------------------------------------------

def _derive_onnx(source: Path, workdir: Path, test: smoke.SmokeTest, emit: Emit, *,
                 quantize: bool) -> dict[str, Any]:
    import onnxruntime as ort

    emit(progress=0.05, message="running the source model on the smoke inputs")
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    inputs = test.inputs if test.inputs is not None else _generated_feeds(session)
    if not all(isinstance(i, dict) for i in inputs):
        raise DeriveError("smoke-test inputs of an ONNX model are objects "
                          "{input name: values}, not strings")
    feeds = [_feed(session, i, n) for n, i in enumerate(inputs)]  # type: ignore[arg-type]
    outputs, source_ms = _run_all(session, feeds)
    result = _result(test, "onnx", inputs, outputs)
    if not quantize:
        return result
    emit(progress=0.35, message="quantising to int8 (onnxruntime dynamic quantisation)")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = workdir / "int8.onnx"
    try:
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8)
        quantized = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - the quantiser raises many types
        raise DeriveError(f"int8 quantisation failed: {exc}") from None
    emit(progress=0.7, message="comparing int8 with the source on the smoke inputs")
    q_outputs, q_ms = _run_all(quantized, feeds)
    result["variants"].append({
        "name": "int8", "path": str(out), "quantization": "int8", "expected": q_outputs,
        "comparison": {
            "size_ratio": round(out.stat().st_size / source.stat().st_size, 4),
            "max_abs_diff": _max_abs_diff(q_outputs, outputs),
            "max_deviation": round(max(smoke.deviation(q, o)
                                       for q, o in zip(q_outputs, outputs, strict=True)), 6),
            "top1_agreement": _top1_agreement(q_outputs, outputs),
            "inputs": len(feeds),
            "latency_ms": {"source": source_ms, "variant": q_ms},
        }})
    return result


def _generated_feeds(session: Any) -> list[dict[str, Any]]:
    """Seeded random inputs shaped like the model's (dynamic dimensions as 1)."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(smoke.GENERATED_INPUTS):
        feed = {}
        for arg in session.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
            dtype = smoke.ONNX_DTYPES.get(arg.type)
            if dtype is None:
                raise DeriveError(f"cannot generate smoke inputs for {arg.name} of type "
                                  f"{arg.type}; give them with --smoke-test")
            values = rng.standard_normal(shape) if dtype.startswith("float") \
                else rng.integers(0, 2 if dtype == "bool" else 10, shape)
            feed[arg.name] = values.astype(dtype).tolist()
        feeds.append(feed)
    return feeds




def _feed(session: Any, given: dict[str, Any], n: int) -> dict[str, Any]:
    try:
        return smoke.onnx_feed(session.get_inputs(), given)
    except ValueError as exc:
        raise DeriveError(f"smoke-test input {n}: {exc}") from None


def _run_all(session: Any, feeds: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
    names = [o.name for o in session.get_outputs()]
    outputs, times = [], []
    for feed in feeds:
        started = time.perf_counter()
        values = session.run(names, feed)
        times.append((time.perf_counter() - started) * 1000)
        outputs.append({name: v.tolist() for name, v in zip(names, values, strict=True)})
    return outputs, round(statistics.median(times), 3)


def _max_abs_diff(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    import numpy as np

    return round(max(float(np.max(np.abs(np.asarray(x[k], dtype=np.float64) - np.asarray(y[k]))))
                     for x, y in zip(a, b, strict=True) for k in x if np.asarray(y[k]).size), 6)


def _top1_agreement(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """How often the first output's arg-max (over its last axis) is the same."""
    import numpy as np

    same = total = 0
    for x, y in zip(a, b, strict=True):
        first = next(iter(y))
        ax, bx = np.asarray(x[first]), np.asarray(y[first])
        if bx.ndim == 0 or bx.size == 0:
            continue
        same += int(np.sum(np.argmax(ax, axis=-1) == np.argmax(bx, axis=-1)))
        total += int(np.argmax(bx, axis=-1).size)
    return round(same / total, 4) if total else 1.0


# -- GGUF -------------------------------------------------------------------------------

def _derive_gguf(source: Path, workdir: Path, test: smoke.SmokeTest, emit: Emit, *,
                 quantize: bool) -> dict[str, Any]:
    try:
        import llama_cpp
    except ImportError:
        raise DeriveError("llama-cpp-python is not installed on the controller, so GGUF "
                          "smoke tests and variants cannot be built; install "
                          "'edgefleet[llm]'") from None
    prompts = test.inputs if test.inputs is not None else list(smoke.DEFAULT_PROMPTS)
    if not all(isinstance(p, str) for p in prompts):
        raise DeriveError("smoke-test inputs of a GGUF model are prompts (strings)")
    emit(progress=0.05, message="generating from the source model on the smoke prompts")
    tokens, source_ms = _generate(source, prompts, test.max_tokens)  # type: ignore[arg-type]
    result = _result(test, "gguf", prompts, tokens)
    if not quantize:
        return result
    for step, (name, ftype) in enumerate(GGUF_VARIANTS):
        emit(progress=0.2 + 0.4 * step, message=f"quantising to {name} (llama.cpp)")
        out = workdir / f"{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
        if rc != 0 or not out.exists():
            raise DeriveError(f"llama.cpp could not quantise to {name} (code {rc})")
        emit(progress=0.4 + 0.4 * step, message=f"comparing {name} with the source")
        q_tokens, q_ms = _generate(out, prompts, test.max_tokens)  # type: ignore[arg-type]
        result["variants"].append({
            "name": name, "path": str(out), "quantization": name, "expected": q_tokens,
            "comparison": {
                "size_ratio": round(out.stat().st_size / source.stat().st_size, 4),
                "token_agreement": round(statistics.fmean(
                    smoke.token_agreement(q, s) for q, s in zip(q_tokens, tokens, strict=True)),
                    4),
                "inputs": len(prompts),
                "latency_ms": {"source": source_ms, "variant": q_ms},
            }})
    return result


def _generate(model: Path, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy token ids for each prompt, and the median time per prompt in ms."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=512, n_threads=2, seed=0, verbose=False)
    out, times = [], []
    for prompt in prompts:
        started = time.perf_counter()
        out.append(smoke.greedy_tokens(llm, prompt, max_tokens))
        times.append((time.perf_counter() - started) * 1000)
    llm.close()
    return out, round(statistics.median(times), 3)


# -- both -------------------------------------------------------------------------------

def _result(test: smoke.SmokeTest, fmt: str, inputs: list[Any], outputs: list[Any]
            ) -> dict[str, Any]:
    """The completed smoke test; given expected outputs must match the source's."""
    tolerance = test.tolerance or smoke.DEFAULT_TOLERANCE[fmt]
    expected = outputs if test.expected is None else test.expected
    for n, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        off = smoke.distance(fmt, got, want)
        if off > tolerance:
            raise DeriveError(f"the source model does not reproduce smoke-test output {n}: "
                              f"off by {off:.3g}, tolerance {tolerance:g}")
    completed = {"inputs": inputs, "tolerance": tolerance, "generated_inputs": test.inputs is None,
                 "latency_budget_ms": test.latency_budget_ms
                 or smoke.DEFAULT_LATENCY_BUDGET_MS[fmt]}
    if fmt == "gguf":
        completed["max_tokens"] = test.max_tokens
    if len(json.dumps(completed)) + len(json.dumps(expected)) > smoke.MAX_BYTES:
        raise DeriveError(f"the smoke test is larger than {smoke.MAX_BYTES // 1024} KiB; it "
                          "travels in signed metadata, so give fewer or smaller inputs")
    return {"smoke_test": completed, "source_expected": expected, "variants": []}


def main() -> int:
    def emit(**fields: Any) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    try:
        emit(result=derive(json.loads(Path(sys.argv[1]).read_text()), emit))
    except DeriveError as exc:
        emit(error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
