"""The bridge's receive path: routing, unknown devices, forgetting deleted ones."""

import paho.mqtt.client as mqtt
import pytest

from controller.bridge import Bridge
from controller.settings import MqttUrl
from shared.topics import Kind, Topics

TOPICS = Topics("t/ef/v1")


def message(topic: str, payload: bytes) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(topic=topic.encode(errors="surrogateescape"))
    msg.payload = payload
    return msg


def bridge(known: set[str], sunk: list) -> Bridge:
    return Bridge(MqttUrl("127.0.0.1", 1), TOPICS,
                  sink=lambda _kind: lambda *a: sunk.append(a[:3]), is_known=known.__contains__)


def test_known_devices_are_routed_and_others_counted_and_dropped() -> None:
    known, sunk = {"dev-a"}, []
    b = bridge(known, sunk)
    b._on_message(None, None, message(TOPICS.device("dev-a", Kind.HEALTH), b"{}"))
    b._on_message(None, None, message(TOPICS.device("dev-b", Kind.HEALTH), b"{}"))
    b._on_message(None, None, message(TOPICS.device("dev-a", Kind.DESIRED), b"{}"))
    b._on_message(None, None, message("elsewhere/x", b"{}"))
    b._on_message(None, None, message("t/ef/v1/dev/\udcff/health", b"{}"))  # not UTF-8
    b._on_message(None, None, message(TOPICS.device("dev-a", Kind.PRESENCE), b""))  # cleared
    assert sunk == [("dev-a", "health", b"{}")]
    assert (b.dropped_unknown, b.dropped_malformed) == (1, 3)


def test_a_forgotten_device_is_no_longer_routed() -> None:
    known, sunk = {"dev-a"}, []
    b = bridge(known, sunk)
    topic = TOPICS.device("dev-a", Kind.HEALTH)
    b._on_message(None, None, message(topic, b"1"))  # routed and cached
    known.discard("dev-a")
    b.forget("dev-a")
    b._on_message(None, None, message(topic, b"2"))
    assert sunk == [("dev-a", "health", b"1")]
    assert b.dropped_unknown == 1


def test_paho_hands_messages_straight_to_the_bridge_and_survives_a_failing_sink(
        caplog: pytest.LogCaptureFixture) -> None:
    known, sunk = {"dev-a"}, []
    b = bridge(known, sunk)
    topic = TOPICS.device("dev-a", Kind.HEALTH)
    b._client._handle_on_message(message(topic, b"1"))  # as paho's network loop calls it
    assert sunk == [("dev-a", "health", b"1")]

    def fail(*_args: object) -> None:
        raise RuntimeError("the ingest queue is broken")

    failing = Bridge(MqttUrl("127.0.0.1", 1), TOPICS, sink=lambda _kind: fail,
                     is_known=known.__contains__)
    failing._client._handle_on_message(message(topic, b"2"))  # logged, not raised
    assert "could not be handled" in caplog.text
