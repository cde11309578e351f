"""`edgefleet model push/list/show` against a real controller process."""

import json
import os
import subprocess

from tests.conftest import cli
from tests.models import tiny_onnx


def run(controller, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args, "--controller", controller.url, "--token",
                              controller.admin.token or ""),
                          capture_output=True, text=True, timeout=120, check=False,
                          env=os.environ | {"COLUMNS": "200"})


def test_push_list_and_show_a_model_from_the_command_line(start_controller, tmp_path) -> None:
    controller = start_controller()
    model = tmp_path / "mlp.onnx"
    model.write_bytes(tiny_onnx())
    pushed = run(controller, "model", "push", str(model), "--name", "mlp", "--version", "1.0.0")
    assert pushed.returncode == 0, pushed.stderr
    assert "int8" in pushed.stdout  # waited for the variants, shows them with their figures
    assert "top-1" in pushed.stdout
    listed = json.loads(run(controller, "model", "list", "--json").stdout)
    assert [(v["name"], v["version"], v["status"]) for v in listed] == [("mlp", "1.0.0",
                                                                       "ready")]
    shown = json.loads(run(controller, "model", "show", "mlp@1.0.0", "--json").stdout)
    assert [(v["name"], v["signed"]) for v in shown["variants"]] == [("source", True),
                                                                     ("int8", True)]

    smoke = tmp_path / "smoke.json"
    smoke.write_text(json.dumps({"inputs": [{"wrong": [[1.0]]}]}))
    failed = run(controller, "model", "push", str(model), "--name", "mlp", "--version", "1.1.0",
                 "--smoke-test", str(smoke), "--labels", "team=vision")
    assert failed.returncode == 1
    assert "the model takes ['x']" in failed.stdout
    deleted = run(controller, "model", "delete", "mlp@1.1.0")
    assert deleted.returncode == 0, deleted.stderr
    listed = json.loads(run(controller, "model", "list", "--json").stdout)
    assert [v["version"] for v in listed] == ["1.0.0"]

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(tiny_onnx()[:40])
    refused = run(controller, "model", "push", str(broken), "--name", "mlp", "--version", "2.0.0")
    assert refused.returncode == 1
    assert "invalid_model" in refused.stderr
