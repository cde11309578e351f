"""packaging/install-agent.sh end to end into an isolated root: a wheel built from this
checkout, its own virtual environment, enrolment, the systemd unit (checked by
systemd-analyze), and the installed agent online at a real controller."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ControllerProcess, unavailable, wait_for

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "packaging" / "install-agent.sh"


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(ROOT)], check=True, timeout=300)
    return next(out.glob("edgefleet-*.whl"))


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SCRIPT), "--prefix", str(root), *args],
                          capture_output=True, text=True, timeout=900, check=False,
                          env=os.environ | {"PYTHON": sys.executable})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_script_leaves_an_enrolled_agent_that_comes_online(
        start_controller: Callable[..., ControllerProcess], spawn: Callable[..., Any],
        wheel: Path, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        unavailable("systemd-analyze (apt-get install systemd)")
    c = start_controller()
    root = tmp_path / "root"
    done = install(root, "--controller", c.url, "--token", c.enroll_token(), "--wheel",
                   str(wheel), "--name", "box-1", "--label", "site=lab")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "enrolling with" in done.stdout

    config = root / "etc/edgefleet/agent.toml"
    state = root / "var/lib/edgefleet"
    unit = root / "etc/systemd/system/edgefleet-agent.service"
    assert (root / "opt/edgefleet/venv/bin/edgefleet").exists()
    assert mode(config) == 0o600
    assert mode(state) == 0o700
    assert mode(state / "identity.json") == 0o600
    assert f"ExecStart={root}/opt/edgefleet/venv/bin/edgefleet agent run --config {config}" \
        in unit.read_text()
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert verify.returncode == 0, verify.stderr
    device_id = json.loads((state / "identity.json").read_text())["device_id"]

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    # As the unit runs it: the installed entry point, the installed config, systemd's
    # notify socket and watchdog.
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        agent = subprocess.Popen(
            [str(root / "opt/edgefleet/venv/bin/edgefleet"), "agent", "run", "--config",
             str(config)], stdout=log, stderr=subprocess.STDOUT,
            env={"PATH": os.environ["PATH"], "NOTIFY_SOCKET": str(tmp_path / "notify"),
                 "WATCHDOG_USEC": "2000000", "EDGEFLEET_LOG_FORMAT": "json"})
    try:
        wait_for(lambda: any(d["id"] == device_id and d["status"] == "online"
                             and d["name"] == "box-1" and d["labels"] == {"site": "lab"}
                             for d in c.devices()), 60, "the installed agent online")
        assert notify.recv(100) == b"READY=1"
        assert notify.recv(100) == b"WATCHDOG=1"
    finally:
        agent.terminate()
        agent.wait(30)
        notify.close()

    logged = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    assert any(line["msg"].startswith(f"agent {device_id} starting") for line in logged)
    assert {line["process"] for line in logged} == {"agent"}
    identity = json.loads((state / "identity.json").read_text())
    assert identity["mqtt_password"] not in log_path.read_text()

    again = install(root, "--wheel", str(wheel))  # an upgrade: no token needed, no new device
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"keeping {config} (already enrolled)" in again.stdout
    assert json.loads((state / "identity.json").read_text())["device_id"] == device_id


def test_install_script_refuses_to_enrol_without_a_token(tmp_path: Path) -> None:
    done = install(tmp_path / "root", "--controller", "http://127.0.0.1:9")
    assert done.returncode == 1
    assert "--token is needed to enrol this box" in done.stderr
    assert not (tmp_path / "root" / "opt").exists()  # refused before installing anything
