"""A real agent process: enrol, run, report real capabilities, leave cleanly."""

import signal
import stat
import subprocess

from tests.conftest import cli, wait_for


def test_agent_enrols_runs_and_goes_offline_on_sigterm(start_controller, spawn, tmp_path) -> None:
    controller = start_controller()
    config = tmp_path / "agent.toml"
    state = tmp_path / "state"
    done = subprocess.run(
        cli("agent", "enroll", "--controller", controller.url, "--token",
            controller.enroll_token(labels={"fleet": "test"}), "--config", str(config),
            "--state-dir", str(state), "--name", "box-1", "--label", "room=lab"),
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((state / "identity.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(config.stat().st_mode) == 0o600

    agent = spawn("agent", "run", "--config", str(config), log_name="agent")

    def online() -> dict | None:
        devices = [d for d in controller.devices() if d["name"] == "box-1"]
        return devices[0] if devices and devices[0]["status"] == "online" \
            and devices[0]["health_count"] > 0 else None

    device = wait_for(online, 60, "the agent online with a health report")
    caps = device["capabilities"]
    assert caps["cpu_count"] >= 1
    assert caps["ram_bytes"] > 0
    assert caps["disk_free_bytes"] > 0
    onnx = [r for r in caps["runtimes"] if r["name"] == "onnxruntime"]
    assert onnx
    assert "CPUExecutionProvider" in onnx[0]["providers"]
    assert device["labels"] == {"fleet": "test", "room": "lab"}
    assert device["last_health"]["mem_total_bytes"] == caps["ram_bytes"]

    agent.send_signal(signal.SIGTERM)
    assert agent.wait(30) == 0
    wait_for(lambda: controller.admin.call("GET", f"/devices/{device['id']}")["status"]
             == "offline", 10, "the agent offline after a clean stop")


def test_enrolment_with_a_spent_token_fails_clearly(start_controller, tmp_path) -> None:
    controller = start_controller()
    token = controller.enroll_token()
    args = ["--controller", controller.url, "--token", token, "--state-dir", str(tmp_path / "s")]
    first = subprocess.run(cli("agent", "enroll", *args, "--config", str(tmp_path / "a.toml")),
                           capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(cli("agent", "enroll", *args, "--config", str(tmp_path / "b.toml")),
                            capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode != 0
    assert "enrolment token is unknown, used up or expired" in second.stderr
