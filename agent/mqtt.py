"""paho-mqtt clients for devices: one per device, driven by paho or by a shared loop.

``device_client`` configures a client (credentials, TLS, last will, callbacks that
only hand off to the session). ``MultiLoop`` drives many clients from one thread
with select(), for the simulator and benchmarks: one thread per device does not
scale past a few hundred.
"""

import contextlib
import logging
import random
import selectors
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.session import DeviceSession
from shared.net import tcp_nodelay

log = logging.getLogger(__name__)


def parse_broker(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp") or not parts.hostname:
        raise ValueError(f"expected mqtt://HOST:PORT, got {url!r}")
    tls = parts.scheme == "mqtts"
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


def device_client(session: DeviceSession, *,
                  on_up: Callable[[], None] | None = None,
                  on_down: Callable[[], None] | None = None,
                  bind_address: str = "") -> mqtt.Client:
    """A paho client for ``session``'s device; not yet connected."""
    ident = session.identity
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=ident.device_id,
                         protocol=mqtt.MQTTv311, clean_session=True)
    client.username_pw_set(ident.mqtt_username, ident.mqtt_password)
    if parse_broker(ident.mqtt_url)[2]:
        client.tls_set()
    will = session.will()
    client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.on_socket_open = tcp_nodelay

    def on_connect(c: mqtt.Client, _u: object, _f: object, reason: ReasonCode,
                   _p: object) -> None:
        if reason.is_failure:
            log.error("broker refused %s: %s", ident.device_id, reason)
            return
        c.subscribe([(topic, 1) for topic in session.subscriptions()])
        session.on_connected(c)
        if on_up:
            on_up()

    def on_disconnect(_c: mqtt.Client, _u: object, _f: object, reason: ReasonCode,
                      _p: object) -> None:
        if on_down:
            on_down()
        if reason.value != 0:
            log.info("%s lost the broker (%s)", ident.device_id, reason)

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        session.on_message(msg.topic, bytes(msg.payload))

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    client._edgefleet_bind = bind_address  # type: ignore[attr-defined]
    return client


class MultiLoop:
    """Drives many paho clients from one thread; reconnects with jittered backoff."""

    def __init__(self, broker_url: str, keepalive: int) -> None:
        self.host, self.port, _ = parse_broker(broker_url)
        self.keepalive = keepalive
        self.clients: list[mqtt.Client] = []
        self._retry_at: dict[int, float] = {}
        self._backoff: dict[int, float] = {}
        self._sel = selectors.PollSelector()  # stateless: safe when fds are reused
        self._registered: dict[int, object] = {}

    def add(self, client: mqtt.Client) -> None:
        self.clients.append(client)
        self._retry_at[id(client)] = 0.0

    def _connect(self, client: mqtt.Client, now: float) -> None:
        key = id(client)
        try:
            client.connect(self.host, self.port, keepalive=self.keepalive,
                           bind_address=getattr(client, "_edgefleet_bind", ""))
            self._backoff[key] = 1.0
            self._retry_at.pop(key, None)
        except OSError as exc:
            delay = min(self._backoff.get(key, 1.0) * 2, 30.0)
            self._backoff[key] = delay
            self._retry_at[key] = now + delay * random.uniform(0.5, 1.0)  # noqa: S311
            log.debug("connect failed (%s); retry in %.1fs", exc, delay)

    def step(self, timeout: float = 0.1) -> None:
        """One round: connect what is due, read and write what is ready, run timers."""
        now = time.monotonic()
        for client in self.clients:
            key = id(client)
            if key in self._retry_at and self._retry_at[key] <= now:
                self._connect(client, now)
        self._sync_selector()
        if not self._registered:
            time.sleep(timeout)
            return
        for selkey, events in self._sel.select(timeout):
            client = selkey.data
            if events & selectors.EVENT_READ:
                client.loop_read()
            if events & selectors.EVENT_WRITE:
                client.loop_write()
        for client in self.clients:
            if client.socket() is None:
                continue
            if client.want_write():
                client.loop_write()
            client.loop_misc()  # keepalive; a connection it drops is rescheduled below

    def _sync_selector(self) -> None:
        """Poll the live sockets; schedule a jittered reconnect for each client without one."""
        live = {}
        for client in self.clients:
            sock = client.socket()
            if sock is None:
                if id(client) not in self._retry_at:
                    self._retry_at[id(client)] = time.monotonic() + random.uniform(0.5, 1.5)  # noqa: S311
                continue
            live[sock.fileno()] = client
        for fd in list(self._registered):
            if fd not in live or self._registered[fd] is not live[fd]:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(fd)
                del self._registered[fd]
        for fd, client in live.items():
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
            if fd in self._registered:
                self._sel.modify(fd, events, client)
            else:
                self._sel.register(fd, events, client)
                self._registered[fd] = client

    def close(self) -> None:
        for client in self.clients:
            if client.socket() is not None:
                client.disconnect()
                client.loop_write()
        self._sel.close()
