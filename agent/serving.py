"""The active model: its runtime worker, the local inference API, and what they measure.

``Serving`` owns the ``ModelWorker`` of the model ``current`` points at and swaps it
when the installer activates another. Every inference (API or smoke test) is counted;
the health report carries the count, errors and latency p50/p95 (of a rolling window)
of the active model since it was activated, so a rollout compares models, not uptimes.
``LocalApi`` is a small HTTP server bound to 127.0.0.1 (stdlib: the agent stays light):

    GET  /v1/models                         what is loaded
    GET  /metrics                           Prometheus (agent.metrics)
    POST /v1/models/{name}/infer            ONNX: {"inputs": {name: nested list}}
    POST /v2/models/{name}/infer            ONNX, KServe v2 (JSON or binary tensors)
    POST /v1/completions                    GGUF, OpenAI-compatible ("stream": true: SSE)
    POST /v1/chat/completions               GGUF, OpenAI-compatible ("stream": true: SSE)
    POST /v1/embeddings                     encoders (GGUF, ONNX), OpenAI-compatible
"""

import base64
import hmac
import itertools
import json
import logging
import math
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager, suppress
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent import kserve
from agent.metrics import AgentMetrics
from agent.runtime import BadRequest, ModelWorker, Replaced, RuntimeCrashed
from agent.update.installer import META_FILE, SMOKE_FILE, run_smoke_test
from shared import smoke
from shared.targets import TargetInfo

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024
#: request bodies for models with dynamic input sizes (a fixed-size model's cap follows
#: its inputs: their bytes, or 24 characters a value as JSON)
MAX_DYNAMIC_BODY = {"binary": 256 << 20, "json": 64 << 20}
MAX_EMBED_INPUTS = 2048  # texts in one embeddings request, as OpenAI's API takes
_INFER = re.compile(r"^/v1/models/([^/]+)/infer$")
_INFER_V2 = re.compile(r"^/v2/models/([^/]+)/infer$")


def read_meta(model_dir: Path) -> TargetInfo:
    """The staged model's signed description (``installer.META_FILE``)."""
    return TargetInfo.model_validate_json((model_dir / META_FILE).read_bytes())


class ComeBack(Exception):
    """The request cannot be served now: answered ``status`` with ``Retry-After``."""

    status = 503

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Busy(ComeBack):
    """The model is busy and its queue full: come back in ``retry_after`` seconds."""

    status = 429

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the model is busy: {retry_after} s until a place is likely free",
                         retry_after)


class Loading(ComeBack):
    """The model is being loaded (it replaced the one before it): come back in
    ``retry_after`` seconds."""

    def __init__(self, meta: TargetInfo, retry_after: int) -> None:
        super().__init__(f"{meta.model} {meta.version} is loading; try again in "
                         f"{retry_after} s", retry_after)


class Serving:
    """The loaded model and its counters (thread-safe)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 metrics: AgentMetrics | None = None,
                 worker: type[ModelWorker] = ModelWorker,
                 memory_limit: int | None = None, max_queue: int = 4,
                 parallel: int | None = 1) -> None:
        self._clock = clock
        #: ONNX calls the worker answers at once (None: one per CPU; agent.runtime)
        self._parallel = parallel
        #: requests that may wait for the busy model; one more is refused (Busy)
        self.max_queue = max_queue
        self._in_flight = 0
        self._worker = worker
        self._memory_limit = memory_limit  # each worker's hard limit (agent.limits)
        self.metrics = metrics or AgentMetrics()
        self._lock = threading.Lock()
        self.worker: ModelWorker | None = None
        self.meta: TargetInfo | None = None
        #: the model being loaded in place of a stopped one (requests meanwhile: 503)
        self.loading: TargetInfo | None = None
        self.load_seconds = 0.0
        self.count = 0
        self.errors = 0
        self._latencies: deque[float] = deque(maxlen=1000)
        #: the input shapes the running worker has answered (see _cold)
        self._warm: tuple[Any, set[Any]] = (None, set())
        # probes (agent.probes): the active model's smoke test, counted apart
        self._probe_test: dict[str, Any] | None = None
        self._probe_next = 0
        self.probes = self.probe_errors = 0
        self._probe_latencies: deque[float] = deque(maxlen=1000)

    def activate(self, model_dir: Path | None, *, replace: bool = False) -> None:
        """Load the model in ``model_dir`` (None: serve nothing); raise if it cannot load.
        The running model serves until the new one is loaded, unless ``replace``: then it
        is stopped first, to make room (requests fail until the new one is up)."""
        new = meta = test = None
        if model_dir is not None:
            meta = read_meta(model_dir)
            if (model_dir / SMOKE_FILE).exists():
                test = smoke.decode((model_dir / SMOKE_FILE).read_bytes())
        if replace:
            self._unload(loading=meta)
        try:
            if model_dir is not None and meta is not None:
                started = self._clock()
                new = self._worker(next(model_dir.glob("model.*")), meta.runtime_format,
                                   memory_limit=self._memory_limit, parallel=self._parallel)
                new.start()
                self.load_seconds = self._clock() - started
                self.metrics.load_seconds.labels(meta.model, meta.version).set(
                    self.load_seconds)
        finally:
            self.loading = None
        with self._lock:  # the figures in health reports are the active model's own
            old, self.worker, self.meta = self.worker, new, meta
            self.count = self.errors = self.probes = self.probe_errors = 0
            self._latencies.clear()
            self._probe_latencies.clear()
            self._probe_test, self._probe_next = test, 0
        if old is not None:
            old.stop()

    def _unload(self, *, loading: TargetInfo | None = None) -> None:
        with self._lock:
            old, self.worker, self.loading = self.worker, None, loading
            if loading is not None:
                self.meta = None
        if old is not None:
            old.stop()

    def call(self, op: str, **args: Any) -> Any:
        with self._admitted():
            return self._call(op, **args)

    def _call(self, op: str, **args: Any) -> Any:
        """A counted call that does not queue: the agent's own (smoke tests). One that
        found its model replaced before it started asks the model that replaced it."""
        while True:
            worker = self._active()
            try:
                with self._counted(cold=self._cold(worker, args.get("inputs"))):
                    return worker.call(op, **args)
            except Replaced:
                continue

    def _cold(self, worker: ModelWorker, inputs: dict[str, Any] | None) -> bool:
        """True for a worker's first call with these input shapes: onnxruntime sizes its
        memory on it (a 384-row batch ran 2.3x its later runs alone, 2.7x on a busy box),
        a cost the long-running baseline a canary is compared with paid long ago."""
        if inputs is None:
            return False
        shapes = frozenset((name, _shape(value)) for name, value in inputs.items())
        with self._lock:
            started, seen = self._warm
            if started != (worker, worker.crashes):  # a new worker, or one restarted
                started, seen = self._warm = (worker, worker.crashes), set()
            if shapes in seen:
                return False
            if len(seen) < 256:
                seen.add(shapes)
            return True

    def generate(self, op: str, *, client: Any = None, **args: Any) -> Any:
        """A completion (``complete`` or ``chat``), counted with the tokens it made;
        cancelled where it is if ``client``, the request's socket, closes first."""
        started = self._clock()
        out = self.call(op, client=client, **args)
        self._generated((out.get("usage") or {}).get("completion_tokens") or 0, started)
        return out

    def stream(self, op: str, **args: Any) -> Generator[Any, None, None]:
        """``op``'s chunks as the worker makes them; counted as one request (its latency:
        to the last chunk), with its time to the first token and its tokens (a chunk
        each). Closing it early cancels the generation, counted as served."""
        started, tokens, meta = self._clock(), 0, self.meta
        try:
            with self._admitted(), self._counted():
                for n, chunk in enumerate(self._chunks(op, args)):
                    if n == 0 and meta:
                        self.metrics.first_token.labels(meta.model, meta.version).observe(
                            self._clock() - started)
                    tokens += _has_text(chunk)
                    yield chunk
        finally:
            self._generated(tokens, started)

    def _chunks(self, op: str, args: dict[str, Any]) -> Iterator[Any]:
        """The active worker's stream; asked again of the model that replaced it if the
        worker was stopped before the stream began."""
        while True:
            worker = self._active()
            try:
                yield from worker.stream(op, **args)
            except Replaced:
                continue
            return

    def _generated(self, tokens: int, started: float) -> None:
        meta = self.meta
        if meta and tokens:
            self.metrics.tokens.labels(meta.model, meta.version).inc(tokens)
            self.metrics.generation_seconds.labels(meta.model, meta.version).inc(
                self._clock() - started)

    def collect(self) -> None:
        """Set the gauges read at scrape time (the worker's memory)."""
        meta, rss = self.meta, self.worker_rss()
        self.metrics.worker_rss.clear()
        if meta and rss is not None:
            self.metrics.worker_rss.labels(meta.model, meta.version).set(rss)

    def client_error(self) -> None:
        """Count a request refused as its client's fault (never the model's)."""
        meta = self.meta or self.loading
        labels = (meta.model, meta.version) if meta else ("none", "none")
        self.metrics.client_errors.labels(*labels).inc()

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        """A place among the requests for the model: the ones it runs (one, or the ONNX
        worker's ``parallel``) and ``max_queue`` waiting behind them; Busy past that,
        with when to come back."""
        worker = self.worker
        running = worker.parallel if worker is not None else 1
        with self._lock:
            if self._in_flight >= running + self.max_queue:
                p50 = sorted(self._latencies)[len(self._latencies) // 2] \
                    if self._latencies else 1000.0
                self.metrics.refused.inc()
                raise Busy(max(1, math.ceil(self._in_flight / running * p50 / 1000)))
            self._in_flight += 1
            self.metrics.queued.set(max(0, self._in_flight - running))
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self.metrics.queued.set(max(0, self._in_flight - running))

    def _active(self) -> ModelWorker:
        worker = self.worker
        if worker is None:
            self.not_loading()
            raise LookupError("no model is active")
        return worker

    @contextmanager
    def _counted(self, *, cold: bool = False) -> Iterator[None]:
        """Count a request, its latency and its failure (bad requests are not failures of
        the model). A ``cold`` call's latency is left out of the figures rollouts judge
        (it stays in the histogram)."""
        meta = self.meta
        labels = (meta.model, meta.version) if meta else ("none", "none")
        m = self.metrics
        started = self._clock()
        try:
            yield
        except (BadRequest, Replaced):
            raise  # the client's fault, or not run: not the model's
        except GeneratorExit:
            pass  # a stream its client left: what it served counts, not as an error
        except Exception:
            with self._lock:
                self.count += 1
                self.errors += 1
            m.inferences.labels(*labels).inc()
            m.errors.labels(*labels).inc()
            raise
        elapsed = self._clock() - started
        with self._lock:
            self.count += 1
            if not cold:
                self._latencies.append(elapsed * 1000)
        m.inferences.labels(*labels).inc()
        m.latency.labels(*labels).observe(elapsed)

    def smoke_test(self, model_dir: Path) -> str | None:
        meta = read_meta(model_dir)
        test = model_dir / SMOKE_FILE
        if not test.exists():
            return None  # a version pushed without one has nothing to check
        try:
            return run_smoke_test(self._call, meta.format,
                                  smoke.decode(test.read_bytes()), self._clock)
        except (BadRequest, RuntimeCrashed, RuntimeError, ValueError) as exc:
            return f"the smoke test could not run: {exc}"

    def probe(self) -> float | None:
        """Run the next input of the active model's smoke test (its signed sample inputs)
        as a probe: counted apart from application traffic, an error if it raises or its
        answer is off. Returns the CPU seconds the worker spent (None: not measurable);
        raises ``LookupError`` if there is nothing to probe."""
        worker, meta, test = self.worker, self.meta, self._probe_test
        if worker is None or meta is None or not test or not test.get("inputs"):
            raise LookupError("the active model has no smoke test to probe with")
        n = self._probe_next % len(test["inputs"])
        self._probe_next += 1
        one = {**test, "inputs": [test["inputs"][n]], "expected": [test["expected"][n]],
               "latency_budget_ms": math.inf}  # latency is measured, not judged, here
        cpu = _cpu_seconds(worker.pid)
        started = self._clock()
        try:
            failed = run_smoke_test(worker.call, meta.format, one, self._clock) is not None
        except (BadRequest, RuntimeCrashed, RuntimeError, ValueError):
            failed = True
        elapsed_ms = (self._clock() - started) * 1000
        after = _cpu_seconds(worker.pid)
        with self._lock:
            self.probes += 1
            self.probe_errors += failed
            if not failed:
                self._probe_latencies.append(elapsed_ms)
        return after - cpu if cpu is not None and after is not None else None

    def probation(self, seconds: float, stop: threading.Event) -> str | None:
        """Watch the live model for ``seconds``: a crash or an error rate over a half fails."""
        start = self.mark()
        stop.wait(seconds)
        return self.verdict(start)

    def mark(self) -> tuple[int, int, int]:
        """Counters to judge a period by (requests, errors, runtime crashes)."""
        return self.count, self.errors, self.worker.crashes if self.worker else 0

    def verdict(self, start: tuple[int, int, int]) -> str | None:
        """Why the period since ``start`` was bad, or None."""
        calls, errors, crashes = (now - then for now, then in zip(self.mark(), start,
                                                                  strict=True))
        if crashes > 0:
            return "the runtime crashed during probation"
        if calls and errors / calls > 0.5:
            return f"{errors} of {calls} requests failed during probation"
        return None

    def body_cap(self, *, binary: bool) -> int:
        """The largest request body the active model's inputs can need."""
        worker = self.worker
        declared = kserve.declared_bytes(worker.description.get("inputs", {})) \
            if worker is not None else None
        if declared is None:
            return MAX_DYNAMIC_BODY["binary" if binary else "json"] if worker else MAX_BODY
        return max(MAX_BODY, (declared if binary else 24 * declared) + (1 << 20))

    def health(self) -> dict[str, Any]:
        with self._lock:
            ordered, probed = sorted(self._latencies), sorted(self._probe_latencies)
        meta = self.meta
        return {"inference_count": self.count, "error_count": self.errors,
                "latency_p50_ms": _quantile(ordered, 0.5),
                "latency_p95_ms": _quantile(ordered, 0.95),
                "probe_count": self.probes, "probe_error_count": self.probe_errors,
                "probe_latency_p95_ms": _quantile(probed, 0.95),
                "active_model": meta.ref if meta else None, "model_rss_bytes": self.worker_rss()}

    def not_loading(self) -> None:
        """Raise Loading while a model loads in place of the one it replaced."""
        loading = self.loading
        if loading is not None:
            raise Loading(loading, self.retry_after_loading())

    def retry_after_loading(self) -> int:
        """Seconds until a loading model is likely up: its last load took as long."""
        return max(1, math.ceil(self.load_seconds or 5.0))

    def worker_rss(self) -> int | None:
        """Resident memory of the model worker process (None: none is running)."""
        worker = self.worker
        pid = worker.pid if worker is not None else None
        if pid is None:
            return None
        import psutil

        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return None


def _shape(value: Any) -> tuple[Any, ...]:
    """An input's shape: the binary API's (dtype, shape, bytes), or nested JSON lists'."""
    if isinstance(value, tuple):
        return (value[0], *value[1])
    shape: list[Any] = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return tuple(shape)


def _has_text(chunk: Any) -> int:
    """1 if a streamed completion or chat chunk carries generated text (a token)."""
    try:
        choice = chunk["choices"][0]
    except (KeyError, IndexError, TypeError):
        return 0
    return int(bool(choice.get("text") or (choice.get("delta") or {}).get("content")))


def _quantile(ordered: list[float], q: float) -> float | None:
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None


def _cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) a process has used so far."""
    if pid is None:
        return None
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


class LocalApi:
    """The local inference API on ``host:port`` (127.0.0.1 unless configured); with a
    ``token``, every request must carry it as ``Authorization: Bearer`` (agent.localauth)."""

    def __init__(self, serving: Serving, host: str, port: int, *,
                 token: str | None = None) -> None:
        handler = type("Handler", (_Handler,), {"serving": serving, "token": token})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="local-api",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_OPENAI = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
_MODEL = re.compile(r"^/v1/models/([^/]+)$")
_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                 404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
                 500: "server_error", 503: "server_error"}


def _openai_error(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "error"),
                      "param": None, "code": None}}


def _error(openai: bool, status: int, message: str) -> dict[str, Any]:
    """An error body: OpenAI's shape on its routes, ``{"error": message}`` elsewhere
    (KServe's)."""
    return _openai_error(status, message) if openai else {"error": message}


def _check_model(body: dict[str, Any], meta: TargetInfo) -> None:
    """LookupError if an OpenAI request names a model other than the one served."""
    if body.get("model") not in (None, meta.model):
        raise LookupError(f"model {body['model']!r} is not served here; this box serves "
                          f"{meta.model!r}")


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's sampling settings from an OpenAI request; BadRequest names a bad one."""
    out: dict[str, Any] = {}
    for key, kind, default in (("max_tokens", int, 16), ("temperature", float, 0.0),
                               ("top_p", float, None), ("seed", int, None)):
        value = body.get(key)
        if value is None:  # absent or null: the default
            value = default
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                kind is int and not isinstance(value, int)):
            raise BadRequest(f"{key} must be {'an integer' if kind is int else 'a number'}, "
                             f"not {json.dumps(value)}")
        out[key] = kind(value)
    if out["max_tokens"] < 1:
        raise BadRequest("max_tokens must be at least 1")
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("stop must be a string or a list of strings")
        out["stop"] = stop
    return out


class _Handler(BaseHTTPRequestHandler):
    serving: Serving
    token: str | None
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    # buffered: a response's headers and body go out in one write where they fit 8 KiB
    # (a small model's JSON answer, in paired blocks: 0.005-0.06 ms sooner of 0.35-0.45)
    wbufsize = -1

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def _authorized(self) -> bool:
        """True if no token is asked for or the request carries it; else answers 401."""
        if self.token is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                              self.token.encode()):
            return True
        length = self.headers.get("Content-Length") or "0"
        if length.isdigit() and int(length) <= MAX_BODY:
            self.rfile.read(int(length))  # so the connection can carry the next request
        else:
            self.close_connection = True
        self._send(401, _error(self.path in _OPENAI or self.path.startswith("/v1/"), 401,
                               "this API needs 'Authorization: Bearer <token>': the token is "
                               "in the agent's inference_token_file"),
                   {"WWW-Authenticate": "Bearer"})
        return False

    def do_GET(self) -> None:
        if not self._authorized():
            return None
        if self.path == "/metrics":
            self.serving.collect()
            data = generate_latest(self.serving.metrics.registry)
            return self._send_bytes(200, data, CONTENT_TYPE_LATEST, {})
        meta = self.serving.meta
        models = [] if not meta else [{
            "id": meta.model, "object": "model", "created": 0, "owned_by": "edgefleet",
            "version": meta.version, "variant": meta.variant, "format": meta.format,
            "quantization": meta.quantization}]
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": models})
        match = _MODEL.match(self.path)
        if match:
            found = [m for m in models if m["id"] == match.group(1)]
            if found:
                return self._send(200, found[0])
            return self._send(404, _openai_error(404, f"model {match.group(1)!r} is not "
                                                 "served here"))
        return self._send(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        if self._authorized():
            self._post()

    def _post(self) -> None:
        openai = self.path in _OPENAI
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._send(400, _error(openai, 400, "Content-Length is not a number"))
        binary = self.headers.get(kserve.HEADER) is not None
        cap = self.serving.body_cap(binary=binary)
        if length > cap:
            return self._send(413, _error(openai, 413, f"request body over {cap} bytes"))
        raw = self.rfile.read(length)
        if _INFER_V2.match(self.path):
            return self._infer_v2(raw)
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            return self._send(400, _error(openai, 400, f"invalid JSON: {exc}"))
        if not isinstance(body, dict):
            return self._send(400, _error(openai, 400, "the body must be a JSON object"))
        headers = {}
        try:
            status, out = self._route(body)
        except ComeBack as exc:
            status, out = exc.status, _error(openai, exc.status, str(exc))
            headers = {"Retry-After": str(exc.retry_after)}
        except BadRequest as exc:
            status, out = 400, _error(openai, 400, str(exc))
        except LookupError as exc:
            status, out = 404, _error(openai, 404, str(exc))
        except (RuntimeCrashed, RuntimeError) as exc:
            status, out = 500, _error(openai, 500, str(exc))
        if status:  # 0: a stream, already answered
            with suppress(BrokenPipeError, ConnectionResetError):  # the client left
                self._send(status, out, headers)
        return None

    def _route(self, body: dict[str, Any]) -> tuple[int, Any]:
        self.serving.not_loading()
        meta = self.serving.meta
        match = _INFER.match(self.path)
        if match:
            meta = self._onnx_model(match.group(1))
            inputs = body.get("inputs")
            if not isinstance(inputs, dict):
                raise BadRequest('the body must be {"inputs": {name: values}}')
            return 200, {"model": meta.model, "version": meta.version,
                         "outputs": self.serving.call("infer", inputs=inputs)}
        if self.path == "/v1/embeddings":
            return 200, self._embeddings(body)
        if self.path in ("/v1/completions", "/v1/chat/completions"):
            if not meta or meta.format != "gguf":
                raise LookupError("no GGUF model is loaded")
            _check_model(body, meta)
            if body.get("n") not in (None, 1):
                raise BadRequest("n must be 1: one completion per request (send n requests)")
            if self.path == "/v1/completions":
                if not isinstance(body.get("prompt"), str):
                    raise BadRequest('the body must have a "prompt" string')
                op, args = "complete", {"prompt": body["prompt"]}
            else:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages or not all(
                        isinstance(m, dict) and isinstance(m.get("role"), str)
                        and isinstance(m.get("content"), str) for m in messages):
                    raise BadRequest('messages must be a list of {"role": ..., "content": '
                                     '...} objects with string values')
                op, args = "chat", {"messages": body["messages"]}
            args |= _sampling(body)
            if body.get("stream") is True:
                self._sse(meta, self.serving.stream(op, **args))
                return 0, None
            out = self.serving.generate(op, client=self.connection, **args)
            return 200, out | {"model": meta.model}
        raise LookupError(f"no route {self.path}")

    def _embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        """OpenAI's embeddings of an encoder (GGUF, or an ONNX sentence encoder):
        ``input`` a string or a list of them."""
        meta = self.serving.meta
        if not meta:
            raise LookupError("no model is loaded")
        _check_model(body, meta)
        if not meta.runtime_format.endswith("-embed"):
            raise BadRequest(f"{meta.model} is not an embedding model (a {meta.format} "
                             "model that " + ("generates text: use /v1/completions)"
                                              if meta.format == "gguf" else
                                              "takes tensors: use /v2/models/{name}/infer)"))
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(
                isinstance(t, str) and t for t in texts):
            raise BadRequest("input must be a non-empty string or a list of them (token "
                             "ids are not taken)")
        if len(texts) > MAX_EMBED_INPUTS:
            raise BadRequest(f"input has {len(texts)} texts; at most {MAX_EMBED_INPUTS} a "
                             "request")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise BadRequest('encoding_format must be "float" or "base64"')
        asked = body.get("dimensions")
        if asked is not None and (type(asked) is not int or asked < 1):
            raise BadRequest("dimensions must be a positive integer")
        out = self.serving.call("embeddings", texts=texts)
        data, dim = out["vectors"], out["dimension"]  # little-endian float32s
        if asked is not None and asked != dim:
            raise BadRequest(f"{meta.model}'s embeddings have {dim} dimensions; it cannot "
                             f"give {asked} (shortening them needs a model trained for it)")
        size = 4 * dim
        if encoding == "float":
            flat = list(struct.unpack(f"<{len(data) // 4}f", data))
            vectors: list[Any] = [flat[i:i + dim] for i in range(0, len(flat), dim)]
        else:
            vectors = [base64.b64encode(data[i:i + size]).decode()
                       for i in range(0, len(data), size)]
        return {"object": "list", "model": meta.model,
                "data": [{"object": "embedding", "index": i, "embedding": v}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": out["tokens"], "total_tokens": out["tokens"]}}

    def _sse(self, meta: TargetInfo, chunks: Generator[dict[str, Any], None, None]) -> None:
        """Server-sent events, a chunk each, then ``data: [DONE]``. The first chunk is
        waited for before answering, so an error before it still gets its status (and
        one after it is sent as an error event); a client that goes away closes
        ``chunks``, which stops the generation."""
        try:
            first = next(chunks, None)
        except BaseException:
            chunks.close()
            raise
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in itertools.chain([first] if first is not None else [], chunks):
                self._event(chunk | {"model": meta.model})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left
        except (RuntimeCrashed, RuntimeError, BadRequest) as exc:
            with suppress(OSError):
                self._event(_openai_error(500, str(exc)))
        finally:
            chunks.close()

    def _event(self, data: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()

    def _onnx_model(self, name: str) -> TargetInfo:
        """The active model's description if it is the ONNX model ``name``."""
        meta = self.serving.meta
        if not meta or name != meta.model:
            raise LookupError(f"model {name!r} is not loaded")
        if meta.format != "onnx":
            raise BadRequest("this is a GGUF model: use /v1/completions")
        return meta

    def _infer_v2(self, raw: bytes) -> None:
        match = _INFER_V2.match(self.path)
        assert match is not None  # noqa: S101 - routed here by it
        try:
            self.serving.not_loading()
            meta = self._onnx_model(match.group(1))
            request = kserve.parse(raw, self.headers.get(kserve.HEADER))
            outputs = self.serving.call("infer_raw", inputs=request.inputs)
            data, header = kserve.response(meta.model, meta.version, outputs,
                                           binary=request.binary_outputs,
                                           request_id=request.id)
        except ComeBack as exc:
            return self._send(exc.status, {"error": str(exc)},
                              {"Retry-After": str(exc.retry_after)})
        except (kserve.ProtocolError, BadRequest) as exc:
            return self._send(400, {"error": str(exc)})
        except LookupError as exc:
            return self._send(404, {"error": str(exc)})
        except (RuntimeCrashed, RuntimeError) as exc:
            return self._send(500, {"error": str(exc)})
        extra = {} if header is None else {kserve.HEADER: str(header)}
        content_type = "application/json" if header is None else "application/octet-stream"
        return self._send_bytes(200, data, content_type, extra)

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(body).encode(), "application/json", headers or {})

    def _send_bytes(self, status: int, data: bytes, content_type: str,
                    headers: dict[str, str]) -> None:
        if 400 <= status < 500 and self.command == "POST":
            self.serving.client_error()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()  # here, where a client that left is expected
