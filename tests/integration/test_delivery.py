"""A real agent pinned to a model: fetched over MQTT, verified, activated, served."""

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import cli, free_port, wait_for
from tests.models import llama_cpp, tiny_gguf, tiny_onnx


def enroll(controller, tmp_path: Path, name: str) -> tuple[Path, Path, str]:
    """Enrol an agent (probation 0.5 s); returns its config, state dir and local API URL."""
    port = free_port()
    config, state = tmp_path / f"{name}.toml", tmp_path / name
    done = subprocess.run(
        cli("agent", "enroll", "--controller", controller.url, "--token",
            controller.enroll_token(), "--config", str(config), "--state-dir", str(state),
            "--name", name, "--inference-listen", f"127.0.0.1:{port}"),
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    config.write_text(config.read_text().replace("[labels]", "probation_s = 0.5\n\n[labels]"))
    return config, state, f"http://127.0.0.1:{port}"


def online(controller, name: str) -> str:
    device = wait_for(lambda: next((d for d in controller.devices() if d["name"] == name
                                    and d["status"] == "online" and d["capabilities"]), None),
                      60, f"{name} online")
    return str(device["id"])


def enrolled_agent(controller, spawn, tmp_path: Path, name: str = "box-1"):
    """Enrol and start an agent; returns (device id, local API URL, process)."""
    config, _state, local = enroll(controller, tmp_path, name)
    agent = spawn("agent", "run", "--config", str(config), log_name=name)
    return online(controller, name), local, agent


def push(controller, tmp_path: Path, name: str, version: str, data: bytes, filename: str,
         **fields: object):
    """Push a model version (``fields``: more of the version's body, e.g. derive=False)."""
    path = tmp_path / filename
    path.write_bytes(data)
    api = controller.admin
    upload = api.upload("/uploads", path, params={"filename": filename})
    api.call("POST", f"/models/{name}/versions/{version}",
             {"upload": upload["sha256"], **fields})
    return wait_for(lambda: (v := api.call("GET", f"/models/{name}/versions/{version}"))
                    ["status"] != "processing" and v, 120, f"{name}@{version} built")


def http(method: str, url: str, body: object | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,  # noqa: S310
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def reported(controller, device_id: str, generation: int) -> dict | None:
    device = controller.admin.call("GET", f"/devices/{device_id}")
    r = device.get("reported")
    return r if r and r["generation"] == generation and r["state"] in (
        "committed", "rolled_back", "failed") else None


def test_a_pinned_agent_fetches_verifies_activates_and_serves_the_model(
        start_controller, spawn, tmp_path) -> None:
    controller = start_controller()
    version = push(controller, tmp_path, "mlp", "1.0.0", tiny_onnx(), "mlp.onnx")
    device_id, local, _agent = enrolled_agent(controller, spawn, tmp_path)

    pinned = operator_cli(controller, "devices", "pin", device_id, "mlp@1.0.0")
    assert "generation 1 -> mlp@1.0.0 (source)" in pinned  # fp32 ranks first where it fits
    done = wait_for(lambda: reported(controller, device_id, 1), 90, "the install to finish")
    assert done["state"] == "committed", done
    assert (done["model"], done["version"], done["variant"]) == ("mlp", "1.0.0", "source")
    kinds = [e["kind"] for e in controller.admin.call("GET", f"/devices/{device_id}/events")]
    steps = [k for n, k in enumerate(kinds) if n == 0 or k != kinds[n - 1]]  # progress: 1+
    assert steps[:8] == ["downloading", "download_progress", "verifying", "staging",
                         "activating", "smoke_test", "probation", "committed"]

    status, models = http("GET", f"{local}/v1/models")
    assert status == 200
    assert [m["id"] for m in models["data"]] == ["mlp"]
    x = np.random.default_rng(1).standard_normal((1, 128)).astype(np.float32)
    status, out = http("POST", f"{local}/v1/models/mlp/infer", {"inputs": {"x": x.tolist()}})
    assert status == 200, out
    source = next(v for v in version["variants"] if v["name"] == "source")
    blob = controller.data_dir / "blobs" / "sha256" / source["sha256"][:2] / source["sha256"]
    direct = ort.InferenceSession(str(blob), providers=["CPUExecutionProvider"])
    (want,) = direct.run(["y"], {"x": x})
    np.testing.assert_allclose(np.asarray(out["outputs"]["y"], dtype=np.float32), want,
                               rtol=1e-6)

    status, bad = http("POST", f"{local}/v1/models/mlp/infer", {"inputs": {"x": [[1.0, 2.0]]}})
    assert status == 400
    assert "shape [1, 2] does not fit [1, 128]" in bad["error"]
    health = wait_for(lambda: (d := controller.admin.call("GET", f"/devices/{device_id}"))
                      ["last_health"].get("inference_count", 0) >= 2 and d, 30,
                      "health with the inference counters")
    assert health["last_health"]["active_model"] == "mlp@1.0.0"
    with urllib.request.urlopen(f"{local}/metrics", timeout=10) as resp:  # noqa: S310
        samples = {(s.name, s.labels.get("model"), s.labels.get("state")): s.value
                   for f in text_string_to_metric_families(resp.read().decode())
                   for s in f.samples}
    # the smoke test's inferences and ours; the bad request never reached the runtime
    served = samples["edgefleet_agent_inferences_total", "mlp", None]
    assert served >= 2
    assert samples["edgefleet_agent_inference_seconds_count", "mlp", None] == served
    assert samples["edgefleet_agent_installs_total", None, "committed"] == 1

    assert "generation 2 -> no model" in operator_cli(controller, "devices", "unpin", device_id)
    assert wait_for(lambda: reported(controller, device_id, 2), 60, "the unpin")["model"] is None
    assert http("GET", f"{local}/v1/models") == (200, {"object": "list", "data": []})
    assert "mlp@1.0.0" not in operator_cli(controller, "devices")  # the table shows none


def operator_cli(controller, *args: str) -> str:
    done = subprocess.run(cli(*args, "--controller", controller.url, "--token",
                              controller.admin.token or ""), capture_output=True, text=True,
                          timeout=60, check=False, env=os.environ | {"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def pin(controller, device_id: str, ref: str) -> dict:
    pinned = controller.admin.call("PUT", f"/devices/{device_id}/pin", {"model": ref})
    return wait_for(lambda: reported(controller, device_id, pinned["desired_generation"]), 90,
                    f"the install of {ref} to finish")


def test_a_tampered_blob_or_a_failing_smoke_test_leaves_the_running_model_serving(
        start_controller, spawn, tmp_path) -> None:
    controller = start_controller()
    push(controller, tmp_path, "mlp", "1.0.0", tiny_onnx(), "a.onnx")
    tampered = push(controller, tmp_path, "mlp", "1.1.0", tiny_onnx(hidden=64), "b.onnx")
    smoke = {"inputs": [{"x": [[0.5] * 128]}], "latency_budget_ms": 0.000001}
    path = tmp_path / "c.onnx"
    path.write_bytes(tiny_onnx(hidden=32))
    upload = controller.admin.upload("/uploads", path, params={"filename": "c.onnx"})
    controller.admin.call("POST", "/models/mlp/versions/1.2.0",
                          {"upload": upload["sha256"], "smoke_test": smoke})
    wait_for(lambda: controller.admin.call("GET", "/models/mlp/versions/1.2.0")["status"]
             == "ready", 120, "mlp@1.2.0 built")
    device_id, local, _agent = enrolled_agent(controller, spawn, tmp_path)
    assert pin(controller, device_id, "mlp@1.0.0")["state"] == "committed"

    source = next(v for v in tampered["variants"] if v["name"] == "source")
    blob = controller.data_dir / "blobs" / "sha256" / source["sha256"][:2] / source["sha256"]
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF  # same length, one byte changed after signing
    blob.write_bytes(bytes(data))
    refused = pin(controller, device_id, "mlp@1.1.0")
    assert refused["state"] == "failed"
    assert refused["detail"].startswith("download_refused"), refused
    assert http("GET", f"{local}/v1/models")[1]["data"][0]["version"] == "1.0.0"

    slow = pin(controller, device_id, "mlp@1.2.0")
    assert slow["state"] == "rolled_back"
    assert slow["detail"].startswith("smoke_test_failed: input 0: took"), slow
    assert http("GET", f"{local}/v1/models")[1]["data"][0]["version"] == "1.0.0"
    status, out = http("POST", f"{local}/v1/models/mlp/infer",
                       {"inputs": {"x": [[0.0] * 128]}})
    assert status == 200, out


def test_a_gguf_model_serves_openai_style_completions(start_controller, spawn,
                                                       tmp_path) -> None:
    llama_cpp()
    controller = start_controller()
    push(controller, tmp_path, "tiny-llama", "0.1.0", tiny_gguf(tmp_path / "t.gguf"), "t.gguf")
    device_id, local, _agent = enrolled_agent(controller, spawn, tmp_path)
    done = pin(controller, device_id, "tiny-llama@0.1.0")
    assert done["state"] == "committed", done
    status, chat = http("POST", f"{local}/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    assert status == 200, chat
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    status, completion = http("POST", f"{local}/v1/completions",
                              {"prompt": "The quick", "max_tokens": 4})
    assert status == 200, completion
    assert completion["choices"][0]["text"] is not None
    status, wrong = http("POST", f"{local}/v1/models/tiny-llama/infer", {"inputs": {}})
    assert (status, wrong["error"]) == (400, "this is a GGUF model: use /v1/completions")
