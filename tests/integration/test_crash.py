"""An agent killed (SIGKILL) in every install state ends on a complete, verified model."""

import hashlib
import json
from pathlib import Path

from tests.conftest import wait_for
from tests.integration.test_delivery import enroll, http, online, push, reported
from tests.models import tiny_onnx

#: where the agent kills itself: just after saving each state, and just after the swap
CRASH_POINTS = ["downloading", "verifying", "staging", "activating", "swapped", "smoke_test",
                "probation"]


def active_model(state: Path) -> tuple[str, Path]:
    """The model ``current`` points at; asserts it is whole and its hash is its name."""
    staged = (state / "current").resolve()
    (model,) = staged.glob("model.*")
    assert hashlib.sha256(model.read_bytes()).hexdigest() == staged.name
    return json.loads((staged / "meta.json").read_text())["version"], model


def test_an_agent_killed_in_every_install_state_ends_on_a_verified_model(
        start_controller, spawn, tmp_path) -> None:
    controller = start_controller()
    for version, hidden in (("1.0.0", 256), ("1.1.0", 64)):
        push(controller, tmp_path, "mlp", version, tiny_onnx(hidden=hidden), f"{version}.onnx")
    config, state, local = enroll(controller, tmp_path, "box-1")
    agent = spawn("agent", "run", "--config", str(config), log_name="agent")
    device_id = online(controller, "box-1")
    first = controller.admin.call("PUT", f"/devices/{device_id}/pin", {"model": "mlp@1.0.0"})
    wait_for(lambda: reported(controller, device_id, first["desired_generation"]), 90,
             "the first install")
    running = "1.0.0"

    for point in CRASH_POINTS:
        agent.terminate()
        assert agent.wait(30) == 0
        agent = spawn("agent", "run", "--config", str(config), log_name=f"crash-{point}",
                      env={"EDGEFLEET_AGENT_CRASH_AT": point})
        target = "1.1.0" if running == "1.0.0" else "1.0.0"
        pinned = controller.admin.call("PUT", f"/devices/{device_id}/pin",
                                       {"model": f"mlp@{target}"})
        assert agent.wait(90) == -9, f"the agent did not die at {point}"
        left = json.loads((state / "install.json").read_text())
        assert left["state"] == ("activating" if point == "swapped" else point)
        before, _ = active_model(state)  # whatever is active now is whole and verified
        assert before in ("1.0.0", "1.1.0")

        agent = spawn("agent", "run", "--config", str(config), log_name=f"after-{point}")
        generation = pinned["desired_generation"]
        done = wait_for(lambda g=generation: reported(controller, device_id, g),
                        90, f"the install after a crash at {point}")
        assert (done["state"], done["version"]) == ("committed", target), (point, done)
        assert active_model(state)[0] == target
        assert http("GET", f"{local}/v1/models")[1]["data"][0]["version"] == target
        assert "resuming the install" in agent.log_path.read_text()  # type: ignore[attr-defined]
        running = target
