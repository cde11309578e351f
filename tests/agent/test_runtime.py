"""The model worker: real onnxruntime in a child process; bad input and crashes. The
in-process worker the fleet benchmark uses answers the same."""

import os
import signal
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.runtime import BadRequest, InProcessWorker, ModelWorker, RuntimeCrashed
from tests.models import ENCODER_TABLE, ENCODER_WORDS, staged, tiny_encoder, tiny_onnx


@pytest.fixture(params=[ModelWorker, InProcessWorker])
def any_worker(request, tmp_path: Path):
    path = tmp_path / "model.onnx"
    path.write_bytes(tiny_onnx())
    w = request.param(path, "onnx")
    w.start()
    yield w
    w.stop()


@pytest.fixture
def worker(tmp_path: Path):
    path = tmp_path / "model.onnx"
    path.write_bytes(tiny_onnx())
    w = ModelWorker(path, "onnx")
    w.start()
    yield w
    w.stop()


def test_outputs_match_onnxruntime_run_directly(any_worker, tmp_path) -> None:
    x = np.random.default_rng(2).standard_normal((1, 128)).astype(np.float32)
    out = any_worker.call("infer", inputs={"x": x.tolist()})
    (want,) = ort.InferenceSession(str(tmp_path / "model.onnx")).run(["y"], {"x": x})
    np.testing.assert_allclose(np.asarray(out["y"], dtype=np.float32), want, rtol=1e-6)


@pytest.mark.parametrize(("inputs", "message"), [
    ({"image": [[0.0] * 128]}, "the model takes ['x']"),
    ({"x": [[0.0] * 3]}, "shape [1, 3] does not fit [1, 128]"),
    ({"x": [["a"] * 128]}, "x: not float32 values"),
])
def test_bad_input_is_a_clear_bad_request(any_worker, inputs, message) -> None:
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        any_worker.call("infer", inputs=inputs)


def test_a_crashed_runtime_is_reported_and_the_next_request_gets_a_new_one(worker) -> None:
    first = worker.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    with pytest.raises(RuntimeCrashed, match="the model runtime died"):
        worker.call("infer", inputs={"x": [[0.0] * 128]})
    assert worker.crashes == 1
    out = worker.call("infer", inputs={"x": [[0.0] * 128]})
    assert len(out["y"][0]) == 10
    assert worker.pid not in (None, first)


@pytest.mark.parametrize("kind", [ModelWorker, InProcessWorker])
def test_a_file_that_is_not_a_model_fails_to_load_with_the_reason(kind, tmp_path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(RuntimeCrashed, match="cannot load the model"):
        kind(bad, "onnx").start()


def test_probation_fails_when_the_runtime_crashes_or_most_requests_fail(tmp_path) -> None:
    import threading

    from agent.serving import Serving

    model_dir = staged(tmp_path / "m", tiny_onnx(), model="mlp")
    serving, stop = Serving(), threading.Event()
    serving.activate(model_dir)
    try:
        assert serving.probation(0.0, stop) is None  # nothing went wrong
        start = serving.mark()
        os.kill(serving.worker.pid, signal.SIGKILL)  # type: ignore[union-attr, arg-type]
        with pytest.raises(RuntimeCrashed):
            serving.call("infer", inputs={"x": [[0.0] * 128]})
        assert serving.verdict(start) == "the runtime crashed during probation"
        assert serving.health()["error_count"] == 1
        start = serving.mark()
        serving.call("infer", inputs={"x": [[0.0] * 128]})  # a new worker answers
        assert serving.verdict(start) is None
        for _ in range(2):
            with pytest.raises(RuntimeError):
                serving.call("no_such_op")  # the runtime fails the request
        assert serving.verdict(start) == "2 of 3 requests failed during probation"
    finally:
        serving.activate(None)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_an_onnx_sentence_encoder_embeds_a_batch_as_its_file_declares(tmp_path, pooling) -> None:
    """Tokenized by the tokenizer the file carries, pooled as it declares, normalised; a
    batch padded to its longest text gives what each text alone gives."""
    from controller.registry.inspect import prepare_upload
    from shared import encoder

    source = tiny_encoder(tmp_path / "st", pooling=pooling)
    path = tmp_path / "encoder.onnx"
    prepare_upload(source, path, metadata=encoder.from_sentence_transformers(tmp_path / "st"))
    texts = ["the cat sat on the mat", "dog", "the dog ran far away"]  # "away" is unknown
    w = ModelWorker(path, "onnx-embed")
    w.start()
    try:
        out = w.call("embeddings", texts=texts)
        alone = [np.frombuffer(w.call("embeddings", texts=[t])["vectors"], "<f4")
                 for t in texts]
        with pytest.raises(BadRequest, match="input 1 has 9 tokens, over the model's limit of 8"):
            w.call("embeddings", texts=["cat", " ".join(["cat"] * 9)])
    finally:
        w.stop()
    want = []
    for text in texts:
        rows = ENCODER_TABLE[[ENCODER_WORDS.index(t) + 2 if t in ENCODER_WORDS else 1
                              for t in text.split()]]
        v = {"mean": rows.mean(0), "cls": rows[0], "max": rows.max(0)}[pooling]
        want.append(v / np.linalg.norm(v))
    assert out["dimension"] == 4
    np.testing.assert_allclose(np.frombuffer(out["vectors"], "<f4").reshape(3, 4), want,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(alone, want, rtol=1e-6, atol=1e-7)
    assert out["tokens"] == 6 + 1 + 5
