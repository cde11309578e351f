"""`controller serve --mqtt-dynsec`: the controller gives each device its broker account in
a real Mosquitto's dynamic security plugin at enrolment and removes it on deletion; each
device reaches only its own topics, and nobody edits a password file."""

import glob
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from controller.api.app import create_app
from controller.runtime import Runtime
from controller.settings import MqttUrl
from shared.topics import Kind, Topics
from tests.conftest import Backend, ControllerProcess, free_port, unavailable, wait_for
from tests.integration.test_mosquitto_acl import connect
from tests.integration.test_resume import mosquitto_with

ADMIN = ("broker-admin", "admin-secret")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    plugin = next(iter(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so")), None)
    ctrl = shutil.which("mosquitto_ctrl")
    if plugin is None or ctrl is None:
        unavailable("Mosquitto's dynamic security plugin and mosquitto_ctrl")
    config = tmp_path / "dynsec.json"
    subprocess.run([str(ctrl), "dynsec", "init", str(config), *ADMIN], check=True,
                   capture_output=True, timeout=30)
    port = free_port()
    (tmp_path / "mosquitto.conf").write_text("\n".join([
        f"listener {port} 127.0.0.1", "allow_anonymous false", "user root",
        f"plugin {plugin}", f"plugin_opt_config_file {config}", ""]))
    proc = mosquitto_with(["-c", str(tmp_path / "mosquitto.conf")], port)
    yield port
    proc.terminate()
    proc.wait(10)


def test_devices_get_broker_accounts_confined_to_their_own_topics(
        broker: int, start_controller: Callable[..., ControllerProcess],
        spawn: Callable[..., Any]) -> None:
    url = f"mqtt://{ADMIN[0]}:{ADMIN[1]}@127.0.0.1:{broker}"
    c = start_controller("--mqtt", url, "--mqtt-dynsec")
    spawn("sim", "--devices", "2", "--controller", c.url, "--token", c.enroll_token(uses=2),
          log_name="sim")
    wait_for(lambda: sum(d["status"] == "online" for d in c.devices()) == 2, 60,
             "two simulated devices online through their own broker accounts")
    wait_for(lambda: all(d["health_count"] > 0 for d in c.devices()), 30,
             "health reports through the controller's shared subscription")

    a = c.api(None).call("POST", "/enroll", {"token": c.enroll_token()})
    b = c.api(None).call("POST", "/enroll", {"token": c.enroll_token()})
    topics = Topics(a["topic_root"])
    observer, heard = connect(broker, *ADMIN)
    observer.subscribe(topics.all_devices(Kind.HEALTH), qos=1)
    device, got = connect(broker, a["mqtt_username"], a["mqtt_password"])
    assert device.is_connected()
    assert not connect(broker, a["mqtt_username"], "guess")[0].is_connected()
    assert not connect(broker, None)[0].is_connected()

    device.subscribe(topics.device(b["device_id"], Kind.DESIRED), qos=1)  # another's: denied
    device.subscribe(topics.device(a["device_id"], Kind.DESIRED), qos=1)
    observer.publish(topics.device(b["device_id"], Kind.DESIRED), b"for b", qos=1,
                     retain=True).wait_for_publish()
    observer.publish(topics.device(a["device_id"], Kind.DESIRED), b"for a", qos=1,
                     retain=True).wait_for_publish()
    device.publish(topics.device(b["device_id"], Kind.HEALTH), b"posing as b",
                   qos=1).wait_for_publish()
    device.publish(topics.device(a["device_id"], Kind.HEALTH), b"a is fine",
                   qos=1).wait_for_publish()
    own = (topics.device(a["device_id"], Kind.HEALTH), b"a is fine")
    wait_for(lambda: own in heard, 10, "a's own health report")
    wait_for(lambda: (topics.device(a["device_id"], Kind.DESIRED), b"for a") in got, 10,
             "a's desired state")
    assert [h for h in heard if h[1] in (b"a is fine", b"posing as b")] == [own]
    assert [g for g in got if g[1] == b"for b"] == []

    device.disconnect()
    c.admin.call("DELETE", f"/devices/{a['device_id']}")
    assert not connect(broker, a["mqtt_username"], a["mqtt_password"])[0].is_connected()
    assert connect(broker, b["mqtt_username"], b["mqtt_password"])[0].is_connected()


def test_an_enrolment_that_fails_after_its_broker_account_was_made_leaves_no_account(
        broker: int, backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from controller.api import routes

    settings = backend.settings(tmp_path / "data", mqtt_dynsec=True, mqtt_url=MqttUrl.parse(
        f"mqtt://{ADMIN[0]}:{ADMIN[1]}@127.0.0.1:{broker}"))
    with TestClient(create_app(settings, runtime=Runtime(settings)),
                    raise_server_exceptions=False) as c:
        c.headers["Authorization"] = "Bearer " + (settings.data_dir / "admin-token").read_text()
        token = c.post("/api/v1/enroll-tokens", json={"uses": 2}).json()["token"]

        def database_gone(*_args: object, **_kwargs: object) -> None:
            raise OperationalError("INSERT INTO audit", {}, Exception("connection lost"))

        monkeypatch.setattr(routes.audit, "record", database_gone)
        assert c.post("/api/v1/enroll", json={"token": token}).status_code == 500
        monkeypatch.undo()
        assert clients(broker) == {ADMIN[0]}  # the device's account was removed again
        assert c.get("/api/v1/devices").json() == []
        enrolled = c.post("/api/v1/enroll", json={"token": token})  # the token kept its use
        assert enrolled.status_code == 201
        assert clients(broker) == {ADMIN[0], enrolled.json()["device_id"]}


def clients(port: int) -> set[str]:
    """The usernames in the broker's dynamic security configuration."""
    done = subprocess.run(["mosquitto_ctrl", "-h", "127.0.0.1", "-p", str(port), "-u", ADMIN[0],
                           "-P", ADMIN[1], "dynsec", "listClients"], capture_output=True,
                          text=True, timeout=30, check=True)
    return set(done.stdout.split())
