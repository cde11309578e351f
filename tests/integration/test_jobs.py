"""A controller killed while it builds a version's variants finishes the job after restart."""

import signal

from tests.conftest import wait_for
from tests.models import tiny_onnx


def test_a_job_interrupted_by_a_controller_crash_is_run_again(start_controller,
                                                              tmp_path) -> None:
    controller = start_controller()
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_onnx())
    api = controller.admin
    upload = api.upload("/uploads", model, params={"filename": "m.onnx"})
    api.call("POST", "/models/mlp/versions/1.0.0", {"upload": upload["sha256"]})

    def state() -> str:
        return str(api.call("GET", "/models/mlp/versions/1.0.0")["job"]["state"])

    wait_for(lambda: state() == "running", 30, "the job to start")
    controller.proc.send_signal(signal.SIGKILL)
    controller.proc.wait(10)

    again = start_controller(like=controller)
    version = wait_for(lambda: (v := again.admin.call("GET", "/models/mlp/versions/1.0.0"))
                       ["status"] == "ready" and v, 60, "the job to finish after the restart")
    assert [v["name"] for v in version["variants"]] == ["source", "int8"]
    assert all(v["signed"] for v in version["variants"])
    assert "queued 1 interrupted jobs again" in again.log()
