"""DeviceSession against a recording publisher (our own interface; no broker)."""

import json
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import Identity
from agent.session import DeviceSession
from shared.envelope import Signer, public_key_to_text, seal_desired
from shared.messages import Capabilities, DesiredState, Health
from shared.topics import Kind, Topics

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
KEY = Ed25519PrivateKey.generate()
TOPICS = Topics("t/ef/v1")


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict, int, bool]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.sent.append((topic, json.loads(payload), qos, retain))


def session() -> DeviceSession:
    identity = Identity(device_id="dev-1", mqtt_url="mqtt://x:1", mqtt_username="dev-1",
                        mqtt_password="p", topic_root=TOPICS.root, keepalive_s=5,
                        health_interval_s=1, desired_state_key=public_key_to_text(KEY.public_key()))
    caps = Capabilities(arch="arm64", cpu_count=1, ram_bytes=1, disk_free_bytes=1)
    return DeviceSession(
        identity, capabilities=lambda: caps, labels={"site": "a"}, clock=lambda: T0,
        health=lambda seq, now: Health(seq=seq, sent_at=now, cpu_percent=0, mem_used_bytes=0,
                                       mem_total_bytes=1, disk_free_bytes=1))


def test_connect_announces_retained_presence_then_hello() -> None:
    s, pub = session(), Recorder()
    s.on_connected(pub)
    (p_topic, presence, _, p_retain), (h_topic, hello, _, h_retain) = pub.sent
    assert (p_topic, presence["state"], p_retain) == (TOPICS.device("dev-1", Kind.PRESENCE),
                                                       "online", True)
    assert (h_topic, hello["labels"], h_retain) == (TOPICS.device("dev-1", Kind.HELLO),
                                                     {"site": "a"}, False)
    will = s.will()
    assert will.retain
    assert json.loads(will.payload)["state"] == "offline"


def test_health_reports_count_up() -> None:
    s, pub = session(), Recorder()
    s.send_health(pub)
    s.send_health(pub)
    assert [m["seq"] for _, m, _, _ in pub.sent] == [1, 2]


def desired(generation: int, key: Ed25519PrivateKey = KEY, device: str = "dev-1") -> bytes:
    return seal_desired(Signer(key), DesiredState(device_id=device, generation=generation,
                                                  model="m", version="1.0.0", issued_at=T0))


def test_desired_state_is_applied_only_when_signed_newer_and_ours() -> None:
    s = session()
    topic = TOPICS.device("dev-1", Kind.DESIRED)
    s.on_message(topic, desired(2))
    assert s.generation == 2
    s.on_message(topic, desired(1))  # older
    s.on_message(topic, desired(9, key=Ed25519PrivateKey.generate()))  # forged
    s.on_message(topic, desired(9, device="dev-2"))  # someone else's
    s.on_message(topic, b"\xff garbage")
    s.on_message(topic, b"")  # a cleared retained message
    assert s.generation == 2
    s.on_message(topic, desired(3))
    assert s.generation == 3
    assert s.desired is not None
    assert s.desired.model == "m"
