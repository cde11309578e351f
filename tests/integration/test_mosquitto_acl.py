"""The Mosquitto ACL that `edgefleet controller mosquitto-acl` prints confines each device
to its own topics on a real Mosquitto, with passwords and no anonymous access."""

import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from shared.topics import Kind, Topics
from tests.conftest import cli, free_port, unavailable, wait_for
from tests.integration.test_resume import mosquitto_with

ROOT = "ef/v1"
USERS = {"edgefleet-controller": "c-secret", "dev-aaaaaaaaaaaa": "a-secret",
         "dev-bbbbbbbbbbbb": "b-secret"}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        unavailable("mosquitto_passwd")
    acl = subprocess.run(cli("controller", "mosquitto-acl", "--topic-root", ROOT),
                         capture_output=True, text=True, check=True).stdout
    (tmp_path / "acl").write_text(acl)
    for user, password in USERS.items():
        subprocess.run([str(passwd), *(["-c"] if user.startswith("edgefleet") else []), "-b",
                        str(tmp_path / "passwd"), user, password], check=True)
    port = free_port()
    (tmp_path / "mosquitto.conf").write_text("\n".join([
        f"listener {port} 127.0.0.1", "allow_anonymous false", "user root",  # reads tmp_path
        f"password_file {tmp_path / 'passwd'}", f"acl_file {tmp_path / 'acl'}", ""]))
    proc = mosquitto_with(["-c", str(tmp_path / "mosquitto.conf")], port)
    yield port
    proc.terminate()
    proc.wait(10)


def connect(port: int, user: str | None, password: str | None = None) -> tuple[mqtt.Client, list]:
    got: list[tuple[str, bytes]] = []
    refused = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{user}")
    if user:
        client.username_pw_set(user, password)
    client.on_message = lambda _c, _u, m: got.append((m.topic, m.payload))
    client.on_connect = lambda _c, _u, _f, rc, _p: refused.set() if rc.is_failure else None
    client.connect("127.0.0.1", port)
    client.loop_start()
    wait_for(lambda: client.is_connected() or refused.is_set(), 10, f"{user} to connect")
    return client, got


def test_devices_reach_only_their_own_topics(broker: int) -> None:
    topics = Topics(ROOT)
    a, b = "dev-aaaaaaaaaaaa", "dev-bbbbbbbbbbbb"
    controller, heard = connect(broker, "edgefleet-controller", USERS["edgefleet-controller"])
    controller.subscribe(topics.all_devices(Kind.HEALTH), qos=1)
    device, device_got = connect(broker, a, USERS[a])
    anonymous, _ = connect(broker, None)
    wrong, _ = connect(broker, a, "guess")
    assert device.is_connected()
    assert not anonymous.is_connected()
    assert not wrong.is_connected()

    device.subscribe(topics.device(a, Kind.DESIRED), qos=1)
    device.subscribe(topics.device(b, Kind.DESIRED), qos=1)  # another device's: denied
    for target in (b, a):
        controller.publish(topics.device(target, Kind.DESIRED), f"for {target}".encode(), qos=1,
                           retain=True).wait_for_publish()
    device.publish(topics.device(b, Kind.HEALTH), b"posing as b", qos=1).wait_for_publish()
    device.publish(topics.device(a, Kind.HEALTH), b"a is fine", qos=1).wait_for_publish()
    wait_for(lambda: (topics.device(a, Kind.HEALTH), b"a is fine") in heard, 10, "a's health")
    mine = (topics.device(a, Kind.DESIRED), f"for {a}".encode())
    wait_for(lambda: mine in device_got, 10, "a's desired state")
    assert heard == [(topics.device(a, Kind.HEALTH), b"a is fine")]  # never b's, from a
    assert device_got == [mine]  # never b's
    for client in (controller, device, anonymous, wrong):
        client.disconnect()
        client.loop_stop()
