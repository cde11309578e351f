"""The local API's KServe v2 endpoint, driven by the protocol's own client (tritonclient)."""

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton

from agent.serving import LocalApi, Serving
from tests.models import image_onnx, staged


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    model_dir = staged(tmp_path_factory.mktemp("served") / "m", image_onnx(), model="conv")
    serving = Serving()
    serving.activate(model_dir)
    api = LocalApi(serving, "127.0.0.1", 0)
    api.start()
    yield serving, api.port, ort.InferenceSession(str(model_dir / "model.onnx"))
    api.stop()
    serving.activate(None)


def image() -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 1, (1, 3, 320, 320)).astype(np.float32)


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infers_with_binary_or_json_tensors(served, binary) -> None:
    serving, port, direct = served
    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    given = triton.InferInput("image", [1, 3, 320, 320], "FP32")
    given.set_data_from_numpy(image(), binary_data=binary)
    before = serving.count
    result = client.infer("conv", [given],
                          outputs=[triton.InferRequestedOutput("scores", binary_data=binary)])
    (want,) = direct.run(["scores"], {"image": image()})
    np.testing.assert_allclose(result.as_numpy("scores"), want, rtol=1e-5, atol=1e-5)
    assert result.get_response()["model_version"] == "1.0.0"
    assert serving.count == before + 1  # counted like any inference the gates judge


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/conv/infer", data=body,
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - our own server
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def binary_request(data: bytes, size: int | None = None, shape=(1, 3, 320, 320)) -> tuple:
    head = json.dumps({"inputs": [{"name": "image", "shape": list(shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": size or len(data)}}]})
    return head.encode() + data, {"Inference-Header-Content-Length": str(len(head))}


@pytest.mark.parametrize(("case", "says"), [
    ("wrong size", "binary_data_size 12 is not the 1228800 bytes"),
    ("wrong shape", "shape [1, 3, 32, 32] does not fit [1, 3, 320, 320]"),
    ("bad header length", "Inference-Header-Content-Length is not a number"),
    ("left over", "bytes of binary data are left over"),
    ("few values", "give 1 values in data"),
])
def test_a_malformed_v2_request_is_a_400_that_says_why(served, case, says) -> None:
    _, port, _ = served
    x = image().tobytes()
    body, headers = {
        "wrong size": lambda: binary_request(x, size=12),
        "wrong shape": lambda: binary_request(x[:32 * 32 * 12], shape=(1, 3, 32, 32)),
        "bad header length": lambda: (binary_request(x)[0],
                                      {"Inference-Header-Content-Length": "lots"}),
        "left over": lambda: binary_request(x + b"\0" * 8, size=len(x)),
        "few values": lambda: (json.dumps({"inputs": [{
            "name": "image", "shape": [1], "datatype": "FP32", "data": [1.0, 2.0]}]}).encode(),
            {}),
    }[case]()
    status, out = post(port, body, headers | {"Content-Type": "application/octet-stream"})
    assert status == 400
    assert says in out["error"]


def test_the_body_cap_follows_the_models_declared_input_size(served) -> None:
    serving, port, _ = served
    declared = 3 * 320 * 320 * 4
    assert serving.body_cap(binary=True) == max(16 << 20, declared + (1 << 20))
    assert serving.body_cap(binary=False) == 24 * declared + (1 << 20)  # ~30 MB of JSON
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/conv/infer", method="POST",
        headers={"Content-Length": str(serving.body_cap(binary=True) + 1),
                 "Inference-Header-Content-Length": "10"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)  # noqa: S310 - our own server
    assert refused.value.code == 413


def test_kserve_module_needs_no_numpy() -> None:
    import ast

    source = Path(__import__("agent.kserve").kserve.__file__).read_text()
    imported = {a.name.split(".")[0] for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Import | ast.ImportFrom)
                for a in (node.names if isinstance(node, ast.Import)
                          else [ast.alias(node.module or "")])}
    assert "numpy" not in imported
