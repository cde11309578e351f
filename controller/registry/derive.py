"""The derive worker: completes a version's smoke test and builds its derived variants.

Runs as a child process (``python -m controller.registry.derive``), one per job, so a
runtime that aborts (llama.cpp does, on some bad input) or eats memory takes down only
the job. It reads a JSON spec from the file named by its argument::

    {"format": "onnx" | "gguf", "quantization": ..., "source": path, "workdir": path,
     "smoke_test": {...} | null, "samples": path | null, "inputs": {name: spec},
     "variants": [names] | null, "floor": {metric: minimum}, "metric": name | null,
     "text": str | null}

and writes JSON lines on stdout as it goes:

- ``{"progress": 0.4, "message": ...}`` while it works;
- ``{"source": {...}}`` once the source has run on the sample inputs: the completed
  smoke test and the source's own figures. From then on the source is deployable,
  whatever happens to the derived variants;
- ``{"variant": {...}}`` for each derived variant worth offering, and
  ``{"refused": {"name": ..., "reason": ..., "comparison": ...}}`` for each that is not;
- ``{"result": {}}`` at the end, or ``{"error": "..."}`` if the source itself could not
  be run (the model's or the pusher's fault, never a quantiser's).

A derived variant is offered only if it is what its name says (int8: integer ops in
the graph, smaller than the source, no slower on this machine; fp16: smaller), it
loads, and its fidelity to the source on the sample inputs is above the version's
floor. It never touches the database or the blob store; ``controller.registry.jobs``
does, with what this writes.
"""

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.registry import fidelity, inputs, measure, quantize
from shared import smoke

Emit = Callable[..., None]

#: GGUF variants llama.cpp can build, with its ``llama_ftype`` for each.
GGUF_FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
GGUF_DEFAULT = ("q8_0", "q4_k_m")
GGUF_SOURCES = ("f32", "f16", "bf16")
#: smoke tests carry at most this many of the version's samples
SMOKE_SAMPLES = 4
#: an int8 variant this much slower than its source on the controller is refused (dynamic
#: int8 of conv nets: 2-30x); one merely no faster is kept, with a warning: on other CPUs
#: it may be faster, and it is a quarter of the size (measured: the tests' 128x4096 MLP,
#: faster than fp32 on earlier machines, 0.0296 vs 0.0289 ms on an AVX-512 one)
SLOWER = 1.25


class DeriveError(Exception):
    """The job cannot be done; the message says why, for the operator."""


def known_variants(fmt: str) -> tuple[str, ...]:
    return quantize.ONNX_VARIANTS if fmt == "onnx" else tuple(GGUF_FTYPES)


def default_variants(fmt: str, quantization: str) -> tuple[str, ...]:
    if fmt == "onnx":
        return ("int8",) if quantization == "fp32" else ()
    return GGUF_DEFAULT if quantization in GGUF_SOURCES else ()


def derive(spec: dict[str, Any], emit: Emit) -> None:
    test = smoke.SmokeTest.model_validate(spec.get("smoke_test") or {})
    source, workdir = Path(spec["source"]), Path(spec["workdir"])
    wanted = spec.get("variants")
    if wanted is None:
        wanted = default_variants(spec["format"], spec.get("quantization", ""))
    floor = fidelity.parse_floor(spec.get("floor") or {})
    if spec["format"] == "onnx":
        _OnnxJob(source, workdir, test, spec, floor, emit).run(list(wanted))
    else:
        _derive_gguf(source, workdir, test, emit, list(wanted), floor,
                     embedding=bool(spec.get("embedding")), text=spec.get("text"))
    emit(result={})


# -- ONNX -------------------------------------------------------------------------------

class _OnnxJob:
    def __init__(self, source: Path, workdir: Path, test: smoke.SmokeTest,
                 spec: dict[str, Any], floor: dict[str, float], emit: Emit) -> None:
        self.source, self.workdir, self.test, self.floor, self.emit = (
            source, workdir, test, floor, emit)
        self.spec = spec
        self.samples = workdir / "samples.npz"

    def run(self, wanted: list[str]) -> None:
        import onnxruntime as ort

        self.emit(progress=0.02, message="running the source model on the sample inputs")
        try:
            session = ort.InferenceSession(str(self.source), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise DeriveError(f"onnxruntime cannot load the model: {exc}") from None
        model_inputs = inputs.specs(session.get_inputs())
        outputs = [(o.name, tuple(o.shape)) for o in session.get_outputs()]
        del session
        feeds = self._feeds(model_inputs)
        self.samples.write_bytes(inputs.write_samples(feeds))
        try:
            expected, ram = self._run(self.source)
        except measure.MeasureError as exc:
            raise DeriveError(f"the model cannot run on its sample inputs: {exc}") from None
        self.metric = fidelity.primary_metric(outputs, self.spec.get("metric"))
        self.expected = expected
        # the operator's smoke test whole; else the first of the samples
        self.smoke_n = len(self.test.inputs) if self.test.inputs is not None else SMOKE_SAMPLES
        self.completed = _completed(self.test, "onnx",
                                    [_jsonable(f) for f in feeds[:self.smoke_n]],
                                    [_jsonable(o) for o in expected[:self.smoke_n]],
                                    generated=self.spec.get("samples") is None
                                    and self.test.inputs is None)
        self.emit(source={"smoke_test": _summary(self.completed),
                          "smoke_path": _write_smoke(self.workdir, "source", self.completed,
                                                     expected[:self.smoke_n]),
                          "ram_bytes": ram, "metric": self.metric, "inputs": len(feeds)})
        step = 0.9 / max(1, len(wanted))
        prepared: Path | None = None
        for n, name in enumerate(wanted):
            self.emit(progress=0.1 + step * n, message=f"building {name}")
            try:
                if prepared is None:
                    prepared = quantize.preprocess(self.source, self.workdir / "prepared.onnx")
                path, comparison, got = self._variant(name, prepared, feeds)
            except (quantize.BuildError, measure.MeasureError) as exc:
                self.emit(refused={"name": name, "reason": str(exc), "comparison": None})
            except _Refused as exc:
                self.emit(refused={"name": name, "reason": exc.reason,
                                   "comparison": exc.comparison})
            else:
                self.emit(variant={
                    "name": name, "path": str(path), "quantization": name.split("_")[0],
                    "smoke_path": _write_smoke(self.workdir, name, self.completed,
                                               got[:self.smoke_n]),
                    "comparison": comparison, "ram_bytes": comparison["ram_bytes"]})

    def _feeds(self, model_inputs: list[inputs.TensorSpec]) -> list[dict[str, Any]]:
        try:
            if self.spec.get("samples"):
                given: list[dict[str, Any]] = inputs.read_samples(
                    Path(self.spec["samples"]).read_bytes())
            elif self.test.inputs is not None:
                if not all(isinstance(i, dict) for i in self.test.inputs):
                    raise DeriveError("smoke-test inputs of an ONNX model are objects "
                                      "{input name: values}, not strings")
                given = list(self.test.inputs)  # type: ignore[arg-type]
            else:
                declared = inputs.parse_declarations(self.spec.get("inputs") or {}, model_inputs)
                given = inputs.generate(model_inputs, declared)
            return inputs.check_feeds(given, model_inputs)
        except inputs.InputError as exc:
            raise DeriveError(str(exc)) from None

    def _run(self, model: Path) -> tuple[list[dict[str, Any]], int]:
        out = self.workdir / f"{model.stem}.out.npz"
        ram = measure.run(model, self.samples, out)
        return inputs.read_samples(out.read_bytes()), ram

    def _variant(self, name: str, prepared: Path, feeds: list[dict[str, Any]]
                 ) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
        """Build and check one variant: its file, comparison and outputs."""
        out = self.workdir / f"{name}.onnx"
        if name == "fp16":
            return self._checked(name, quantize.fp16(prepared, out))
        if name == "int8_dynamic":
            return self._checked(name, quantize.int8_dynamic(prepared, out))
        if name == "int8_static":
            return self._checked(name, quantize.int8_static(prepared, out, feeds))
        # "int8": the method that suits the model first (static QDQ for conv nets), the
        # other if that one cannot be built or is not worth offering
        methods = ["static", "dynamic"] if quantize.has_conv(prepared) else ["dynamic", "static"]
        reasons, refused = [], None
        for method in methods:
            path = self.workdir / f"int8_{method}.onnx"
            try:
                if method == "static":
                    quantize.int8_static(prepared, path, feeds)
                else:
                    quantize.int8_dynamic(prepared, path)
                path, comparison, got = self._checked(name, path)
            except (quantize.BuildError, measure.MeasureError) as exc:
                reasons.append(f"{method}: {exc}")
                continue
            except _Refused as exc:
                reasons.append(f"{method}: {exc.reason}")
                refused = refused or exc  # the figures of the method that suits it
                continue
            comparison["method"] = method
            return path.rename(out), comparison, got
        if refused is not None:
            raise _Refused("; ".join(reasons), refused.comparison)
        raise quantize.BuildError("; ".join(reasons))

    def _checked(self, name: str, path: Path
                 ) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
        """What the variant is worth; raises _Refused if it is not what its name says or
        falls below the version's floor."""
        size_ratio = round(path.stat().st_size / self.source.stat().st_size, 4)
        got, ram = self._run(path)
        figures = fidelity.compare(got, self.expected)
        src_ms, var_ms = measure.latency(self.source, path, self.samples)
        comparison: dict[str, Any] = {
            "size_ratio": size_ratio, "fidelity": figures, "metric": self.metric,
            "inputs": len(got), "latency_ms": {"source": src_ms, "variant": var_ms},
            "ram_bytes": ram}
        if name.startswith("int8"):
            comparison["int8_ops"] = sorted(quantize.int8_ops(path))
            if not comparison["int8_ops"]:
                raise _Refused("it has no 8-bit integer op: not an int8 model", comparison)
            if var_ms > SLOWER * src_ms:
                raise _Refused(f"it is slower than the source on the controller ({var_ms:.3g} "
                               f"ms vs {src_ms:.3g} ms per sample)", comparison)
            if var_ms > src_ms:  # a quarter of the size is still worth it to small boxes
                comparison["warning"] = (f"no faster than the source on the controller "
                                         f"({var_ms:.3g} ms vs {src_ms:.3g} ms per sample)")
        if size_ratio >= 1.0:
            raise _Refused(f"it is not smaller than the source ({size_ratio:.0%} of its size)",
                           comparison)
        if why := fidelity.below_floor(figures, self.floor):
            raise _Refused(why, comparison)
        if not self.floor and (warning := fidelity.poor(figures, self.metric)):
            comparison["warning"] = warning
        return path, comparison, got


class _Refused(Exception):
    """A variant that was built but is not worth offering, with its figures."""

    def __init__(self, reason: str, comparison: dict[str, Any]) -> None:
        super().__init__(reason)
        self.reason, self.comparison = reason, comparison


def _jsonable(feed: dict[str, Any]) -> dict[str, Any]:
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in feed.items()}


# -- GGUF -------------------------------------------------------------------------------

def _derive_gguf(source: Path, workdir: Path, test: smoke.SmokeTest, emit: Emit,
                 wanted: list[str], floor: dict[str, float], *, embedding: bool,
                 text: str | None) -> None:
    """Quantise with llama.cpp; compare generated tokens (or, for an encoder, embeddings)
    with the source's on the smoke prompts, and a generator's perplexity on the pusher's
    text (else on the prompts) with the source's. Every model runs in a process of its
    own, whose peak memory is the variant's."""
    try:
        import llama_cpp
    except ImportError:
        raise DeriveError("llama-cpp-python is not installed on the controller, so GGUF "
                          "smoke tests and variants cannot be built; install "
                          "'edgefleet[llm]'") from None
    prompts = test.inputs if test.inputs is not None else list(smoke.DEFAULT_PROMPTS)
    if not all(isinstance(p, str) for p in prompts):
        raise DeriveError("smoke-test inputs of a GGUF model are prompts (strings)")
    kind, metric = ("embed", "cosine") if embedding else ("generate", "token_agreement")
    spec = workdir / "prompts.json"
    spec.write_text(json.dumps({"prompts": prompts, "max_tokens": test.max_tokens,
                                "embedding": embedding}))
    corpus = workdir / "text.txt"
    corpus.write_text(text if text else "\n".join(prompts))  # type: ignore[arg-type]
    emit(progress=0.05, message=f"running the source model on {len(prompts)} prompts")
    try:
        ran = measure.gguf(source, spec)
        source_ppl = None if embedding else measure.perplexity(source, corpus)
    except measure.MeasureError as exc:
        raise DeriveError(f"the model cannot run on its prompts: {exc}") from None
    outputs = ran["outputs"]
    completed = _completed(test, "gguf", list(prompts), outputs, generated=test.inputs is None,
                           kind=kind)
    emit(source={"smoke_test": _summary(completed),
                 "smoke_path": _write_smoke(workdir, "source", completed, outputs),
                 "ram_bytes": ran["peak_rss_bytes"], "metric": metric, "inputs": len(prompts),
                 **({"perplexity": source_ppl | {"text": "given" if text else "prompts"}}
                    if source_ppl else {})})
    for step, name in enumerate(wanted):
        emit(progress=0.2 + 0.8 * step / max(1, len(wanted)), message=f"quantising to {name}")
        out = workdir / f"{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = GGUF_FTYPES[name]
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
        if rc != 0 or not out.exists():
            emit(refused={"name": name, "reason": f"llama.cpp could not quantise to {name} "
                          f"(code {rc})", "comparison": None})
            continue
        try:
            got = measure.gguf(out, spec)
            ppl = None if source_ppl is None else measure.perplexity(out, corpus)
        except measure.MeasureError as exc:
            emit(refused={"name": name, "reason": str(exc), "comparison": None})
            continue
        similar = smoke.cosine if embedding else smoke.token_agreement
        figures = {metric: round(statistics.fmean(
            similar(q, s) for q, s in zip(got["outputs"], outputs, strict=True)), 6)}
        comparison: dict[str, Any] = {
            "size_ratio": round(out.stat().st_size / source.stat().st_size, 4),
            "fidelity": figures, "metric": metric, "inputs": len(prompts),
            "latency_ms": {"source": ran["latency_ms"], "variant": got["latency_ms"]},
            "ram_bytes": got["peak_rss_bytes"]}
        if ppl is not None and source_ppl is not None:
            # a similarity like the others: 1.0 when the variant is as sure of the text
            figures["perplexity"] = round(min(1.0, source_ppl["perplexity"]
                                              / ppl["perplexity"]), 6)
            comparison["perplexity"] = {"source": source_ppl["perplexity"],
                                        "variant": ppl["perplexity"], "tokens": ppl["tokens"],
                                        "text": "given" if text else "prompts"}
        why = ("it is not smaller than the source" if comparison["size_ratio"] >= 1.0
               else fidelity.below_floor(figures, floor))
        if why:
            emit(refused={"name": name, "reason": why, "comparison": comparison})
            continue
        if not floor and (warning := fidelity.poor(figures, metric)):
            comparison["warning"] = warning
        emit(variant={"name": name, "path": str(out), "quantization": name,
                      "smoke_path": _write_smoke(workdir, name, completed, got["outputs"]),
                      "comparison": comparison, "ram_bytes": got["peak_rss_bytes"]})


# -- both -------------------------------------------------------------------------------

def _completed(test: smoke.SmokeTest, fmt: str, inputs_: list[Any], outputs: list[Any], *,
               generated: bool, kind: str = "generate") -> dict[str, Any]:
    """The completed smoke test (without expected outputs: each variant has its own);
    given expected outputs must match the source's."""
    tolerance = test.tolerance or smoke.DEFAULT_TOLERANCE["embed" if kind == "embed" else fmt]
    if test.expected is not None:
        for n, (got, want) in enumerate(zip(outputs, test.expected, strict=False)):
            off = smoke.distance(fmt, got, want, kind)
            if off > tolerance:
                raise DeriveError(f"the source model does not reproduce smoke-test output {n}: "
                                  f"off by {off:.3g}, tolerance {tolerance:g}")
    completed = {"inputs": inputs_, "tolerance": tolerance, "generated_inputs": generated,
                 "latency_budget_ms": test.latency_budget_ms
                 or smoke.DEFAULT_LATENCY_BUDGET_MS[fmt]}
    if fmt == "gguf":
        completed["max_tokens"] = test.max_tokens
        completed["kind"] = kind
    return completed


def _summary(completed: dict[str, Any]) -> dict[str, Any]:
    """What the version records of its smoke test (the inputs live in its files)."""
    return {k: v for k, v in completed.items() if k != "inputs"} | {
        "inputs": len(completed["inputs"])}


def _write_smoke(workdir: Path, name: str, completed: dict[str, Any], expected: list[Any]
                 ) -> str:
    """One variant's smoke-test file: the inputs and what that variant answers."""
    data = smoke.encode({k: v for k, v in completed.items() if k != "generated_inputs"}
                        | {"expected": [_jsonable(o) if isinstance(o, dict) else o
                                        for o in expected]})
    if len(data) > smoke.MAX_BYTES:
        raise DeriveError(f"the smoke test is {len(data) >> 20} MiB, over the "
                          f"{smoke.MAX_BYTES >> 20} MiB devices accept; give smaller samples")
    path = workdir / f"{name}.smoke.json"
    path.write_bytes(data)
    return str(path)


def main() -> int:
    def emit(**fields: Any) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    try:
        derive(json.loads(Path(sys.argv[1]).read_text()), emit)
    except DeriveError as exc:
        emit(error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
