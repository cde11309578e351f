"""Run models on sample inputs in a fresh process: outputs, latency and peak memory.

``python -m controller.registry.measure run MODEL SAMPLES OUT`` loads MODEL with
onnxruntime, runs every sample of SAMPLES (a samples ``.npz``, see ``inputs``), writes
the outputs to OUT (the same layout) and prints ``{"peak_rss_bytes": ..}``: the peak
resident memory of a process that holds the runtime and the model and has run every
sample, which is what a device's model worker needs.

``python -m controller.registry.measure latency A B SAMPLES`` times A and B on the same
samples in turns (A, B, A, B, ...) in one process, so load on the machine falls on both
alike, and prints ``{"latency_ms": [median A, median B]}`` (one sample per call).

``python -m controller.registry.measure gguf MODEL SPEC`` loads a GGUF with llama.cpp
at the device's context and runs SPEC's prompts (a JSON file: ``{"prompts": [...],
"max_tokens": n, "embedding": bool}``): greedy token ids, or embeddings for an encoder,
and prints ``{"outputs": [...], "latency_ms": median per prompt, "peak_rss_bytes": ..}``.

``python -m controller.registry.measure perplexity MODEL TEXT`` prints ``{"perplexity":
.., "tokens": n}``: the model's perplexity on the text in the file TEXT (its first
``PERPLEXITY_TOKENS`` tokens, in windows of the context), on its own process because
keeping every position's logits costs memory a device never spends.

The derive worker calls these; each measurement is a process of its own so one model's
memory is not counted in another's, and a runtime that crashes takes only it down.
"""

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: timing stops after this many rounds or this many seconds, whichever comes first
ROUNDS, BUDGET_S, TIMED_SAMPLES = 30, 3.0, 8
#: perplexity is measured on at most this many tokens of the given text
PERPLEXITY_TOKENS = 4096


class MeasureError(Exception):
    """The model could not be run; the message is the runtime's."""


def run(model: Path, samples: Path, out: Path, *, timeout_s: float = 1800.0) -> int:
    """Outputs of ``model`` on ``samples`` into ``out``; returns the peak RSS in bytes."""
    return int(_child(["run", str(model), str(samples), str(out)], timeout_s)["peak_rss_bytes"])


def latency(a: Path, b: Path, samples: Path, *, timeout_s: float = 1800.0
            ) -> tuple[float, float]:
    """Median latency in ms of ``a`` and of ``b``, timed in turns in one process."""
    got = _child(["latency", str(a), str(b), str(samples)], timeout_s)["latency_ms"]
    return float(got[0]), float(got[1])


def gguf(model: Path, spec: Path, *, timeout_s: float = 1800.0) -> dict[str, Any]:
    """``{"outputs", "latency_ms", "peak_rss_bytes"}`` of a GGUF on the prompts of ``spec``."""
    return _child(["gguf", str(model), str(spec)], timeout_s)


def perplexity(model: Path, text: Path, *, timeout_s: float = 1800.0) -> dict[str, Any]:
    """``{"perplexity", "tokens"}`` of a GGUF on the text in the file ``text``."""
    return _child(["perplexity", str(model), str(text)], timeout_s)


def _child(args: list[str], timeout_s: float) -> dict[str, Any]:
    try:
        done = subprocess.run(  # noqa: S603 - our own module, our own files
            [sys.executable, "-m", "controller.registry.measure", *args],
            capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"running the model took over {timeout_s:g} s") from None
    if done.returncode < 0:
        runtime = "llama.cpp" if args[0] in ("gguf", "perplexity") else "onnxruntime"
        raise MeasureError(f"{runtime} crashed running the model (signal {-done.returncode})")
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        raise MeasureError(lines[-1][:400] if lines else f"exit code {done.returncode}")
    return dict(json.loads(done.stdout.splitlines()[-1]))


def _session(model: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def _main_run(model: Path, samples: Path, out: Path) -> dict[str, Any]:
    import numpy as np

    from controller.registry.inputs import read_samples

    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    arrays = {}
    for i, feed in enumerate(read_samples(samples.read_bytes())):
        for name, value in zip(names, session.run(names, feed), strict=True):
            arrays[f"{i:04d}/{name}"] = value
    np.savez(out, **arrays)
    return {"peak_rss_bytes": peak_rss()}


def peak_rss() -> int:
    """This process's peak resident memory in bytes. ``VmHWM`` belongs to the process's
    own address space; ``ru_maxrss`` would carry over the parent's from before exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _main_latency(a: Path, b: Path, samples: Path) -> dict[str, Any]:
    from controller.registry.inputs import read_samples

    feeds = read_samples(samples.read_bytes())[:TIMED_SAMPLES]
    sessions = [_session(a), _session(b)]
    for s in sessions:  # warm up: the first run allocates
        s.run(None, feeds[0])
    times: list[list[float]] = [[], []]
    started = time.monotonic()
    for _ in range(ROUNDS):
        for which, s in enumerate(sessions):
            for feed in feeds:
                t = time.perf_counter()
                s.run(None, feed)
                times[which].append((time.perf_counter() - t) * 1000)
        if time.monotonic() - started > BUDGET_S:
            break
    return {"latency_ms": [round(statistics.median(t), 4) for t in times]}


def _llama(model: Path, **options: Any) -> Any:
    from llama_cpp import Llama

    from shared.smoke import GGUF_CONTEXT

    return Llama(model_path=str(model), n_ctx=GGUF_CONTEXT, n_threads=2, seed=0,
                 verbose=False, **options)


def _main_gguf(model: Path, spec_path: Path) -> dict[str, Any]:
    from shared.smoke import greedy_tokens

    spec = json.loads(spec_path.read_text())
    embedding = bool(spec.get("embedding"))
    llm = _llama(model, embedding=embedding)
    outputs: list[Any] = []
    times = []
    for prompt in spec["prompts"]:
        started = time.perf_counter()
        outputs.append([float(v) for v in llm.embed(prompt)] if embedding
                       else greedy_tokens(llm, prompt, int(spec["max_tokens"])))
        times.append((time.perf_counter() - started) * 1000)
    rss = peak_rss()
    llm.close()
    return {"outputs": outputs, "latency_ms": round(statistics.median(times), 3),
            "peak_rss_bytes": rss}


def _main_perplexity(model: Path, text: Path) -> dict[str, Any]:
    """exp of the mean negative log-likelihood of each token given the ones before it in
    its window (windows of the context, as llama.cpp's perplexity tool)."""
    import numpy as np

    llm = _llama(model, logits_all=True)
    ids = llm.tokenize(text.read_bytes())[:PERPLEXITY_TOKENS]
    window, nll, scored = llm.n_ctx(), 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:len(chunk) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        nll += float(np.sum(log_norm - logits[np.arange(len(chunk) - 1), chunk[1:]]))
        scored += len(chunk) - 1
    llm.close()
    if not scored:
        raise ValueError("the text is shorter than two tokens")
    return {"perplexity": round(float(np.exp(nll / scored)), 4), "tokens": scored}


def main(argv: list[str]) -> int:
    try:
        if argv[0] == "run":
            result = _main_run(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        elif argv[0] == "latency":
            result = _main_latency(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        elif argv[0] == "gguf":
            result = _main_gguf(Path(argv[1]), Path(argv[2]))
        elif argv[0] == "perplexity":
            result = _main_perplexity(Path(argv[1]), Path(argv[2]))
        else:
            sys.stderr.write(f"unknown command {argv[0]!r}\n")
            return 2
    except Exception as exc:  # noqa: BLE001 - the runtime's message is the answer
        lines = str(exc).strip().splitlines() or [""]
        sys.stderr.write(f"{type(exc).__name__}: {lines[0][:400]}\n")
        return 1
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
