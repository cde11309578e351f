"""A simulated fleet against a real controller, on both backends."""

import os
import signal

from tests.conftest import wait_for


def test_simulated_devices_come_online_with_capabilities_and_go_offline_when_killed(
    start_controller, spawn
) -> None:
    controller = start_controller(keepalive=4)
    token = controller.enroll_token(uses=20)
    sim = spawn("sim", "--devices", "20", "--controller", controller.url, "--token", token,
                log_name="sim")

    def all_online() -> list:
        devices = controller.devices()
        online = [d for d in devices if d["status"] == "online" and d["capabilities"]]
        return devices if len(online) == 20 else []

    devices = wait_for(all_online, 60, "20 simulated devices online")
    assert {d["capabilities"]["arch"] for d in devices} == {"arm64", "x86_64"}
    assert all(d["capabilities"]["runtimes"] for d in devices)
    assert any(len(d["capabilities"]["runtimes"]) == 1 for d in devices)  # some lack llama.cpp
    assert len({d["device_class"] for d in devices}) >= 3
    wait_for(lambda: all(d["health_count"] > 0 for d in controller.devices()), 30,
             "a health report from every device")

    os.kill(sim.pid, signal.SIGKILL)
    # The requirement is the deadline itself: offline within 1.5 x the keepalive.
    wait_for(lambda: all(d["status"] == "offline" for d in controller.devices()),
             1.5 * controller.keepalive, "every device offline after SIGKILL")


def test_fleet_summary_counts_devices_by_status_and_class(start_controller, spawn) -> None:
    controller = start_controller()
    spawn("sim", "--devices", "8", "--controller", controller.url, "--token",
          controller.enroll_token(uses=8), log_name="sim")
    wait_for(lambda: controller.admin.call("GET", "/fleet/summary")["by_status"]["online"] == 8,
             60, "8 devices online in the summary")
    summary = controller.admin.call("GET", "/fleet/summary")
    assert summary["devices"] == 8
    assert sum(summary["by_class"].values()) == 8
    assert len(summary["by_class"]) == 4


def test_devices_reconnect_after_a_controller_restart(start_controller, spawn) -> None:
    """With the embedded broker the restart takes the broker down too; on Mosquitto the
    new controller must learn presence from the retained messages."""
    controller = start_controller(keepalive=4)
    spawn("sim", "--devices", "5", "--controller", controller.url, "--token",
          controller.enroll_token(uses=5), log_name="sim")
    wait_for(lambda: sum(d["status"] == "online" for d in controller.devices()) == 5, 60,
             "5 devices online")
    controller.proc.terminate()
    assert controller.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    assert "Traceback" not in controller.log()
    again = start_controller(keepalive=4, like=controller)
    before = {d["id"]: d["health_count"] for d in again.devices()}
    wait_for(lambda: all(d["status"] == "online" and d["health_count"] > before[d["id"]]
                         for d in again.devices()), 60,
             "every device reporting to the restarted controller")
