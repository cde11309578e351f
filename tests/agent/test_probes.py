"""Probes: paced to their interval and their CPU share, counted apart from traffic."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.probes import Prober, pause
from agent.serving import Serving
from agent.update.installer import META_FILE, SMOKE_FILE
from shared import smoke
from shared.messages import Probe
from shared.targets import TargetInfo
from tests.conftest import wait_for
from tests.models import tiny_onnx

UNTIL = datetime(2030, 1, 1, tzinfo=UTC)


def probe(interval_s: float = 1.0, share: float = 0.1) -> Probe:
    return Probe(rollout="r", interval_s=interval_s, max_cpu_share=share, until=UNTIL)


@pytest.mark.parametrize(("elapsed", "cpu", "cpus", "want"), [
    (0.01, 0.01, 1, 0.99),  # a cheap probe: the interval decides
    (0.5, 0.5, 1, 4.5),  # 0.5 s of one core at 10%: the next starts 5 s after this one
    (0.5, 1.0, 4, 2.0),  # two threads on a 4-core box: 1 s of CPU in 2.5 s is 10% of 4
    (0.5, None, 2, 2.0),  # CPU unknown: taken as one core for the whole time
    (2.0, 0.0, 1, 0.0),  # slower than the interval and no CPU: no wait
])
def test_pause_keeps_probes_to_their_interval_and_cpu_share(elapsed, cpu, cpus, want) -> None:
    assert pause(probe(), elapsed, cpu, cpus) == pytest.approx(want)


def test_probes_use_at_most_their_cpu_share_whatever_they_cost() -> None:
    """Simulated time: each probe costs 0.3 s of CPU on one of 2 cores, at a 5% share."""
    p = probe(interval_s=0.1, share=0.05)
    t = cpu = 0.0
    for _ in range(100):
        t += 0.3
        cpu += 0.3
        t += pause(p, 0.3, 0.3, 2)
    assert cpu / (t * 2) <= 0.05 + 1e-9


def staged(tmp_path: Path) -> Path:
    """A real ONNX model staged as the installer leaves it, with its smoke test."""
    import numpy as np
    import onnxruntime as ort

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes(tiny_onnx(hidden=16, inputs=4, classes=3))
    (model_dir / META_FILE).write_text(TargetInfo(
        model="m", version="1", variant="source", format="onnx", quantization="fp32",
        ram_estimate_bytes=1 << 20).model_dump_json())
    x = np.ones((1, 4), dtype=np.float32)
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    out = session.run(None, {"x": x})
    names = [o.name for o in session.get_outputs()]
    (model_dir / SMOKE_FILE).write_bytes(smoke.encode({
        "inputs": [{"x": x.tolist()}], "expected": [dict(zip(names, (o.tolist() for o in out),
                                                             strict=True))],
        "tolerance": 1e-4, "latency_budget_ms": 5000}))
    return model_dir


def test_a_prober_runs_the_smoke_inputs_counted_apart_and_stops_when_it_expires(
        tmp_path: Path) -> None:
    serving = Serving()
    serving.activate(staged(tmp_path))
    asked = [probe(interval_s=0.05, share=1.0)]
    reads: list[int] = []

    def settings() -> Probe:
        reads.append(serving.health()["probe_count"])
        return asked[0]

    prober = Prober(serving, settings)
    prober.start()
    try:
        wait_for(lambda: serving.health()["probe_count"] >= 5, 60, "five probes")
        asked[0] = probe(interval_s=0.05, share=1.0).model_copy(
            update={"until": datetime.now(UTC) - timedelta(seconds=1)})  # expired
        since = len(reads)
        wait_for(lambda: len(reads) >= since + 3, 60, "the prober to look again, twice")
        health = serving.health()
    finally:
        prober.stop()
        serving.activate(None)
    # the look that found it expired, and every look after it, saw the same count
    assert len(set(reads[since + 1:])) == 1, reads[since:]
    assert (health["probe_count"] >= 5, health["probe_error_count"]) == (True, 0)
    assert health["probe_latency_p95_ms"] is not None
    assert (health["inference_count"], health["error_count"]) == (0, 0)  # traffic is apart


def test_a_probe_whose_answer_is_off_counts_as_a_probe_error(tmp_path: Path) -> None:
    model_dir = staged(tmp_path)
    test = smoke.decode((model_dir / SMOKE_FILE).read_bytes())
    test["expected"] = [{k: [[v + 1 for v in row] for row in rows]
                         for k, rows in e.items()} for e in test["expected"]]
    (model_dir / SMOKE_FILE).write_bytes(smoke.encode(test))
    serving = Serving()
    serving.activate(model_dir)
    try:
        serving.probe()
        serving.probe()
        counted = (serving.probes, serving.probe_errors)
    finally:
        serving.activate(None)
    assert counted == (2, 2)


class _TimedWorker:
    """A stand-in for ``ModelWorker`` whose calls take what ``costs`` says, on ``clock``."""

    parallel, crashes, description, pid = 1, 0, {}, None

    def __init__(self, *_args: object, clock: list[float], costs: dict[tuple[int, ...], float],
                 **_kwargs: object) -> None:
        self.clock, self.costs = clock, costs

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def call(self, op: str, inputs: dict[str, list[list[float]]]) -> dict[str, object]:
        rows = inputs["x"]
        self.clock[0] += self.costs.pop((len(rows), len(rows[0])), 0.1)
        return {}


def test_a_workers_first_call_with_a_shape_is_counted_but_kept_out_of_its_latency(
        tmp_path: Path) -> None:
    """onnxruntime sizes its memory on a shape's first run; a canary just loaded would
    otherwise be judged on that against a baseline that paid it long ago."""
    clock = [0.0]
    costs = {(384, 4): 2.0, (1, 4): 3.0}  # each shape's first call is slow, later 0.1 s
    serving = Serving(clock=lambda: clock[0], worker=lambda *a, **k: _TimedWorker(
        *a, clock=clock, costs=costs, **k))
    serving.activate(staged(tmp_path))
    big, one = {"x": [[0.0] * 4] * 384}, {"x": [[0.0] * 4]}
    for inputs in [big] * 10 + [one] * 2:
        serving.call("infer", inputs=inputs)
    health = serving.health()
    assert (health["inference_count"], health["error_count"]) == (12, 0)
    assert health["latency_p95_ms"] == pytest.approx(100)
    serving.worker.crashes += 1  # restarted: its memory is new, so is the next call's
    costs[(384, 4)] = 4.0
    serving.call("infer", inputs=big)
    assert serving.health()["latency_p95_ms"] == pytest.approx(100)
    serving.call("infer", inputs=big)
    costs[(384, 4)] = 4.0
    serving.call("infer", inputs=big)  # not cold: a slow call counts
    assert serving.health()["latency_p95_ms"] == pytest.approx(4000)
