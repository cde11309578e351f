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
from shared.targets import TargetInfo
from tests.conftest import wait_for


class HeldWorker:
    """A model worker (our own interface) whose completions wait until released."""

    def __init__(self, path: Path, fmt: str, *, memory_limit: int | None = None) -> None:
        self.release = threading.Event()
        self.started = 0
        self.description: dict[str, Any] = {}
        self.pid = None
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


@pytest.fixture
def api(tmp_path: Path):
    (tmp_path / "model.gguf").write_bytes(b"")
    (tmp_path / "meta.json").write_text(TargetInfo(
        model="llm", version="1.0.0", variant="q8_0", format="gguf",
        quantization="q8_0").model_dump_json())
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
