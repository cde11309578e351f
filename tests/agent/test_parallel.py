"""ONNX calls that run at once in one model worker (``onnx_parallel``): each gets its own
answer, four at once do more work in the same time than four in a row, and a worker
that dies under several calls is reported once and started again."""

import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.runtime import ModelWorker, RuntimeCrashed
from agent.serving import LocalApi, Serving
from tests.conftest import wait_for
from tests.models import recurrent_onnx, staged

PARALLEL = 2


def serve(tmp_path: Path, model: bytes, *, name: str = "gru", parallel: int = PARALLEL):
    """``model`` staged as ``name`` and served on a local API: (serving, api, file)."""
    model_dir = staged(tmp_path / f"{name}-{parallel}", model, model=name)
    serving = Serving(parallel=parallel)
    serving.activate(model_dir)
    api = LocalApi(serving, "127.0.0.1", 0)
    api.start()
    return serving, api, model_dir / "model.onnx"


def infer(port: int, x: np.ndarray, model: str = "gru", name: str = "x") -> np.ndarray:
    """One KServe v2 binary request (inputs over 64 KiB reach the worker through shared
    memory, a buffer per pipe); the first output."""
    head = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", f"/v2/models/{model}/infer", head + x.tobytes(),
                 {"Content-Type": "application/octet-stream",
                  "Inference-Header-Content-Length": str(len(head))})
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200, body
    size = int(resp.getheader("Inference-Header-Content-Length"))
    return np.frombuffer(body[size:], dtype=np.float32)


def test_calls_at_once_each_get_the_answer_to_their_own_input(tmp_path: Path) -> None:
    serving, api, path = serve(tmp_path, recurrent_onnx(400))
    bare = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [np.random.default_rng(i).standard_normal((400, 1, 64)).astype(np.float32)
              for i in range(12)]
    got: dict[int, np.ndarray] = {}

    def ask(indices: list[int]) -> None:
        for i in indices:
            got[i] = infer(api.port, inputs[i])

    try:
        threads = [threading.Thread(target=ask, args=(list(range(k, 12, 4)),))
                   for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(got) == list(range(12))
        for i, x in enumerate(inputs):
            np.testing.assert_allclose(got[i], bare.run(None, {"x": x})[0].ravel(), rtol=1e-5)
    finally:
        api.stop()
        serving.activate(None)


def ratio(call: Callable[[], object], n: int) -> float:
    """Throughput of ``n`` calls four at a time over ``n`` one at a time."""
    started = time.perf_counter()
    for _ in range(n):
        call()
    one_at_a_time = time.perf_counter() - started
    threads = [threading.Thread(target=lambda: [call() for _ in range(n // 4)])
               for _ in range(4)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return one_at_a_time / (time.perf_counter() - started)


@pytest.mark.skipif((os.cpu_count() or 1) < PARALLEL, reason="needs 2 cores")
def test_four_requests_at_once_have_the_throughput_the_cores_give(tmp_path: Path) -> None:
    """At least 1.6x one at a time on 2 cores, or what threads on bare onnxruntime get
    on this box in the same run (its two vCPUs gave those 1.3-2.0x from one minute to
    the next), within 20%."""
    serving, api, path = serve(tmp_path, recurrent_onnx(4000))
    x = np.random.default_rng(0).standard_normal((4000, 1, 64)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    bare = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    try:
        infer(api.port, x)
        bare.run(None, {"x": x})
        trials = [(ratio(lambda: infer(api.port, x), 12),
                   ratio(lambda: bare.run(None, {"x": x}), 12))
                  for _ in range(3)]  # the best of three: a busy moment is not the code
        agent, cores = max(t[0] for t in trials), max(t[1] for t in trials)
        print(f"4 at once over one at a time: agent {agent:.2f}x, bare {cores:.2f}x")
        assert agent >= min(1.6, 0.8 * cores), trials
        assert agent > 1.2, trials
        assert serving.health()["inference_count"] == 1 + 3 * 2 * 12
    finally:
        api.stop()
        serving.activate(None)


def test_a_worker_killed_under_several_calls_is_reported_once_and_started_again(
        tmp_path: Path) -> None:
    path = tmp_path / "gru.onnx"
    path.write_bytes(recurrent_onnx(40000))  # about 100 ms a call
    worker = ModelWorker(path, "onnx", parallel=PARALLEL)
    worker.start()
    x = np.zeros((40000, 1, 64), dtype=np.float32)
    raw = {"x": ("float32", list(x.shape), x.tobytes())}
    outcomes: list[str] = []
    busy = threading.Semaphore(0)

    def call() -> None:
        busy.release()
        try:
            worker.call("infer_raw", inputs=raw)
            outcomes.append("answered")
        except RuntimeCrashed as exc:
            outcomes.append(str(exc))

    try:
        threads = [threading.Thread(target=call) for _ in range(PARALLEL)]
        for t in threads:
            t.start()
        for _ in threads:
            assert busy.acquire(timeout=10)
        pid = worker.pid
        assert pid is not None
        wait_for(lambda: not worker._free, 10, "both calls to be in the worker")
        os.kill(pid, signal.SIGKILL)
        for t in threads:
            t.join(30)
        assert outcomes == ["the model runtime died (exit code -9)"] * PARALLEL
        assert worker.crashes == 1
        assert worker.call("infer_raw", inputs=raw)["h"][1] == [1, 1, 128]
        assert worker.pid != pid
    finally:
        worker.stop()


def test_requests_in_flight_when_the_model_is_swapped_finish_and_waiting_ones_go_to_the_new(
        tmp_path: Path) -> None:
    """The old worker lets its calls finish before it stops, a request still waiting for
    it is served by the new one, none fails, and no worker of the old model is left."""
    import psutil

    gru = recurrent_onnx(40000)  # about 100 ms a call
    slow = staged(tmp_path / "v1", gru, model="gru")
    new = staged(tmp_path / "v2", gru, model="gru", version="2.0.0")
    serving = Serving()  # one call at a time: the second request waits for the first
    serving.activate(slow)
    old = serving.worker
    assert old is not None
    old_pid = old.pid
    x = np.zeros((40000, 1, 64), dtype=np.float32)
    raw = {"x": ("float32", list(x.shape), x.tobytes())}
    answers: list[object] = []

    def ask() -> None:
        try:
            answers.append(serving.call("infer_raw", inputs=raw)["h"][1])
        except Exception as exc:  # noqa: BLE001 - the test reports any failure
            answers.append(exc)

    try:
        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: serving._in_flight == 2 and not old._free, 10,
                 "one request in the worker and one waiting")
        serving.activate(new)  # loads v2, then stops v1 once its call is done
        for t in threads:
            t.join(60)
        assert answers == [[1, 1, 128], [1, 1, 128]]
        assert serving.health()["error_count"] == 0
        assert old_pid is not None
        assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == \
            psutil.STATUS_ZOMBIE
        assert old.pid is None
    finally:
        serving.activate(None)
