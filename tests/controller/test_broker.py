"""The embedded broker: authentication, per-device ACLs, and the amqtt fixes."""

import queue
import secrets
import socket

import paho.mqtt.client as mqtt
import pytest

from controller.broker import BrokerPolicy, BrokerStartError, EmbeddedBroker, SnapshotDict
from controller.security import digest
from controller.settings import HostPort
from shared.topics import Kind, Topics
from tests.conftest import free_port, wait_for

TOPICS = Topics("test/broker/ef/v1")
SERVICE = ("edgefleet-controller", "service-secret")
DEVICES = {"dev-a": "secret-a", "dev-b": "secret-b"}


_OPEN: list["Client"] = []


@pytest.fixture
def broker():
    policy = BrokerPolicy(TOPICS)
    policy.add_service_user(*SERVICE)
    for device_id, secret in DEVICES.items():
        policy.add_device(device_id, digest(secret))
    b = EmbeddedBroker(HostPort("127.0.0.1", free_port()), policy)
    b.start()
    yield b
    while _OPEN:
        _OPEN.pop().close()
    b.stop()


class Client:
    """A paho client whose received messages land in a queue."""

    def __init__(self, broker: EmbeddedBroker, username: str | None, password: str | None,
                 *, will: tuple[str, bytes] | None = None,
                 protocol: int = mqtt.MQTTv311) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.result: list[object] = []
        self.suback: list[list[int]] = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                        client_id=f"{username or 'anon'}-{secrets.token_hex(3)}"
                        if username not in DEVICES else username, protocol=protocol)
        if username:
            c.username_pw_set(username, password)
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True)
        self.dropped: list[object] = []
        c.on_connect = lambda _c, _u, _f, rc, _p: self.result.append(rc)
        c.on_disconnect = lambda _c, _u, _f, rc, _p: self.dropped.append(rc)
        c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        c.on_subscribe = lambda _c, _u, _m, rcs, _p: self.suback.append(
            [r.value for r in rcs])
        c.connect(broker.listen.host, broker.listen.port, keepalive=10)
        c.loop_start()
        self.client = c
        _OPEN.append(self)
        wait_for(lambda: self.result or self.dropped, 10, "CONNACK or a closed connection")

    @property
    def accepted(self) -> bool:
        return bool(self.result) and not self.result[0].is_failure  # type: ignore[attr-defined]

    def subscribe(self, topic: str) -> int:
        n = len(self.suback)
        self.client.subscribe(topic, qos=1)
        wait_for(lambda: len(self.suback) > n, 10, "SUBACK")
        return self.suback[-1][0]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def received(self, timeout: float) -> list[tuple[str, bytes]]:
        out = []
        try:
            while True:
                msg = self.messages.get(timeout=timeout)
                out.append((msg.topic, msg.payload))
                timeout = 0.05
        except queue.Empty:
            return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_anonymous_and_wrong_password_are_refused(broker) -> None:
    assert not Client(broker, None, None).accepted
    assert not Client(broker, "dev-a", "secret-b").accepted
    assert not Client(broker, "dev-zzz", "secret-a").accepted
    assert Client(broker, "dev-a", "secret-a").accepted


def test_a_device_cannot_publish_on_another_devices_topics(broker) -> None:
    watcher = Client(broker, *SERVICE)
    assert watcher.subscribe(f"{TOPICS.root}/#") == 1
    device = Client(broker, "dev-a", "secret-a")
    device.publish(TOPICS.device("dev-b", Kind.HEALTH), b"forged")
    device.publish(TOPICS.device("dev-a", Kind.DESIRED), b"forged")  # controller-only kind
    device.publish(TOPICS.device("dev-a", Kind.HEALTH), b"mine")  # the sync point
    got = watcher.received(timeout=5)
    assert got == [(TOPICS.device("dev-a", Kind.HEALTH), b"mine")]


def test_a_device_cannot_subscribe_to_another_devices_topics(broker) -> None:
    device = Client(broker, "dev-a", "secret-a")
    assert device.subscribe(TOPICS.device("dev-b", Kind.DESIRED)) == 0x80
    assert device.subscribe(f"{TOPICS.root}/dev/+/desired") == 0x80
    assert device.subscribe(f"{TOPICS.root}/#") == 0x80
    assert device.subscribe(TOPICS.device("dev-a", Kind.DESIRED)) == 1


def test_a_last_will_on_another_devices_topic_is_refused(broker) -> None:
    forged = Client(broker, "dev-a", "secret-a",
                    will=(TOPICS.device("dev-b", Kind.PRESENCE), b"offline"))
    assert not forged.accepted
    own = Client(broker, "dev-a", "secret-a",
                 will=(TOPICS.device("dev-a", Kind.PRESENCE), b"offline"))
    assert own.accepted


def test_retained_messages_reach_only_clients_subscribed_to_them(broker) -> None:
    """amqtt sent retained messages matching anyone's subscription to every new client."""
    controller = Client(broker, *SERVICE)
    controller.subscribe(f"{TOPICS.root}/dev/+/desired")  # someone else's subscription
    desired_b = TOPICS.device("dev-b", Kind.DESIRED)
    controller.publish(desired_b, b"for b only", retain=True)

    bystander = Client(broker, "dev-a", "secret-a")  # subscribes to nothing
    own = TOPICS.device("dev-a", Kind.DESIRED)
    bystander.subscribe(own)
    controller.publish(own, b"sync")  # once this arrives, anything leaked would have too
    assert bystander.received(timeout=5) == [(own, b"sync")]

    owner = Client(broker, "dev-b", "secret-b")
    owner.subscribe(desired_b)
    assert owner.received(timeout=5) == [(desired_b, b"for b only")]  # normal delivery works


def test_mqtt5_clients_are_refused_by_the_embedded_broker(broker) -> None:
    """amqtt speaks MQTT 3.1.1 only, so every edgefleet client uses 3.1.1.

    A raw MQTT 5 CONNECT must not be accepted: the broker closes the connection or
    answers with a refusal; it never sends a CONNACK with return code 0.
    """
    connect_v5 = bytes([0x10, 0x0F, 0x00, 0x04, *b"MQTT", 0x05, 0x02, 0x00, 0x0A, 0x00,
                        0x00, 0x02, *b"v5"])
    with socket.create_connection((broker.listen.host, broker.listen.port), timeout=5) as s:
        s.sendall(connect_v5)
        try:
            answer = s.recv(16)
        except (TimeoutError, ConnectionResetError):
            answer = b""
    accepted = len(answer) >= 4 and answer[0] == 0x20 and answer[3] == 0x00
    assert not accepted, answer
    assert Client(broker, *SERVICE, protocol=mqtt.MQTTv311).accepted


def test_a_taken_port_is_a_clear_error(broker) -> None:
    other = EmbeddedBroker(broker.listen, BrokerPolicy(TOPICS))
    with pytest.raises(BrokerStartError, match="--mqtt"):
        other.start()


def test_login_check_is_a_digest_comparison_not_a_password_hash() -> None:
    policy = BrokerPolicy(TOPICS)
    policy.add_device("dev-a", digest("s3cret"))
    assert policy.devices["dev-a"] == digest("s3cret")
    assert policy.authenticate("dev-a", "s3cret")
    assert not policy.authenticate("dev-a", "s3cret ")
    assert not policy.authenticate("dev-a", None)


def test_the_subscription_table_can_change_while_it_is_iterated(broker) -> None:
    """amqtt iterates it across awaits; a subscription arriving meanwhile broke a broadcast."""
    table = broker._broker._subscriptions
    assert isinstance(table, SnapshotDict)
    table["a"], table["b"] = [], []
    for key, _ in table.items():
        table[key + "-new"] = []
        table.pop("b", None)
    for key in table:
        table.pop(key)
    assert dict(table) == {}
