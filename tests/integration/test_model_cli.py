"""`edgefleet model push/list/show` against a real controller process."""

import json
import subprocess

from tests.conftest import cli
from tests.controller.registry.test_push import tiny_onnx


def run(controller, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args, "--controller", controller.url, "--token",
                              controller.admin.token or ""),
                          capture_output=True, text=True, timeout=120, check=False)


def test_push_list_and_show_a_model_from_the_command_line(start_controller, tmp_path) -> None:
    controller = start_controller()
    model = tmp_path / "mlp.onnx"
    model.write_bytes(tiny_onnx())
    pushed = run(controller, "model", "push", str(model), "--name", "mlp", "--version", "1.0.0")
    assert pushed.returncode == 0, pushed.stderr
    assert "mlp" in pushed.stdout
    listed = json.loads(run(controller, "model", "list", "--json").stdout)
    assert [(v["name"], v["version"]) for v in listed] == [("mlp", "1.0.0")]
    shown = json.loads(run(controller, "model", "show", "mlp@1.0.0", "--json").stdout)
    assert shown["variants"][0]["signed"] is True

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(tiny_onnx()[:40])
    refused = run(controller, "model", "push", str(broken), "--name", "mlp", "--version", "2.0.0")
    assert refused.returncode == 1
    assert "invalid_model" in refused.stderr
