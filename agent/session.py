"""One device's side of the protocol, independent of how MQTT is driven.

The daemon drives one ``DeviceSession`` with paho's own network thread; the
simulator drives thousands from one select loop. Both call the same methods, so
the simulator exercises the real agent code paths.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from agent import AGENT_VERSION
from agent.config import Identity
from shared.envelope import Verifier, open_desired, public_key_from_text
from shared.errors import ProtocolError, StaleGeneration
from shared.messages import (
    Capabilities,
    DesiredState,
    Event,
    Health,
    Hello,
    InstallState,
    Presence,
    ReportedState,
    encode,
)
from shared.topics import Kind, Topics

log = logging.getLogger(__name__)

HELLO_EVERY = 30  # health reports


def install_outcome(generation: int, state: InstallState, reason: str) -> dict[str, Any]:
    """The install outcome as repeated in every health report (``Health.install_*``)."""
    if generation == 0:
        return {}
    return {"install_generation": generation, "install_state": state,
            "install_reason": reason[:256] or None}


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> object:
        ...


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class DeviceSession:
    """Presence, hello, health and desired-state handling for one device."""

    def __init__(self, identity: Identity, *, capabilities: Callable[[], Capabilities],
                 health: Callable[[int, datetime], Health], labels: dict[str, str],
                 clock: Callable[[], datetime]) -> None:
        self.identity = identity
        self.topics = Topics(identity.topic_root)
        self.device_id = identity.device_id
        self._capabilities = capabilities
        self._health = health
        self._labels = labels
        self._clock = clock
        self._verifier = Verifier.of(public_key_from_text(identity.desired_state_key))
        self._seq = 0
        self.generation = 0
        self.desired: DesiredState | None = None
        self.connected_at = clock()
        #: set by the daemon: a verified desired state, and a fetch response (``data``)
        self.on_desired: Callable[[DesiredState], None] | None = None
        self.on_data: Callable[[bytes], None] | None = None
        self.on_blob: Callable[[str, bytes], None] | None = None  # a shared blob chunk
        self.blob_topics: set[str] = set()  # being downloaded: subscribed again on reconnect

    def will(self) -> Outgoing:
        """The last will: retained ``offline`` presence."""
        return Outgoing(self.topics.device(self.device_id, Kind.PRESENCE),
                        encode(Presence(state="offline", since=self.connected_at)), 1, True)

    def subscriptions(self) -> list[str]:
        kinds = [Kind.DESIRED] if self.on_data is None else [Kind.DESIRED, Kind.DATA]
        return [self.topics.device(self.device_id, kind) for kind in kinds] + sorted(
            self.blob_topics)

    def on_connected(self, pub: Publisher) -> None:
        """Announce presence and capabilities after every (re)connect."""
        self.connected_at = self._clock()
        self._send(pub, Kind.PRESENCE, encode(Presence(state="online", since=self.connected_at)),
                   retain=True)
        self._send_hello(pub)

    def going_offline(self, pub: Publisher) -> None:
        """A clean shutdown: say so, since a clean disconnect sends no will."""
        self._send(pub, Kind.PRESENCE, encode(Presence(state="offline", since=self._clock())),
                   retain=True)

    def send_health(self, pub: Publisher) -> None:
        """A health report; every ``HELLO_EVERY``-th is followed by the hello again, so a
        controller that lost it (a broker queue overflowing) learns the capabilities."""
        self._seq += 1
        self._send(pub, Kind.HEALTH, encode(self._health(self._seq, self._clock())), qos=0)
        if self._seq % HELLO_EVERY == 0:
            self._send_hello(pub)

    def _send_hello(self, pub: Publisher) -> None:
        self._send(pub, Kind.HELLO, encode(Hello(
            agent_version=AGENT_VERSION, capabilities=self._capabilities(), labels=self._labels,
            sent_at=self._clock())))

    def on_message(self, topic: str, payload: bytes) -> None:
        """Route a controller message; a bad one is logged and dropped."""
        blob = self.topics.blob_digest(topic)
        if blob is not None:
            if self.on_blob is not None:
                self.on_blob(blob, payload)
            return
        try:
            where = self.topics.parse(topic)
        except ProtocolError as exc:
            log.warning("dropped a message on %r: %s", topic, exc)
            return
        if where.device_id != self.device_id:
            return
        if where.kind == Kind.DATA and self.on_data is not None:
            self.on_data(payload)
        elif where.kind == Kind.DESIRED and payload:
            self._on_desired(topic, payload)

    def _on_desired(self, topic: str, payload: bytes) -> None:
        try:
            desired = open_desired(self._verifier, payload, device_id=self.device_id,
                                   last_generation=self.generation)
        except StaleGeneration as exc:
            if exc.generation < exc.current:
                log.warning("refused desired state: %s", exc)
            return
        except ProtocolError as exc:
            log.warning("refused desired state on %r: %s", topic, exc)
            return
        self.generation, self.desired = desired.generation, desired
        log.info("desired state generation %d: %s@%s", desired.generation, desired.model,
                 desired.version)
        if self.on_desired is not None:
            self.on_desired(desired)

    def send_event(self, pub: Publisher, kind: str, generation: int, detail: str) -> None:
        self._send(pub, Kind.EVENTS, encode(Event(kind=kind, generation=generation,
                                                  detail=detail[:2048], at=self._clock())))

    def send_reported(self, pub: Publisher, reported: ReportedState) -> None:
        self._send(pub, Kind.REPORTED, encode(reported), retain=True)

    def send_fetch(self, pub: Publisher, payload: bytes) -> None:
        # QoS 0: a request lost with the connection is not sent again when it returns
        # (the fetcher asks again for whatever does not come, once); redelivered requests
        # are answered in full, and on a 2 Mbit/s link made a download cut by a 30 s
        # outage cost 2.3 times its size
        self._send(pub, Kind.FETCH, payload, qos=0)

    def _send(self, pub: Publisher, kind: Kind, payload: bytes, *, qos: int = 1,
              retain: bool = False) -> None:
        pub.publish(self.topics.device(self.device_id, kind), payload, qos=qos, retain=retain)
