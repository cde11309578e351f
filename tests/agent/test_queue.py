"""The local API's bounded queue: the model answers one request at a time, a few wait,
and one more is told to come back (429 with Retry-After), as the openai client expects."""

import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from agent.serving import LocalApi, Serving
from tests import models
from tests.conftest import wait_for


class HeldWorker:
    """A model worker (our own interface) whose completions wait until released."""

    def __init__(self, path: Path, fmt: str, **_options: Any) -> None:
        self.release = threading.Event()
        self.started = 0
        self.description: dict[str, Any] = {}
        self.pid = None
        self.parallel = 1
        HeldWorker.last = self

    def start(self) -> None:
        pass

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.started += 1
        assert self.release.wait(30)
        return {"id": "c", "object": "text_completion", "created": 0, "model": "x",
                "choices": [{"text": "ok", "index": 0, "finish_reason": "stop",
                             "logprobs": None}]}

    def stop(self) -> None:
        self.release.set()


def staged(model_dir: Path, version: str = "1.0.0") -> Path:
    """A staged GGUF model ``llm`` (an empty file: the workers here are fakes)."""
    return models.staged(model_dir, b"", model="llm", version=version, fmt="gguf",
                         quantization="q8_0", variant="q8_0")


@pytest.fixture
def api(tmp_path: Path):
    staged(tmp_path)
    serving = Serving(worker=HeldWorker, max_queue=1)  # type: ignore[arg-type]
    serving.activate(tmp_path)
    local = LocalApi(serving, "127.0.0.1", 0)
    local.start()
    yield serving, f"http://127.0.0.1:{local.port}"
    serving.activate(None)
    local.stop()


def test_a_full_queue_answers_429_with_retry_after_and_the_queued_are_served(api) -> None:
    serving, base = api
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    answers: list[str] = []

    def ask() -> None:
        answers.append(client.completions.create(model="llm", prompt="x").choices[0].text)

    running = threading.Thread(target=ask)
    running.start()
    wait_for(lambda: HeldWorker.last.started == 1, 10, "the first request to run")
    waiting = threading.Thread(target=ask)
    waiting.start()
    wait_for(lambda: serving._in_flight == 2, 10, "the second request to wait")
    with pytest.raises(openai.RateLimitError, match="the model is busy"):
        client.completions.create(model="llm", prompt="x")
    request = urllib.request.Request(f"{base}/v1/completions",  # noqa: S310
                                     data=b'{"prompt": "x"}',
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)  # noqa: S310
    assert refused.value.code == 429
    assert int(refused.value.headers["Retry-After"]) >= 1
    HeldWorker.last.release.set()
    running.join(30)
    waiting.join(30)
    assert answers == ["ok", "ok"]
    assert serving.metrics.registry.get_sample_value("edgefleet_agent_requests_refused_total") \
        == 2
    assert serving.count == 2  # the refused are not requests the model answered


class SlowLoadingWorker(HeldWorker):
    """A worker (our own interface) whose load waits until ``loaded`` is set."""

    loaded = threading.Event()

    def start(self) -> None:
        assert SlowLoadingWorker.loaded.wait(30)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.release.set()
        return super().call(op, **args)


def test_while_a_model_loads_in_place_of_another_requests_get_503_with_retry_after(
        tmp_path: Path) -> None:
    staged(tmp_path, "2.0.0")
    serving = Serving(worker=SlowLoadingWorker)  # type: ignore[arg-type]
    SlowLoadingWorker.loaded.set()
    serving.activate(tmp_path)
    local = LocalApi(serving, "127.0.0.1", 0)
    local.start()
    base = f"http://127.0.0.1:{local.port}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    SlowLoadingWorker.loaded.clear()
    replacing = threading.Thread(target=serving.activate, args=(tmp_path,),
                                 kwargs={"replace": True})
    replacing.start()
    try:
        wait_for(lambda: serving.loading is not None, 10, "the new model to be loading")
        with pytest.raises(openai.InternalServerError, match=r"llm 2\.0\.0 is loading") as got:
            client.completions.create(model="llm", prompt="x")
        assert got.value.status_code == 503
        assert int(got.value.response.headers["Retry-After"]) >= 1
        SlowLoadingWorker.loaded.set()
        replacing.join(10)
        assert client.completions.create(model="llm", prompt="x").choices[0].text == "ok"
    finally:
        SlowLoadingWorker.loaded.set()
        serving.activate(None)
        local.stop()
