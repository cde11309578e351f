"""The agent's OpenAI-compatible API (GGUF models, ONNX sentence encoders), through the
real `openai` client."""

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for
from tests.integration.test_delivery import enrolled_agent, http, pin, push
from tests.models import llama_cpp, tiny_gguf
from tests.support import corpus


@pytest.fixture
def client(start_controller, spawn, tmp_path: Path):
    llama_cpp()
    controller = start_controller()
    push(controller, tmp_path, "tiny-llama", "0.1.0", tiny_gguf(tmp_path / "t.gguf"), "t.gguf")
    device_id, local, _agent = enrolled_agent(controller, spawn, tmp_path)
    assert pin(controller, device_id, "tiny-llama@0.1.0")["state"] == "committed"
    return openai.OpenAI(base_url=f"{local}/v1", api_key="unused", max_retries=0), local


def test_streamed_completions_are_the_same_text_as_unstreamed_in_several_chunks(
        client) -> None:
    api, local = client
    whole = api.completions.create(model="tiny-llama", prompt="The quick", max_tokens=12,
                                   temperature=0, seed=1)
    chunks = list(api.completions.create(model="tiny-llama", prompt="The quick",
                                         max_tokens=12, temperature=0, seed=1, stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert whole.model == "tiny-llama"  # as the fleet names it, not a path on the box
    assert {c.model for c in chunks} == {"tiny-llama"}
    raw = urllib.request.Request(f"{local}/v1/completions", headers={  # noqa: S310
        "Content-Type": "application/json"}, data=json.dumps(
            {"prompt": "The quick", "max_tokens": 4, "stream": True}).encode())
    with urllib.request.urlopen(raw, timeout=60) as resp:  # noqa: S310
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Connection"] == "close"  # no length: the close ends it
        assert resp.read().endswith(b"data: [DONE]\n\n")


def test_streamed_chat_is_the_same_text_as_unstreamed_in_several_chunks(client) -> None:
    api, _local = client
    messages = [{"role": "user", "content": "hello"}]
    whole = api.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=12,
                                        temperature=0, seed=1)
    chunks = list(api.chat.completions.create(model="tiny-llama", messages=messages,
                                              max_tokens=12, temperature=0, seed=1,
                                              stream=True))
    assert len(chunks) >= 2
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content


def test_a_client_that_leaves_a_stream_leaves_the_model_serving(client) -> None:
    """The generation it left is cancelled in the worker, and nothing of it reaches the
    next request."""
    api, _local = client
    before = api.completions.create(model="tiny-llama", prompt="The quick", max_tokens=4,
                                    temperature=0)
    stream = api.completions.create(model="tiny-llama", prompt="Once upon", max_tokens=200,
                                    temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    after = api.completions.create(model="tiny-llama", prompt="The quick", max_tokens=4,
                                   temperature=0)
    assert after.choices[0].text == before.choices[0].text


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_a_client_that_leaves_before_its_completion_ends_cancels_the_generation(
        client, chat: bool) -> None:
    """Not streamed: the agent sees the socket close while the model generates, and
    stops it there instead of making the tokens nobody will read."""
    api, local = client
    most = 400  # the context is 512 tokens
    asked: dict[str, Any] = {"model": "tiny-llama", "max_tokens": most, "temperature": 0}
    if chat:
        # (the tiny model's chat of this, greedy, runs to max_tokens; most end sooner)
        asked["messages"] = [{"role": "user", "content": "Tell me a story"}]
        whole = api.chat.completions.create(**asked)
        text = whole.choices[0].message.content
    else:
        asked["prompt"] = "The quick"
        whole = api.completions.create(**asked)
        text = whole.choices[0].text
    assert whole.usage.completion_tokens == most  # left alone, it makes them all
    before = _samples(local, model="tiny-llama")
    body = json.dumps(asked).encode()
    path = b"/v1/chat/completions" if chat else b"/v1/completions"
    where = urlsplit(local)
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (path, len(body), body))
    after = wait_for(lambda: (m := _samples(local, model="tiny-llama"))[
        "edgefleet_agent_inferences_total"] > before["edgefleet_agent_inferences_total"] and m,
        60, "the left request to end")
    made = after.get("edgefleet_agent_generated_tokens_total", 0) - before[
        "edgefleet_agent_generated_tokens_total"]
    assert made < most / 2, made
    assert not after.get("edgefleet_agent_inference_errors_total")
    if chat:  # nothing of it left behind
        assert api.chat.completions.create(**asked).choices[0].message.content == text
    else:
        assert api.completions.create(**asked).choices[0].text == text


def test_bad_requests_are_4xx_in_openais_shape_and_not_counted_against_the_model(
        client) -> None:
    api, local = client
    for body in ({"prompt": "x", "max_tokens": "lots"}, {"prompt": "x", "max_tokens": 0},
                 {"prompt": "x", "max_tokens": None, "temperature": "hot"},
                 {"prompt": "x", "stop": 3}, {"prompt": "x", "seed": 1.5}):
        status, out = http("POST", f"{local}/v1/completions", body)
        assert status == 400, (body, out)
        assert out["error"]["type"] == "invalid_request_error", out
    with pytest.raises(openai.NotFoundError, match="'gpt-4' is not served here"):
        api.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        api.completions.create(model="tiny-llama", prompt="x", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="messages must be a list"):
        api.chat.completions.create(model="tiny-llama", messages=["hi"], max_tokens=2)
    for stream in (False, True):  # a prompt over the context (512 tokens)
        with pytest.raises(openai.BadRequestError, match="exceed context window"):
            list(api.completions.create(model="tiny-llama", prompt="word " * 600,
                                        max_tokens=2, stream=stream) or [])
    metrics = _samples(local)
    assert not metrics.get("edgefleet_agent_inference_errors_total")  # what gates read
    # 5 bad bodies, the unknown model, n=2, bad messages, and the prompt over the
    # context twice: each counted as the client's
    assert metrics["edgefleet_agent_client_errors_total"] == 10


def test_metrics_say_per_model_load_time_memory_first_token_and_tokens(client) -> None:
    api, local = client
    whole = api.completions.create(model="tiny-llama", prompt="The quick", max_tokens=8,
                                   temperature=0)
    streamed = list(api.completions.create(model="tiny-llama", prompt="The quick",
                                           max_tokens=8, temperature=0, stream=True))
    metrics = _samples(local, model="tiny-llama")
    assert metrics["edgefleet_agent_time_to_first_token_seconds_count"] == 1  # the stream
    assert metrics["edgefleet_agent_generated_tokens_total"] == whole.usage.completion_tokens + sum(
        bool(c.choices[0].text) for c in streamed)
    assert metrics["edgefleet_agent_generation_seconds_total"] > 0
    assert 0 < metrics["edgefleet_agent_model_load_seconds"] < 120
    assert metrics["edgefleet_agent_model_worker_rss_bytes"] > 10 << 20


def test_models_are_listed_and_retrieved_as_openai_names_them(client) -> None:
    api, _local = client
    assert [m.id for m in api.models.list()] == ["tiny-llama"]
    model = api.models.retrieve("tiny-llama")
    assert (model.id, model.object, model.owned_by) == ("tiny-llama", "model", "edgefleet")
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4")


def _samples(local: str, **labels: str) -> dict[str, float]:
    """The agent's Prometheus samples (summed over the others' labels), as Prometheus's
    own parser reads them."""
    with urllib.request.urlopen(f"{local}/metrics", timeout=10) as resp:  # noqa: S310
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def test_embeddings_of_an_encoder_gguf_have_its_dimension_and_repeat_exactly(
        start_controller, spawn, tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 (trained weights), converted by llama.cpp's own converter."""
    llama_cpp()
    entry = corpus.build("minilm_gguf")
    controller = start_controller()
    push(controller, tmp_path, "minilm", "1.0.0", entry.path.read_bytes(), entry.path.name,
         derive=False)
    device_id, local, _agent = enrolled_agent(controller, spawn, tmp_path)
    assert pin(controller, device_id, "minilm@1.0.0")["state"] == "committed"
    api = openai.OpenAI(base_url=f"{local}/v1", api_key="unused", max_retries=0)
    texts = ["The cat sat on the mat.", "The cat sat on the mat.", "Stock prices fell."]
    # the client asks for base64 (and decodes it) unless told which
    for asked in ({"encoding_format": "float"}, {}):
        out = api.embeddings.create(model="minilm", input=texts, **asked)
        vectors = np.array([d.embedding for d in out.data])
        assert vectors.shape == (3, 384)
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        assert unit[0] @ unit[1] == pytest.approx(1.0, abs=1e-6)
        assert unit[0] @ unit[2] < 0.9
        assert out.usage.prompt_tokens > 0
    (one,) = api.embeddings.create(model="minilm", input=texts[0]).data
    np.testing.assert_allclose(one.embedding, vectors[0], rtol=1e-5)
    with pytest.raises(openai.BadRequestError, match="input must be"):
        api.embeddings.create(model="minilm", input=[])
    with pytest.raises(openai.NotFoundError):
        api.embeddings.create(model="gpt-4", input="x")


def test_an_onnx_sentence_encoder_embeds_as_sentence_transformers_pools_it(
        start_controller, spawn, tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 exported with a vector per token, its tokenizer, mean pooling and
    normalization declared in the file from its sentence-transformers config: through the
    openai client the device gives the embeddings torch gives with that pooling on the
    same weights, a batch of texts of different lengths what each gives alone, and a text
    over the declared 256 tokens a 400 that is not the model's error."""
    torch = corpus.torch_mod()
    entry = corpus.build("minilm_tokens")
    controller = start_controller()
    smoke = {"inputs": [{k: v.tolist() for k, v in entry.samples[0].items()}]}
    shown = push(controller, tmp_path, "minilm", "1.0.0", entry.path.read_bytes(),
                 entry.path.name, derive=False, smoke_test=smoke)
    assert shown["variants"][0]["requirements"]["onnx_embedding"] == {
        "pooling": "mean", "normalize": True, "max_tokens": 256, "dimension": 384}
    device_id, local, _agent = enrolled_agent(controller, spawn, tmp_path)
    assert pin(controller, device_id, "minilm@1.0.0")["state"] == "committed"
    api = openai.OpenAI(base_url=f"{local}/v1", api_key="unused", max_retries=0)
    texts = [corpus.SENTENCES[0], "Stock prices fell.", corpus.SENTENCES[0],
             " ".join(corpus.SENTENCES[:6])]
    out = api.embeddings.create(model="minilm", input=texts)
    vectors = np.array([d.embedding for d in out.data])

    _dir, tokenizer, bert = corpus._minilm_parts()
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        hidden = bert(**enc)[0]
        mask = enc["attention_mask"].unsqueeze(-1).float()
        want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert vectors.shape == (4, 384)
    assert np.min(np.sum(vectors * want.numpy(), axis=1)) > 0.9999
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert vectors[0] @ vectors[2] == pytest.approx(1.0, abs=1e-6)
    assert out.usage.prompt_tokens == int(enc["attention_mask"].sum())
    for text, batched in zip(texts, vectors, strict=True):
        (alone,) = api.embeddings.create(model="minilm", input=text).data
        np.testing.assert_allclose(alone.embedding, batched, atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="over the model's limit of 256"):
        api.embeddings.create(model="minilm", input=" ".join(corpus.SENTENCES * 4))
    assert len(api.embeddings.create(model="minilm", input="x", dimensions=384).data[0]
               .embedding) == 384
    with pytest.raises(openai.BadRequestError, match="have 384 dimensions; it cannot give 256"):
        api.embeddings.create(model="minilm", input="x", dimensions=256)
    metrics = _samples(local, model="minilm")
    assert not metrics.get("edgefleet_agent_inference_errors_total")
    assert metrics["edgefleet_agent_client_errors_total"] == 2


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_phi3", "tiny_gemma"])
def test_qwen2_phi3_and_gemma_ggufs_are_served_as_llama_cpp_runs_them(
        start_controller, spawn, tmp_path: Path, name: str) -> None:
    """Small models of each architecture, trained here and converted by llama.cpp's own
    converter, pushed with their derived variants (so the registry built and signed
    them), installed on a real agent and asked through the openai client: the same
    greedy text as llama-cpp-python on the same file, streamed or not."""
    llama = llama_cpp()
    entry = corpus.build(name)
    controller = start_controller()
    shown = push(controller, tmp_path, corpus.ref(entry), "1.0.0", entry.path.read_bytes(),
                 entry.path.name, smoke_test={"inputs": list(entry.prompts)},
                 text=entry.text)
    assert shown["status"] == "ready", shown
    assert {v["name"] for v in shown["variants"]} == {"source", "q8_0", "q4_k_m"}
    device_id, local, _agent = enrolled_agent(controller, spawn, tmp_path)
    ref = corpus.ref(entry)
    assert pin(controller, device_id, f"{ref}@1.0.0")["state"] == "committed"
    api = openai.OpenAI(base_url=f"{local}/v1", api_key="unused", max_retries=0)
    bare = llama.Llama(model_path=str(entry.path), n_ctx=512, n_threads=2, seed=0,
                       verbose=False)
    for prompt in entry.prompts[:3]:
        want = bare.create_completion(prompt, max_tokens=16, temperature=0)
        whole = api.completions.create(model=ref, prompt=prompt, max_tokens=16, temperature=0)
        chunks = list(api.completions.create(model=ref, prompt=prompt, max_tokens=16,
                                             temperature=0, stream=True))
        assert whole.choices[0].text == want["choices"][0]["text"]
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
        assert whole.usage.completion_tokens == want["usage"]["completion_tokens"]
