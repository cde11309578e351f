"""The controller's MQTT connection: device messages in, desired states out.

Callbacks run on paho's network thread and only parse the topic, check the device
is known and hand the raw payload to the ingest worker, which decodes it. A message
on a malformed topic or from an unknown device is counted and dropped.

With ``share_group``, the messages one controller replica should handle for all
(health reports, install events, fetch requests) come through a shared subscription:
the broker hands each to one replica of the group. Retained kinds (hello, presence,
reported) stay plain subscriptions, since a broker does not deliver retained messages
on shared ones, and every replica sees them (writing them twice is harmless).
"""

import logging
import secrets
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from controller.settings import MqttUrl
from shared.net import tcp_nodelay
from shared.topics import DEVICE_PUBLISHES, Kind, Topics

log = logging.getLogger(__name__)

_DEVICE_KINDS = frozenset(kind.value for kind in DEVICE_PUBLISHES)
SHARED_KINDS = frozenset({Kind.HEALTH, Kind.EVENTS, Kind.FETCH})  # one replica handles each
Sink = Callable[[str, str, bytes, float], None]  # device id, kind, payload, time.time()
Route = tuple[str, str, Sink]
_ROUTE_CACHE = 500_000  # topics; about 5 per device
_now = time.time
_MAX_IN_FLIGHT = 100_000  # publishes timed at once; more go untimed


class _DirectClient(mqtt.Client):
    """paho's client, handing every message straight to ``on_message``.

    The bridge registers no per-topic callbacks, so paho's per-message dispatch (decode
    the topic, walk an empty filter tree, take the callback lock) bought nothing and cost
    about a tenth of the network thread under load (py-spy on bench/ingest.py). A
    callback that raises is logged; it never stops the network loop.
    """

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        on_message = self.on_message
        if on_message is None:
            return
        try:
            on_message(self, self._userdata, message)
        except Exception:
            log.exception("a message on %r could not be handled", message._topic)


class Bridge:
    """Subscribes to every device's messages and passes them to ``sink``."""

    def __init__(self, url: MqttUrl, topics: Topics, *,
                 sink: Callable[[str], Sink],
                 is_known: Callable[[str], bool], keepalive: int = 30,
                 observe_publish: Callable[[float], None] | None = None,
                 share_group: str | None = None) -> None:
        self.url = url
        self.topics = topics
        self._share_group = share_group
        self._sink = sink
        self._is_known = is_known
        self._keepalive = keepalive
        self.connected = threading.Event()
        self.dropped_malformed = 0
        self.dropped_unknown = 0
        self._routes: dict[bytes, Route] = {}  # raw topic -> (device id, kind, sink)
        self._observe = observe_publish
        self._handlers: list[str] = []  # extra exact topics (add_handler)
        self._in_flight: dict[int, float] = {}  # mid -> when handed to paho (QoS 1)
        self._acked_early: set[int] = set()  # acknowledged before publish() returned
        self._flight_lock = threading.Lock()
        self._client = _DirectClient(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-controller-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if url.username:
            self._client.username_pw_set(url.username, url.password)
        if url.tls:
            self._client.tls_set()
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_socket_open = tcp_nodelay
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish

    def start(self, timeout: float = 15.0) -> None:
        """Connect and start the network thread; raise if not connected in time."""
        self._client.connect_async(self.url.host, self.url.port, keepalive=self._keepalive)
        self._client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            raise ConnectionError(f"could not connect to the MQTT broker at {self.url.public()}")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def add_handler(self, topic: str, handler: Callable[[bytes], None]) -> None:
        """Also subscribe to ``topic`` (an exact topic, outside the device tree) and pass
        its payloads to ``handler``; call before ``start``."""
        self._handlers.append(topic)
        self._routes[topic.encode()] = ("", topic, lambda _d, _k, payload, _at: handler(payload))

    def resubscribe(self) -> None:
        """Subscribe again (after the broker granted the controller more rights)."""
        self._subscribe(self._client)

    def _subscribe(self, client: mqtt.Client) -> None:
        client.subscribe([(self._filter(kind), 1) for kind in sorted(DEVICE_PUBLISHES)]
                         + [(topic, 1) for topic in self._handlers])

    def _filter(self, kind: Kind) -> str:
        every = self.topics.all_devices(kind)
        if self._share_group and kind in SHARED_KINDS:
            return f"$share/{self._share_group}/{every}"
        return every

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        started = time.perf_counter()
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0 or self._observe is None:
            return
        with self._flight_lock:
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
                self._observe(time.perf_counter() - started)
            elif len(self._in_flight) < _MAX_IN_FLIGHT:  # a lost session never acks
                self._in_flight[info.mid] = started

    def _on_publish(self, _client: mqtt.Client, _userdata: object, mid: int,
                    _reason: object, _props: object) -> None:
        if self._observe is None:
            return
        with self._flight_lock:
            started = self._in_flight.pop(mid, None)
            if started is not None:
                self._observe(time.perf_counter() - started)
            elif len(self._acked_early) < _MAX_IN_FLIGHT:
                self._acked_early.add(mid)

    def _on_connect(self, client: mqtt.Client, _userdata: object, _flags: object,
                    reason: ReasonCode, _props: object) -> None:
        if reason.is_failure:
            log.error("MQTT broker refused the controller: %s", reason)
            return
        self._subscribe(client)
        log.info("connected to MQTT broker %s", self.url.public())
        self.connected.set()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: object, _flags: object,
                       reason: ReasonCode, _props: object) -> None:
        self.connected.clear()
        if reason.value != 0:
            log.warning("lost the MQTT broker (%s); reconnecting", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: object,
                    msg: mqtt.MQTTMessage) -> None:
        # The network thread only routes; decoding happens in the ingest worker. Routes
        # are keyed by the topic's raw bytes, so a known topic is never decoded again.
        route = self._routes.get(msg._topic)
        if route is None:
            route = self._route(msg._topic)
            if route is None:
                return
        payload = msg.payload
        if payload:  # empty: a cleared retained message
            route[2](route[0], route[1], bytes(payload), _now())

    def _route(self, raw: bytes) -> Route | None:
        """Route a topic not seen before; cache it once its device is known to be enrolled."""
        try:
            topic = raw.decode()
        except UnicodeDecodeError:
            topic = None
        route = self.topics.route(topic) if topic is not None else None
        if route is None or route[1] not in _DEVICE_KINDS:
            self.dropped_malformed += 1
            log.warning("dropped message on unexpected topic %r", raw)
            return None
        if not self._is_known(route[0]):
            self.dropped_unknown += 1
            return None
        routed = (route[0], route[1], self._sink(route[1]))
        if len(self._routes) < _ROUTE_CACHE:
            self._routes[raw] = routed
        return routed

    def forget(self, device_id: str) -> None:
        """Stop routing a deleted device's messages."""
        self._routes = {t: r for t, r in self._routes.items() if r[0] != device_id}
