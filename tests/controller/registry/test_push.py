"""Pushing model versions through the API: validation, limits, nothing left behind."""

import hashlib
from pathlib import Path

import gguf
import numpy as np
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from sqlalchemy import func, select

from controller.api.app import create_app
from controller.db.engine import make_engine, session_factory
from controller.db.models import Model, ModelVersion, Variant
from controller.runtime import Runtime
from controller.settings import Settings
from tests.conftest import Backend


def tiny_onnx() -> bytes:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.random((8, 4), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def tiny_gguf(path: Path) -> bytes:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 256), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture
def settings(backend: Backend, tmp_path: Path) -> Settings:
    return backend.settings(tmp_path / "data", max_upload_bytes=64 * 1024)


@pytest.fixture
def client(settings: Settings):
    with TestClient(create_app(settings, runtime=Runtime(settings))) as c:
        token = (settings.data_dir / "admin-token").read_text().strip()
        c.headers["Authorization"] = f"Bearer {token}"
        yield c


def push(client: TestClient, name: str, version: str, data: bytes, filename: str):
    return client.post(f"/api/v1/models/{name}/versions/{version}",
                       params={"filename": filename}, content=data,
                       headers={"Content-Type": "application/octet-stream"})


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
    target = client.app.state.runtime.trust.targets()["models/mlp/1.0.0/source.onnx"]
    assert target.custom["model"] == "mlp"
    assert target.custom["version"] == "1.0.0"
    shown = client.get("/api/v1/models/mlp/versions/1.0.0").json()
    assert shown["variants"] == r.json()["variants"]
    assert [v["version"] for v in client.get("/api/v1/models").json()] == ["1.0.0"]


def test_a_gguf_version_records_architecture_and_quantization(client, tmp_path) -> None:
    r = push(client, "tiny-llama", "0.1.0", tiny_gguf(tmp_path / "t.gguf"), "t.gguf")
    assert r.status_code == 201, r.text
    (variant,) = r.json()["variants"]
    assert (variant["format"], variant["quantization"]) == ("gguf", "f16")
    assert variant["requirements"]["gguf_architecture"] == "llama"


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
    before = state(settings)
    data, filename = {
        "truncated onnx": (tiny_onnx()[:60], "m.onnx"),
        "corrupt gguf": (tiny_gguf(tmp_path / "t.gguf")[:100], "t.gguf"),
        "mislabelled": (tiny_onnx(), "m.gguf"),
        "oversize": (b"\0" * (64 * 1024 + 1), "m.onnx"),
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
