"""Pushing model versions through the API: validation, limits, nothing left behind."""

import hashlib
import itertools
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from controller.api.app import create_app
from controller.db.engine import make_engine, session_factory
from controller.db.models import Model, ModelVersion, Variant
from controller.runtime import Runtime
from controller.settings import Settings
from shared.smoke import SmokeRef, decode
from tests.conftest import Backend, wait_for
from tests.controller.registry.test_trust import download, updater
from tests.models import llama_cpp, tiny_gguf, tiny_onnx

CAP = 4 << 20


@pytest.fixture
def settings(backend: Backend, tmp_path: Path) -> Settings:
    return backend.settings(tmp_path / "data", max_upload_bytes=CAP)


@pytest.fixture
def client(settings: Settings):
    with TestClient(create_app(settings, runtime=Runtime(settings))) as c:
        token = (settings.data_dir / "admin-token").read_text().strip()
        c.headers["Authorization"] = f"Bearer {token}"
        yield c


def push(client: TestClient, name: str, version: str, data: bytes, filename: str, **body):
    """Upload, then register: the two requests of a push. Returns the first refusal."""
    up = client.post("/api/v1/uploads", params={"filename": filename}, content=data,
                     headers={"Content-Type": "application/octet-stream"})
    if up.status_code != 201:
        return up
    return client.post(f"/api/v1/models/{name}/versions/{version}",
                       json={"upload": up.json()["sha256"], **body})


def ready(client: TestClient, name: str, version: str) -> dict:
    """The version once its background job has finished (ready or failed)."""
    def done() -> dict | None:
        v = client.get(f"/api/v1/models/{name}/versions/{version}").json()
        return v if v["status"] != "processing" else None
    return wait_for(done, 120, f"the job of {name}@{version}")


def smoke_of(client: TestClient, target: str) -> dict:
    """The smoke test a variant's signed target pins (a signed target of its own)."""
    runtime = client.app.state.runtime
    targets = runtime.trust.targets()
    ref = SmokeRef.of(targets[target].custom)
    assert ref is not None
    assert targets[ref.target].hashes["sha256"] == ref.sha256
    return decode(runtime.blobs.path(ref.sha256).read_bytes())


def state(settings: Settings) -> dict:
    """Everything a refused push must leave as it was: rows, blobs, TUF metadata."""
    engine = make_engine(settings.db_url)
    with session_factory(engine)() as s:
        rows = {m.__name__: s.scalar(select(func.count()).select_from(m))
                for m in (Model, ModelVersion, Variant)}
    engine.dispose()
    blobs = sorted(p.name for p in (settings.data_dir / "blobs" / "sha256").glob("*/*"))
    tmp = sorted(p.name for p in (settings.data_dir / "blobs" / ".tmp").iterdir())
    meta = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (settings.data_dir / "tuf" / "metadata").iterdir()}
    return {"rows": rows, "blobs": blobs, "tmp": tmp, "meta": meta}


def test_a_pushed_onnx_version_is_stored_described_and_signed(client, settings) -> None:
    data = tiny_onnx()
    r = push(client, "mlp", "1.0.0", data, "mlp.onnx")
    assert r.status_code == 201, r.text
    (variant,) = r.json()["variants"]
    assert variant | {"requirements": None} == variant | {
        "name": "source", "format": "onnx", "quantization": "fp32", "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "signed": True,
        "target": "models/mlp/1.0.0/source.onnx", "requirements": None}
    assert variant["requirements"]["onnx_opset"] == 17
    assert variant["requirements"]["min_onnxruntime"] == "1.13"  # not the controller's
    target = client.app.state.runtime.trust.targets()["models/mlp/1.0.0/source.onnx"]
    assert target.custom["model"] == "mlp"
    assert target.custom["version"] == "1.0.0"
    shown = ready(client, "mlp", "1.0.0")
    measured = {"ram_estimate_bytes", "ram_measured", "comparison", "smoke_test_bytes"}
    assert ({k: v for k, v in shown["variants"][0].items() if k not in measured}
            == {k: v for k, v in variant.items() if k not in measured})
    # the source's memory is measured by running it, not guessed from its size
    assert (variant["ram_measured"], shown["variants"][0]["ram_measured"]) == (False, True)
    assert [v["version"] for v in client.get("/api/v1/models").json()] == ["1.0.0"]


def test_an_fp32_onnx_push_gets_a_signed_int8_variant_with_its_comparison(client) -> None:
    data = tiny_onnx()
    created = push(client, "mlp", "1.0.0", data, "mlp.onnx")
    assert created.json()["status"] == "processing"
    shown = ready(client, "mlp", "1.0.0")
    assert (shown["status"], shown["job"]["progress"]) == ("ready", 1.0), shown["job"]
    source, int8 = shown["variants"]
    assert (int8["name"], int8["quantization"], int8["derived_from"]) == ("int8", "int8",
                                                                          "source")
    assert int8["size"] <= 0.35 * len(data)
    c = int8["comparison"]
    assert c["size_ratio"] == pytest.approx(int8["size"] / len(data), abs=1e-3)
    assert c["metric"] == "top1"  # class scores [1, 10]
    assert c["fidelity"]["top1"] >= 0.75
    assert 0.9 < c["fidelity"]["cosine"] <= 1.0
    assert c["inputs"] == 8  # generated: no smoke test was given
    assert c["method"] in ("dynamic", "static")  # dynamic first, for a model with no conv
    assert set(c["int8_ops"]) & {"MatMulInteger", "QuantizeLinear"}
    # offered only because it is faster, measured side by side on this machine
    assert 0 < c["latency_ms"]["variant"] <= c["latency_ms"]["source"]
    assert int8["ram_measured"]
    assert int8["ram_estimate_bytes"] > int8["size"]
    assert "int8" in shown["job"]["message"]
    assert shown["refused"] == []
    assert shown["smoke_test"] == {"inputs": 4, "tolerance": 1e-3, "latency_budget_ms": 1000.0,
                                   "generated_inputs": True}
    for v in (source, int8):
        assert v["signed"]
        smoke_test = smoke_of(client, v["target"])
        assert len(smoke_test["inputs"]) == len(smoke_test["expected"]) == 4
    # each variant carries its own expected outputs, computed from it
    assert (smoke_of(client, source["target"])["expected"]
            != smoke_of(client, int8["target"])["expected"])


def test_a_given_smoke_test_is_checked_against_the_source_and_kept(client) -> None:
    x = [[0.5] * 128]
    smoke_test = {"inputs": [{"x": x}], "tolerance": 0.01, "latency_budget_ms": 50}
    push(client, "mlp", "1.0.0", tiny_onnx(), "m.onnx", smoke_test=smoke_test)
    shown = ready(client, "mlp", "1.0.0")
    assert shown["status"] == "ready"
    assert shown["smoke_test"] == {"inputs": 1, "tolerance": 0.01, "latency_budget_ms": 50,
                                   "generated_inputs": False}
    expected = smoke_of(client, "models/mlp/1.0.0/source.onnx")["expected"]
    wrong = {"inputs": [{"x": x}], "expected": [{"y": [[v + 1 for v in expected[0]["y"][0]]]}]}
    push(client, "mlp", "1.0.1", tiny_onnx(), "m.onnx", smoke_test=wrong)
    failed = ready(client, "mlp", "1.0.1")
    assert failed["status"] == "failed"
    assert "does not reproduce smoke-test output 0" in failed["job"]["message"]
    misnamed = {"inputs": [{"image": x}]}
    push(client, "mlp", "1.0.2", tiny_onnx(), "m.onnx", smoke_test=misnamed)
    assert "the model takes ['x']" in ready(client, "mlp", "1.0.2")["job"]["message"]


def test_a_job_that_runs_too_long_is_stopped_and_says_so(client) -> None:
    client.app.state.runtime.jobs.timeout_s = 0.2  # less than the worker needs to start
    push(client, "mlp", "1.0.0", tiny_onnx(), "m.onnx")
    failed = ready(client, "mlp", "1.0.0")
    assert failed["status"] == "failed"
    assert "stopped after 0.2 s" in failed["job"]["message"]
    assert [v["name"] for v in failed["variants"]] == ["source"]


def test_a_malformed_smoke_test_is_refused_before_anything_is_registered(client) -> None:
    r = push(client, "mlp", "1.0.0", tiny_onnx(), "m.onnx",
             smoke_test={"inputs": [{"x": [[1.0]]}], "expected": [], "tolerence": 1})
    assert r.status_code == 422
    assert client.get("/api/v1/models").json() == []


def test_a_gguf_version_records_architecture_and_quantization(client, tmp_path) -> None:
    r = push(client, "tiny-llama", "0.1.0", tiny_gguf(tmp_path / "t.gguf"), "t.gguf")
    assert r.status_code == 201, r.text
    variant = r.json()["variants"][0]
    assert (variant["format"], variant["quantization"]) == ("gguf", "f16")
    assert variant["requirements"]["gguf_architecture"] == "llama"


def test_an_f16_gguf_push_gets_q8_0_and_q4_k_m_that_llama_cpp_runs(client, tmp_path) -> None:
    Llama = llama_cpp().Llama  # noqa: N806 - the class
    data = tiny_gguf(tmp_path / "t.gguf")
    push(client, "tiny-llama", "0.1.0", data, "t.gguf")
    shown = ready(client, "tiny-llama", "0.1.0")
    assert shown["status"] == "ready", shown["job"]
    variants = {v["name"]: v for v in shown["variants"]}
    assert list(variants) == ["source", "q8_0", "q4_k_m"]
    runtime = client.app.state.runtime
    runtime.trust.targets()
    for name in ("q8_0", "q4_k_m"):
        v = variants[name]
        assert (v["quantization"], v["requirements"]["gguf_architecture"]) == (name, "llama")
        assert v["size"] < 0.6 * len(data)
        assert v["comparison"]["metric"] == "token_agreement"
        assert 0.0 <= v["comparison"]["fidelity"]["token_agreement"] <= 1.0
        assert v["comparison"]["inputs"] == 2
        smoke_test = smoke_of(client, v["target"])
        llm = Llama(model_path=str(runtime.blobs.path(v["sha256"])), n_ctx=128, verbose=False)
        prompt = llm.tokenize(smoke_test["inputs"][0].encode())
        generated = []
        for token in llm.generate(prompt, top_k=1, temp=0.0):
            if len(generated) == smoke_test["max_tokens"] or token == llm.token_eos():
                break
            generated.append(token)
        llm.close()
        assert generated  # it loads and generates...
        assert generated == smoke_test["expected"][0]  # ...what its smoke test expects
    assert variants["q4_k_m"]["size"] < variants["q8_0"]["size"]


def test_every_variant_downloads_verified_through_a_tuf_updater(client, tmp_path) -> None:
    llama_cpp()  # the GGUF variants need it
    push(client, "mlp", "1.0.0", tiny_onnx(), "m.onnx")
    push(client, "tiny-llama", "0.1.0", tiny_gguf(tmp_path / "t.gguf"), "t.gguf")
    versions = [ready(client, "mlp", "1.0.0"), ready(client, "tiny-llama", "0.1.0")]
    runtime = client.app.state.runtime
    up = updater(runtime.trust, runtime.blobs, tmp_path / "device")
    paths = [v["target"] for version in versions for v in version["variants"]]
    assert len(paths) == 5  # source + int8, source + q8_0 + q4_k_m
    for version in versions:
        for v in version["variants"]:
            data = download(up, v["target"])
            assert hashlib.sha256(data).hexdigest() == v["sha256"]
            custom = up.get_targetinfo(v["target"]).custom
            assert (custom["model"], custom["variant"]) == (version["name"], v["name"])
            ref = SmokeRef.of(custom)
            test = download(up, ref.target)  # verified by the updater against its own target
            assert hashlib.sha256(test).hexdigest() == ref.sha256
            assert decode(test)["expected"]


def test_a_version_a_device_runs_cannot_be_deleted(client, settings) -> None:
    from datetime import UTC, datetime

    from controller.db.models import Device

    for version in ("1.0.0", "1.1.0"):
        push(client, "mlp", version, tiny_onnx(), "m.onnx")
        ready(client, "mlp", version)
    with session_factory(client.app.state.runtime.engine)() as s:
        s.add(Device(id="cam-1", name="cam-1", labels={}, mqtt_secret_hash="0" * 64,
                     enrolled_at=datetime.now(UTC), status="online",
                     last_health={"active_model": "mlp@1.0.0"}))
        s.commit()
    r = client.delete("/api/v1/models/mlp/versions/1.0.0")
    assert (r.status_code, r.json()["code"]) == (409, "version_in_use")
    assert "cam-1" in r.json()["detail"]
    assert client.delete("/api/v1/models/mlp/versions/1.1.0").status_code == 204
    assert [v["version"] for v in client.get("/api/v1/models").json()] == ["1.0.0"]
    assert [v["version"] for v in client.get("/api/v1/models/mlp/versions").json()] == ["1.0.0"]
    assert client.get("/api/v1/models/nope/versions").status_code == 404
    signed = client.app.state.runtime.trust.targets()
    assert sorted(signed) == [  # each variant and its smoke test
        "models/mlp/1.0.0/int8.onnx", "models/mlp/1.0.0/int8.onnx.smoke.json",
        "models/mlp/1.0.0/source.onnx", "models/mlp/1.0.0/source.onnx.smoke.json"]
    assert client.delete("/api/v1/models/mlp/versions/1.1.0").status_code == 404


def test_versions_are_semantic_and_immutable(client) -> None:
    assert push(client, "mlp", "1.0.0", tiny_onnx(), "m.onnx").status_code == 201
    again = push(client, "mlp", "1.0.0", tiny_onnx(), "m.onnx")
    assert (again.status_code, again.json()["code"]) == (409, "version_exists")
    bad = push(client, "mlp", "latest", tiny_onnx(), "m.onnx")
    assert (bad.status_code, bad.json()["code"]) == (422, "invalid_version")


@pytest.mark.parametrize(("case", "status", "code"), [
    ("truncated onnx", 422, "invalid_model"),
    ("corrupt gguf", 422, "invalid_model"),
    ("mislabelled", 422, "invalid_model"),
    ("oversize", 413, "too_large"),
])
def test_a_refused_push_leaves_everything_as_it_was(client, settings, tmp_path, case, status,
                                                    code) -> None:
    assert push(client, "mlp", "1.0.0", tiny_onnx(), "m.onnx").status_code == 201
    ready(client, "mlp", "1.0.0")
    before = state(settings)
    data, filename = {
        "truncated onnx": (tiny_onnx()[:60], "m.onnx"),
        "corrupt gguf": (tiny_gguf(tmp_path / "t.gguf")[:100], "t.gguf"),
        "mislabelled": (tiny_onnx(), "m.gguf"),
        "oversize": (b"\0" * (CAP + 1), "m.onnx"),
    }[case]
    r = push(client, "mlp", "2.0.0", data, filename)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text
    assert r.json()["detail"]  # says what is wrong
    assert state(settings) == before


def test_a_refused_push_of_known_content_keeps_the_shared_blob(client, settings) -> None:
    data = tiny_onnx()
    assert push(client, "mlp", "1.0.0", data, "m.onnx").status_code == 201
    r = push(client, "mlp", "1.0.1", data, "m.gguf")  # same bytes, refused as mislabelled
    assert r.status_code == 422
    assert client.app.state.runtime.blobs.get(hashlib.sha256(data).hexdigest()) is not None


def test_a_viewer_cannot_push(client) -> None:
    viewer = client.post("/api/v1/tokens", json={"name": "v", "role": "viewer"}).json()["token"]
    r = client.post("/api/v1/models/mlp/versions/1.0.0", content=tiny_onnx(),
                    headers={"Authorization": f"Bearer {viewer}"})
    assert r.status_code == 403


def test_the_blob_collector_keeps_what_variants_use(client) -> None:
    import os
    import time

    assert push(client, "mlp", "1.0.0", tiny_onnx(), "m.onnx").status_code == 201
    runtime = client.app.state.runtime
    orphan = runtime.blobs.put_bytes(b"left by a crash")
    for sha in runtime.blobs.all():
        old = time.time() - 7200
        os.utime(runtime.blobs.path(sha), (old, old))
    assert runtime.collect_blobs() == [orphan.sha256]
    assert len(list(runtime.blobs.all())) == 1


def test_a_controller_started_after_the_timestamp_expired_re_signs_it(settings) -> None:
    from datetime import UTC, datetime, timedelta

    long_ago = datetime.now(UTC) - timedelta(days=3)
    with TestClient(create_app(settings, runtime=Runtime(settings, clock=lambda: long_ago))):
        pass  # first start, three days ago: the timestamp expired two days ago
    with TestClient(create_app(settings, runtime=Runtime(settings))) as c:
        expires = c.app.state.runtime.trust.load("timestamp").signed.expires
    assert expires > datetime.now(UTC)


@pytest.mark.parametrize(("body", "code", "says"), [
    ({"min_fidelity": "accuracy>=0.9"}, "unknown_metric", "unknown fidelity metric 'accuracy'"),
    ({"min_fidelity": "cosine=0.99"}, "invalid_floor", "is not METRIC>=VALUE"),
    ({"metric": "perplexity"}, "unknown_metric", "'perplexity' is not a fidelity metric"),
    ({"variants": ["int4"]}, "unknown_variant", "cannot have a 'int4' variant"),
    ({"variants": ["int8"], "derive": False}, "invalid_variants", "--no-derive"),
    ({"samples": [{"x": [[0.0] * 3]}]}, "invalid_samples", "shape [1, 3] does not fit [1, 128]"),
    ({"inputs": {"x": "float32[1,5]"}}, "invalid_samples", "does not fit the model's [1,128]"),
    ({"inputs": {"image": "zeros"}}, "invalid_samples", "the model has no input 'image'"),
    ({"inputs": {"x": "float99"}}, "invalid_samples", "unknown type 'float99'"),
])
def test_a_push_whose_derivation_cannot_work_is_refused_and_registers_nothing(
        client, settings, body, code, says) -> None:
    from controller.registry.inputs import write_samples

    if "samples" in body:
        up = client.post("/api/v1/uploads", params={"kind": "samples"},
                         content=write_samples(body["samples"]))
        assert up.status_code == 201, up.text
        body = body | {"samples": up.json()["sha256"]}
    before = state(settings)
    r = push(client, "mlp", "1.0.0", tiny_onnx(), "m.onnx", **body)
    assert (r.status_code, r.json()["code"]) == (422, code), r.text
    assert says in r.json()["detail"]
    after = state(settings)
    assert (after["rows"], after["meta"]) == (before["rows"], before["meta"])


def test_a_samples_upload_that_is_not_a_samples_file_is_refused(client, settings) -> None:
    before = state(settings)
    r = client.post("/api/v1/uploads", params={"kind": "samples"}, content=b"not an npz")
    assert (r.status_code, r.json()["code"]) == (422, "invalid_samples")
    assert state(settings) == before


def test_no_derive_registers_the_source_alone_ready_and_signed(client) -> None:
    push(client, "mlp", "1.0.0", tiny_onnx(), "m.onnx", derive=False)
    shown = ready(client, "mlp", "1.0.0")
    assert (shown["status"], shown["deployable"]) == ("ready", True)
    assert [v["name"] for v in shown["variants"]] == ["source"]
    assert shown["refused"] == []
    assert shown["smoke_test"]["inputs"] == 4  # the source is still smoke-tested


def test_targets_json_grows_by_less_than_2_kib_per_version(client, settings) -> None:
    targets = settings.data_dir / "tuf" / "metadata" / "targets.json"
    sizes = [targets.stat().st_size]
    for n in range(3):
        push(client, "mlp", f"1.0.{n}", tiny_onnx(), "m.onnx",
             smoke_test={"inputs": [{"x": [[0.5] * 128]}] * 8})  # 8 inputs: 10 KB inline
        shown = ready(client, "mlp", f"1.0.{n}")
        assert len(shown["variants"]) == 2  # source and int8, each with its smoke test
        sizes.append(targets.stat().st_size)
    growth = [b - a for a, b in itertools.pairwise(sizes)]
    assert all(0 < g < 2048 for g in growth), growth


def test_a_model_that_fails_on_its_samples_fails_the_version_and_says_why(client) -> None:
    from onnx import TensorProto, helper

    # loads, but Reshape to [7] fails on any real input of 128 values
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7])],
        [helper.make_tensor("shape", TensorProto.INT64, [1], [7])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    push(client, "bad", "1.0.0", model.SerializeToString(), "bad.onnx")
    shown = ready(client, "bad", "1.0.0")
    assert (shown["status"], shown["deployable"]) == ("failed", False)
    assert "the model cannot run on its sample inputs" in shown["job"]["message"]
