"""Topic names: the only place a topic string is built or parsed.

Layout: ``<root>/dev/<device_id>/<kind>``, with root ``ef/v1`` unless a deployment
sets another (tests use a unique root per run to share one broker). The access
policy (which topics a device may publish or subscribe) lives here too, so the
embedded broker's ACL and generated broker configs agree with the protocol.
"""

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from shared.errors import TopicError

DEFAULT_ROOT = "ef/v1"
_DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ROOT_LEVEL = re.compile(r"^[A-Za-z0-9_.-]+$")


class Kind(StrEnum):
    """What a per-device topic carries."""

    HELLO = "hello"  # device -> controller: identity and capabilities, on every connect
    PRESENCE = "presence"  # device -> controller, retained; the last will says "offline"
    HEALTH = "health"  # device -> controller, periodic
    REPORTED = "reported"  # device -> controller, retained: what the device runs
    EVENTS = "events"  # device -> controller: install progress
    DESIRED = "desired"  # controller -> device, retained and signed
    FETCH = "fetch"  # device -> controller: a request for a chunk of metadata or a blob
    DATA = "data"  # controller -> device: the chunk (``shared.fetch``)


_KIND_BY_VALUE = {kind.value: kind for kind in Kind}
DEVICE_PUBLISHES = frozenset({Kind.HELLO, Kind.PRESENCE, Kind.HEALTH, Kind.REPORTED, Kind.EVENTS,
                              Kind.FETCH})
DEVICE_SUBSCRIBES = frozenset({Kind.DESIRED, Kind.DATA})


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is a valid id (lowercase, digits, dashes; 1-64 chars)."""
    if not _DEVICE_ID.match(device_id):
        raise TopicError(f"invalid device id {device_id!r}")
    return device_id


class DeviceTopic(NamedTuple):
    """A parsed per-device topic (a tuple: parsing is on the ingest hot path)."""

    device_id: str
    kind: Kind


@dataclass(frozen=True)
class Topics:
    """Builds and parses topics under one root."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        levels = self.root.split("/")
        if not all(_ROOT_LEVEL.match(level) for level in levels):
            raise TopicError(f"invalid topic root {self.root!r}")

    def device(self, device_id: str, kind: Kind) -> str:
        """The topic of one kind for one device."""
        return f"{self.root}/dev/{validate_device_id(device_id)}/{kind.value}"

    def blob(self, sha256: str) -> str:
        """Where the chunks of a signed blob are broadcast to every device fetching it."""
        if not _SHA256.match(sha256):
            raise TopicError(f"invalid blob digest {sha256!r}")
        return f"{self.root}/blob/{sha256}"

    def blob_digest(self, topic: str) -> str | None:
        """The digest of a blob topic, or None if ``topic`` is not one."""
        prefix = f"{self.root}/blob/"
        rest = topic[len(prefix):] if topic.startswith(prefix) else ""
        return rest if _SHA256.match(rest) else None

    def all_devices(self, kind: Kind) -> str:
        """A subscription filter matching ``kind`` for every device."""
        return f"{self.root}/dev/+/{kind.value}"

    def parse(self, topic: str) -> DeviceTopic:
        """Split a per-device topic into device id and kind; raise TopicError otherwise."""
        prefix = f"{self.root}/dev/"
        if not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is not under {prefix!r}")
        rest = topic[len(prefix) :].split("/")
        if len(rest) != 2:
            raise TopicError(f"topic {topic!r} is not <root>/dev/<id>/<kind>")
        device_id, kind = rest
        parsed_kind = _KIND_BY_VALUE.get(kind)
        if parsed_kind is None:
            raise TopicError(f"unknown topic kind {kind!r}")
        return DeviceTopic(validate_device_id(device_id), parsed_kind)

    def route(self, topic: str) -> tuple[str, str] | None:
        """Fast split of ``<root>/dev/<id>/<kind>`` into raw strings, without validation.

        For the controller's receive path, where the device id is then checked
        against the set of enrolled devices (which only holds valid ids) and the
        kind against DEVICE_PUBLISHES. Returns None for anything else.
        """
        prefix = self.root + "/dev/"
        if not topic.startswith(prefix):
            return None
        device_id, sep, kind = topic[len(prefix):].partition("/")
        if not sep or "/" in kind:
            return None
        return device_id, kind

    def device_may_publish(self, device_id: str, topic: str) -> bool:
        """Whether a device may publish on ``topic``: only its own device-side kinds."""
        return self._own(device_id, topic, DEVICE_PUBLISHES)

    def device_may_subscribe(self, device_id: str, topic_filter: str) -> bool:
        """Whether a device may subscribe to ``topic_filter``: only its own topics and
        single blob topics (signed blobs, readable fleet-wide), no wildcards."""
        if "+" in topic_filter or "#" in topic_filter:
            return False
        if self.blob_digest(topic_filter) is not None:
            return True
        return self._own(device_id, topic_filter, DEVICE_SUBSCRIBES)

    def mosquitto_acl(self, controller_user: str) -> str:
        """A Mosquitto ``acl_file`` with the rules ``device_may_publish`` and
        ``device_may_subscribe`` apply on the embedded broker: each device (MQTT username =
        device id, ``%u``) writes and reads only its own topics and reads blob topics;
        ``controller_user`` reads and writes everything under the root."""
        lines = ["# edgefleet: generated by `edgefleet controller mosquitto-acl`; pair it with",
                 "# allow_anonymous false and a password_file holding every device's secret.",
                 f"user {controller_user}", f"topic readwrite {self.root}/#", "",
                 "# every other user is a device; %u is its id"]
        lines += [f"pattern write {self.root}/dev/%u/{k.value}" for k in sorted(DEVICE_PUBLISHES)]
        lines += [f"pattern read {self.root}/dev/%u/{k.value}" for k in sorted(DEVICE_SUBSCRIBES)]
        lines.append(f"pattern read {self.root}/blob/+")  # signed blobs, readable fleet-wide
        return "\n".join(lines) + "\n"

    def _own(self, device_id: str, topic: str, kinds: frozenset[Kind]) -> bool:
        try:
            parsed = self.parse(topic)
        except TopicError:
            return False
        return parsed.device_id == device_id and parsed.kind in kinds
