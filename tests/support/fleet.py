"""``fetch_spy``: what devices ask the controller for (fetch requests, per device, read
off the broker), for tests of real agents (``cli.realfleet``).

A spy needs a broker that lets it subscribe to devices' topics: Mosquitto as the tests
run it (``EDGEFLEET_TEST_MQTT_URL``, anonymous on 127.0.0.1). The embedded broker admits
only enrolled devices, each to its own topics, so a spy there is refused.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt import parse_broker
from shared.fetch import FetchRequest, decode_request, target_digest
from shared.topics import Kind, Topics


@dataclass(frozen=True)
class Asked:
    device_id: str
    request: FetchRequest

    @property
    def blob(self) -> str | None:
        """The sha256 of the blob asked for (None: metadata)."""
        return target_digest(self.request.path)


class FetchSpy:
    """Every fetch request devices publish, in arrival order (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._asked: list[Asked] = []

    def asked(self, device_id: str | None = None) -> list[Asked]:
        with self._lock:
            return [a for a in self._asked if device_id in (None, a.device_id)]

    def clear(self) -> None:
        with self._lock:
            self._asked.clear()

    def _on(self, device_id: str, payload: bytes) -> None:
        request = decode_request(payload)
        with self._lock:
            self._asked.append(Asked(device_id, request))


@contextmanager
def fetch_spy(mqtt_url: str, topic_root: str) -> Iterator[FetchSpy]:
    """A ``FetchSpy`` subscribed to every device's fetch topic until the block ends."""
    topics, spy = Topics(topic_root), FetchSpy()
    host, port, _ = parse_broker(mqtt_url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-fetch-spy")
    subscribed = threading.Event()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        where = topics.parse(msg.topic)
        if where.kind == Kind.FETCH:
            spy._on(where.device_id, msg.payload)

    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect(host, port)
    client.subscribe(topics.all_devices(Kind.FETCH), qos=1)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise RuntimeError(f"the fetch spy could not subscribe on {mqtt_url}")
        yield spy
    finally:
        client.disconnect()
        client.loop_stop()
