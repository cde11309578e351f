"""The device's inference server against bare runtimes, in one run: what an app on the
box pays for going through the agent.

(a) GGUF through the OpenAI API (HTTP -> model worker process -> llama.cpp) against bare
    llama-cpp-python on the same file with the same settings (n_ctx 512, 2 threads,
    greedy), each in a process of its own, in alternating blocks: tokens/s of a
    non-streamed completion, and the time to the first token of a streamed one; on the
    corpus's trained tiny llama (3 MiB: the API's share is largest) and on a random
    llama of ``--width`` and ``--layers`` (81 MiB by default);
(b) a small ONNX model through the JSON API against a bare ``InferenceSession.run``
    (p50; bench/distribute.py's measurement, repeated here so all four figures come
    from one run);
(c) ``onnx_parallel``: four requests at once against one at a time (throughput), a
    recurrent model and a conv net, one call at a time (the default) and two;
(d) an ONNX sentence encoder (all-MiniLM-L6-v2 with a vector per token, its tokenizer
    and pooling declared in the file) through ``/v1/embeddings``, a batch of 8
    sentences, against the same tokenizer, session and pooling run bare in a process of
    its own (p50, alternating blocks);
(e) the real agent daemon (``edgefleet agent run``, enrolled to a controller on the
    embedded broker), idle with no model: its resident memory and threads.

    python bench/serving.py [--requests 60] [--width 1024 --layers 4] [--only embeddings]

Prints a table and writes bench/results/serving.json.
"""

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cli.ports import free_port, wait_until  # noqa: E402

PROMPT = "The quick brown fox"
MAX_TOKENS = 64
#: bare and API alternate this many times (this machine's speed drifts by +-5% over a
#: minute, as much as the API costs)
BLOCKS = 6


def gguf(model_dir: Path, requests: int) -> dict[str, Any]:
    """Tokens/s and time to first token, API against bare, on the model staged in
    ``model_dir``."""
    from agent.serving import LocalApi, Serving

    serving = Serving()
    serving.activate(model_dir)
    api = LocalApi(serving, "127.0.0.1", 0)
    api.start()
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "api": []}
    try:
        for _ in range(BLOCKS):  # in turns, so drifts in the machine fall on both alike
            bare = subprocess.run([sys.executable, __file__, "--role", "bare-llama",
                                   "--model", str(model_dir / "model.gguf"),
                                   "--requests", str(requests // BLOCKS)],
                                  capture_output=True, text=True, check=True, timeout=1800)
            runs["bare"] += json.loads(bare.stdout.splitlines()[-1])
            runs["api"] += [_through_api(api.port) for _ in range(requests // BLOCKS)]
    finally:
        api.stop()
        serving.activate(None)
    out: dict[str, Any] = {"model_mib": round((model_dir / "model.gguf").stat().st_size
                                              / 2**20, 1), "requests": requests}
    for kind, got in runs.items():
        out[f"{kind}_tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in got), 1)
        out[f"{kind}_first_token_ms"] = round(statistics.median(r["first_token_ms"]
                                                                for r in got), 2)
    out["tokens_per_s_ratio"] = round(out["api_tokens_per_s"] / out["bare_tokens_per_s"], 3)
    out["first_token_extra_ms"] = round(out["api_first_token_ms"] - out["bare_first_token_ms"],
                                        2)
    return out


def _through_api(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    whole = json.loads(conn.getresponse().read())
    elapsed = time.perf_counter() - started
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body | {"stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    while not resp.readline().startswith(b"data: {"):
        pass
    first = time.perf_counter() - started
    resp.read()
    conn.close()
    return {"tokens_per_s": whole["usage"]["completion_tokens"] / elapsed,
            "first_token_ms": first * 1000}


def bare_llama(model: Path, n: int) -> None:
    """``n`` completions and ``n`` streamed ones with bare llama-cpp-python, as the model
    worker makes them; prints each pair's figures as JSON."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=512, n_threads=2, seed=0, verbose=False)
    llm.create_completion(PROMPT, max_tokens=4, temperature=0)  # warm up
    out = []
    for _ in range(n):
        started = time.perf_counter()
        whole = llm.create_completion(PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        elapsed = time.perf_counter() - started
        started = time.perf_counter()
        stream = llm.create_completion(PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True)
        next(iter(stream))
        first = time.perf_counter() - started
        for _chunk in stream:
            pass
        out.append({"tokens_per_s": whole["usage"]["completion_tokens"] / elapsed,
                    "first_token_ms": first * 1000})
    print(json.dumps(out))


def onnx(tmp: Path, requests: int) -> dict[str, Any]:
    import numpy as np
    from distribute import _served  # the same measurement as bench/distribute.py

    from tests.models import tiny_onnx

    x = np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)
    got = _served(tmp / "onnx", tiny_onnx(), "mlp", {"x": x}, requests, {
        "json": ("/v1/models/mlp/infer", json.dumps({"inputs": {"x": x.tolist()}}).encode(),
                 {"Content-Type": "application/json"})})
    return {"requests": requests, "bare_ort_p50_ms": got["bare_ort_p50_ms"],
            "api_p50_ms": got["json_p50_ms"], "overhead_p50_ms": got["json_overhead_p50_ms"]}


def concurrency(tmp: Path) -> dict[str, Any]:
    import numpy as np

    from tests.agent.test_parallel import infer, ratio, serve
    from tests.models import image_onnx, recurrent_onnx

    models = {"gru-4000-steps": (recurrent_onnx(4000), "x", (4000, 1, 64)),
              "conv-3x320x320": (image_onnx(), "image", (1, 3, 320, 320))}
    out: dict[str, Any] = {}
    for label, (model, name, shape) in models.items():
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for parallel in (1, 2):
            serving, api, _file = serve(tmp, model, name=f"{label}", parallel=parallel)
            try:
                def call(port: int = api.port, x: Any = x, model: str = label,
                         name: str = name) -> Any:
                    return infer(port, x, model, name)

                call()
                started = time.perf_counter()
                for _ in range(20):
                    call()
                alone_ms = (time.perf_counter() - started) / 20 * 1000
                out[f"{label} parallel {parallel}"] = {
                    "alone_ms": round(alone_ms, 2),
                    "four_at_once_throughput": round(ratio(call, 40), 2)}
            finally:
                api.stop()
                serving.activate(None)
    return out


def embeddings(tmp: Path, requests: int) -> dict[str, Any]:
    """p50 of a batch of 8 sentences through ``/v1/embeddings`` and bare."""
    from agent.serving import LocalApi, Serving
    from controller.registry.inspect import inspect_artifact
    from tests.models import staged
    from tests.support import corpus

    entry = corpus.build("minilm_tokens")
    model_dir = staged(tmp / "encoder", entry.path.read_bytes(), model="minilm",
                       requirements=inspect_artifact(entry.path).requirements)
    serving = Serving()
    serving.activate(model_dir)
    api = LocalApi(serving, "127.0.0.1", 0)
    api.start()
    conn = http.client.HTTPConnection("127.0.0.1", api.port)
    # base64, as the openai client asks unless told otherwise ("float" costs 1.7 ms more
    # here: json.dumps of 8 x 384 floats)
    body = json.dumps({"model": "minilm", "input": corpus.SENTENCES[:8],
                       "encoding_format": "base64"}).encode()
    times: dict[str, list[float]] = {"bare": [], "api": []}
    try:
        for _ in range(BLOCKS):
            bare = subprocess.run([sys.executable, __file__, "--role", "bare-embed", "--model",
                                   str(entry.path), "--requests", str(requests // BLOCKS)],
                                  capture_output=True, text=True, check=True, timeout=600)
            times["bare"] += json.loads(bare.stdout.splitlines()[-1])
            for _ in range(requests // BLOCKS):
                started = time.perf_counter()
                conn.request("POST", "/v1/embeddings", body,
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                times["api"].append((time.perf_counter() - started) * 1000)
                if resp.status != 200:
                    raise RuntimeError(f"/v1/embeddings answered {resp.status}")
    finally:
        api.stop()
        serving.activate(None)
    p50 = {k: statistics.median(v) for k, v in times.items()}
    return {"requests": requests, "batch": 8, "bare_p50_ms": round(p50["bare"], 3),
            "api_p50_ms": round(p50["api"], 3),
            "overhead_p50_ms": round(p50["api"] - p50["bare"], 3)}


def bare_embed(model: Path, n: int) -> None:
    """``n`` batches of 8 sentences embedded bare: the file's own tokenizer and pooling,
    ``tokenizers``, onnxruntime and numpy; prints each batch's milliseconds as JSON."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from shared import encoder
    from tests.support import corpus

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    declared = encoder.parse(session.get_modelmeta().custom_metadata_map)
    assert declared is not None  # noqa: S101 - the corpus's encoder declares it
    tokenizer = Tokenizer.from_str(declared.tokenizer)
    tokenizer.no_truncation()
    tokenizer.enable_padding()

    def embed() -> Any:
        encoded = tokenizer.encode_batch(corpus.SENTENCES[:8])
        feed = {"input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64)}
        (hidden,) = session.run(None, feed)
        mask = feed["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    embed()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        embed()
        times.append((time.perf_counter() - started) * 1000)
    print(json.dumps(times))


def idle_agent(tmp: Path) -> dict[str, Any]:
    """A real daemon enrolled to a real controller, with no model, after a few health
    reports."""
    import psutil

    from cli.api import Api
    from cli.realfleet import RealFleet

    http_at = f"127.0.0.1:{free_port()}"
    log = (tmp / "controller.log").open("wb")
    controller = subprocess.Popen(
        [sys.executable, "-m", "cli", "controller", "serve", "--data-dir",
         str(tmp / "controller"), "--http", http_at, "--broker-listen",
         f"127.0.0.1:{free_port()}", "--health-interval", "1"],
        stdout=log, stderr=subprocess.STDOUT)
    url, token = f"http://{http_at}", tmp / "controller" / "admin-token"
    try:
        if not wait_until(lambda: token.exists() and Api(url, None).ready(), 60):
            raise SystemExit(f"the controller did not start; see {tmp / 'controller.log'}")
        fleet = RealFleet(Api(url, token.read_text().strip()), tmp)
        agent = fleet.add("idle")
        fleet.start(agent)
        try:
            fleet.wait_online()
            process = psutil.Process(agent.proc.pid)  # type: ignore[union-attr]
            reports = Api(url, token.read_text().strip())
            seen = reports.call("GET", f"/devices/{agent.device_id}")["last_seen_at"]
            wait_until(lambda: reports.call("GET", f"/devices/{agent.device_id}")
                       ["last_seen_at"] != seen, 30)  # it has sent a health report since
            rss = process.memory_info().rss
            return {"rss_mib": round(rss / 2**20, 1), "threads": process.num_threads(),
                    "children": len(process.children(recursive=True))}
        finally:
            fleet.close()
    finally:
        controller.terminate()
        controller.wait(30)


def report(results: dict[str, Any]) -> None:
    for part, figures in results.items():
        if not isinstance(figures, dict):
            print(f"{part:28} {figures}")
            continue
        print(f"\n{part}")
        for key, value in figures.items():
            print(f"  {key:26} {value}")
    out = ROOT / "bench" / "results" / "serving.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


def _gguf(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from tests.models import staged, tiny_gguf
    from tests.support import corpus

    options = {"model": "llm", "fmt": "gguf", "quantization": "f16"}
    trained = staged(tmp / "trained", corpus.build("tiny_llama").path.read_bytes(), **options)
    wide = staged(tmp / "wide", tiny_gguf(tmp / "wide.gguf", width=args.width,
                                          layers=args.layers), **options)
    # the trained llama writes text (a random one writes byte tokens, whose partial UTF-8
    # llama-cpp-python holds back, which makes its first chunk late)
    return {"gguf_trained_llama": gguf(trained, args.requests),
            "gguf_random_wide": gguf(wide, args.requests)}


#: the parts, in the docstring's order (``--only`` runs some)
PARTS: dict[str, Callable[[Path, argparse.Namespace], dict[str, Any]]] = {
    "gguf": _gguf,
    "onnx": lambda tmp, args: {"onnx": onnx(tmp, args.onnx_requests)},
    "parallel": lambda tmp, _args: {"onnx_parallel": concurrency(tmp)},
    "embeddings": lambda tmp, args: {"onnx_embeddings": embeddings(tmp, args.embed_requests)},
    "idle": lambda tmp, _args: {"idle_agent": idle_agent(tmp)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--onnx-requests", type=int, default=3000)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embed-requests", type=int, default=120)
    parser.add_argument("--role", choices=["harness", "bare-llama", "bare-embed"],
                        default="harness")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--only", action="append", choices=list(PARTS),
                        help="run this part only (repeat for several)")
    args = parser.parse_args()
    if args.role == "bare-llama":
        bare_llama(args.model, args.requests)
        return
    if args.role == "bare-embed":
        bare_embed(args.model, args.requests)
        return
    with tempfile.TemporaryDirectory(prefix="ef-serving-") as tmp_name:
        tmp = Path(tmp_name)
        results: dict[str, Any] = {"at": datetime.now(UTC).isoformat()}
        for part in args.only or PARTS:
            results |= PARTS[part](tmp, args)
    report(results)


if __name__ == "__main__":
    main()
