"""The registry on the corpus of real-world model shapes (``tests.support.corpus``).

Every model registers and its source is deployable; every derived variant is either
offered with fidelity figures measured on the pusher's samples, or refused with a
reason; no version fails because a derivation did. One controller (embedded defaults)
serves the whole module: the decisions here are the derive worker's, and the database
side of the same code is covered on both databases in ``test_push``.
"""

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.registry import measure
from controller.registry.derive import SLOWER
from controller.runtime import Runtime
from tests.conftest import Backend
from tests.controller.registry.test_push import ready
from tests.support import corpus

CORPUS = list(corpus.BUILDERS)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    settings = Backend("embedded", None, None).settings(
        tmp_path_factory.mktemp("corpus") / "data", max_upload_bytes=256 << 20)
    with TestClient(create_app(settings, runtime=Runtime(settings))) as c:
        token = (settings.data_dir / "admin-token").read_text().strip()
        c.headers["Authorization"] = f"Bearer {token}"
        yield c


def upload(client: TestClient, data: bytes, **params: str) -> dict:
    r = client.post("/api/v1/uploads", params=params, content=data,
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return r.json()


push = corpus.push


@pytest.mark.parametrize("name", CORPUS)
def test_every_corpus_model_registers_and_each_variant_is_offered_or_refused(
        client, tmp_path, name) -> None:
    entry = corpus.build(name)
    gguf = entry.path.suffix == ".gguf"
    # ask for every ONNX variant; an fp16 source and GGUF sources get their defaults
    defaults = gguf or name == "fp16"
    wanted = {"q8_0", "q4_k_m"} if gguf else set() if name == "fp16" else {"int8", "fp16"}
    r = push(client, entry, "1.0.0", tmp_path,
             **({} if defaults else {"variants": sorted(wanted)}))
    assert r.status_code == 201, r.text
    shown = ready(client, r.json()["name"], "1.0.0")
    assert (shown["status"], shown["deployable"], shown["job"]["state"]) == (
        "ready", True, "succeeded"), shown["job"]
    source, *derived = shown["variants"]
    assert source["signed"]
    assert source["smoke_test_bytes"] > 0
    assert source["comparison"]["metric"] == entry.metric
    assert source["comparison"]["inputs"] == len(entry.samples or entry.prompts)
    assert source["ram_measured"]  # a process that ran the samples (prompts, for GGUF)
    if entry.architecture:
        assert source["requirements"]["gguf_architecture"] == entry.architecture
    if entry.text:  # a language model: perplexity on the pusher's text, source and variants
        assert source["comparison"]["perplexity"]["text"] == "given"
        assert 1.0 < source["comparison"]["perplexity"]["perplexity"] < 768  # its vocabulary
    assert {v["name"] for v in derived} | {r["name"] for r in shown["refused"]} == wanted
    for v in derived:
        c = v["comparison"]
        assert v["signed"]
        # an encoder's variants keep its tokenizer and pooling (the device reads them)
        assert v["requirements"].get("onnx_embedding") == source["requirements"].get(
            "onnx_embedding")
        assert c["metric"] == entry.metric
        assert 0.0 <= c["fidelity"][entry.metric] <= 1.0
        assert c["size_ratio"] < 1.0
        assert v["ram_measured"]
        if entry.text:
            assert 0.0 < c["fidelity"]["perplexity"] <= 1.0
            assert c["perplexity"]["tokens"] > 1000
        if v["name"] == "int8":
            assert c["int8_ops"]
            ms = c["latency_ms"]
            assert ms["variant"] <= SLOWER * ms["source"]  # a slower one is refused
            if ms["variant"] > ms["source"]:
                assert c["warning"].startswith("no faster than the source")
    for refused in shown["refused"]:
        assert len(refused["reason"]) > 10, refused


def test_minilm_gguf_q8_0_embeds_at_cosine_0_99_of_f16_through_llama_cpp(
        client, tmp_path) -> None:
    entry = corpus.build("minilm_gguf")
    assert len(entry.prompts) >= 50
    r = push(client, entry, "2.0.0", tmp_path, variants=["q8_0"], min_fidelity="cosine>=0.99")
    assert r.status_code == 201, r.text
    assert r.json()["variants"][0]["requirements"] == {
        "runtime": "llama.cpp", "gguf_architecture": "bert", "gguf_embedding": True}
    shown = ready(client, "minilm-gguf", "2.0.0")
    assert shown["refused"] == []
    (q8,) = (v for v in shown["variants"] if v["name"] == "q8_0")
    assert q8["comparison"]["fidelity"]["cosine"] >= 0.99
    assert q8["comparison"]["inputs"] == len(entry.prompts)
    assert q8["size"] < 0.6 * shown["variants"][0]["size"]


def test_minilm_int8_is_a_quarter_of_the_size_at_cosine_0_99_on_real_sentences(
        client, tmp_path) -> None:
    entry = corpus.build("minilm")
    assert len(entry.samples) >= 50
    r = push(client, entry, "2.0.0", tmp_path, min_fidelity="cosine>=0.99")
    assert r.status_code == 201, r.text
    shown = ready(client, "minilm", "2.0.0")
    variants = {v["name"]: v for v in shown["variants"]}
    assert shown["refused"] == []
    c = variants["int8"]["comparison"]
    assert c["size_ratio"] <= 0.30
    assert c["fidelity"]["cosine"] >= 0.99
    assert c["inputs"] == len(entry.samples)
    # the measured memory replaces the size-based guess, and int8 needs less
    assert variants["int8"]["ram_estimate_bytes"] < variants["source"]["ram_estimate_bytes"]


def test_a_conv_net_gets_static_int8_no_slower_and_never_a_slower_dynamic_one(
        client, tmp_path) -> None:
    entry = corpus.build("convnet")
    r = push(client, entry, "2.0.0", tmp_path, variants=["int8", "int8_dynamic"])
    assert r.status_code == 201, r.text
    shown = ready(client, "convnet", "2.0.0")
    (int8,) = (v for v in shown["variants"] if v["name"] == "int8")
    c = int8["comparison"]
    assert c["method"] == "static"
    assert "QuantizeLinear" in c["int8_ops"]
    assert c["latency_ms"]["variant"] <= c["latency_ms"]["source"]
    assert c["fidelity"]["top1"] >= 0.9
    (dynamic,) = shown["refused"]
    assert dynamic["name"] == "int8_dynamic"
    assert "slower than the source" in dynamic["reason"]
    ms = dynamic["comparison"]["latency_ms"]
    assert ms["variant"] > ms["source"]


def test_a_variant_below_the_quality_floor_is_refused_before_it_is_signed(
        client, tmp_path) -> None:
    entry = corpus.build("minilm")
    r = push(client, entry, "3.0.0", tmp_path, variants=["int8"],
             min_fidelity="cosine>=0.9999")
    assert r.status_code == 201, r.text
    shown = ready(client, "minilm", "3.0.0")
    assert [v["name"] for v in shown["variants"]] == ["source"]
    (refused,) = shown["refused"]
    assert "below the version's floor of 0.9999" in refused["reason"]
    assert 0.99 <= refused["comparison"]["fidelity"]["cosine"] < 0.9999
    targets = client.app.state.runtime.trust.targets()
    assert "models/minilm/3.0.0/int8.onnx" not in targets
    assert "models/minilm/3.0.0/source.onnx" in targets


def test_a_stateful_model_needs_its_inputs_declared_and_runs_on_the_declarations(
        client, tmp_path) -> None:
    entry = corpus.build("gru")
    model = upload(client, entry.path.read_bytes(), filename="gru.onnx")
    refused = client.post("/api/v1/models/gru-declared/versions/1.0.0",
                          json={"upload": model["sha256"]})
    assert refused.status_code == 422
    problem = refused.json()
    assert problem["code"] == "inputs_needed"
    for what in ("frames: [1,?,64] has dynamic dimensions", "sr: int64 values",
                 "state: looks like a recurrent state"):
        assert what in problem["detail"]
    r = push(client, entry, "2.0.0", tmp_path, inputs=entry.declared, metric="cosine")
    assert r.status_code == 201, r.text
    shown = ready(client, "gru", "2.0.0")
    assert shown["status"] == "ready"
    assert shown["smoke_test"]["generated_inputs"]


def test_a_model_with_external_data_is_refused_as_an_upload_with_what_to_do(client) -> None:
    entry = corpus.build("external_data")
    r = client.post("/api/v1/uploads", params={"filename": entry.path.name},
                    content=entry.path.read_bytes(),
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 422
    assert "external data files (external.onnx.data)" in r.json()["detail"]
    assert "edgefleet model push" in r.json()["detail"]


def test_derivation_leaves_no_file_in_the_controllers_working_directory(client) -> None:
    # onnxruntime's pre-processing writes sym_shape_infer_temp.onnx and *.data files into
    # the working directory; the derive worker runs in the job's own directory
    assert not [p.name for p in Path.cwd().iterdir()
                if p.suffix == ".data" or p.name.startswith("sym_shape_infer")]


def test_perplexity_is_what_torch_computes_from_the_model_it_was_converted_from(
        tmp_path) -> None:
    """llama.cpp on the converted f16 GGUF (the registry's measure) against the Hugging
    Face model before conversion, on the same tokens of text neither trained on."""
    torch = corpus.torch_mod()
    import sentencepiece
    import transformers

    entry = corpus.build("tiny_qwen2")
    hf = entry.path.parent / "hf"
    text = entry.text[:700]
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    ids = [1, *tokenizer.encode(text)]
    assert 100 < len(ids) <= 512  # one window of the context
    (tmp_path / "text.txt").write_text(text)
    got = measure.perplexity(entry.path, tmp_path / "text.txt")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert got["tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(float(torch.exp(loss)), rel=0.01)


def test_a_text_is_refused_for_a_model_that_is_not_a_language_model(client, tmp_path) -> None:
    for name in ("minilm", "minilm_gguf"):
        r = push(client, corpus.build(name), "9.0.0", tmp_path, text="Some text.")
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "invalid_text"
        assert "for GGUF language models" in r.json()["detail"]
