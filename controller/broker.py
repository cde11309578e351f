"""The embedded MQTT broker (amqtt), for one-box deployments and development.

It runs on its own event loop in a daemon thread. Three things differ from stock
amqtt, each for a measured reason (see ../shared/FACTS.md and docs/adr/0002):

* Authentication is a dictionary lookup of sha256(password) per username, not the
  file plugin's argon2 (150-500 ms of the broker's event loop per login).
* Authorisation confines every device to its own topics (``shared.topics`` holds the
  policy), including the topic of its last will, which amqtt never checks.
* On connect, amqtt sends a client the retained messages matching *every* client's
  subscriptions. ``_GuardedBroker`` sends only those matching the client's own.
* amqtt iterates its subscription table across awaits, so a client subscribing
  during a broadcast broke that broadcast; the table now iterates over a snapshot.

Anonymous clients are refused. The broker speaks MQTT 3.1.1 only.
"""

import asyncio
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from controller.security import digest, matches
from controller.settings import HostPort
from shared.topics import Topics

log = logging.getLogger(__name__)


class BrokerStartError(RuntimeError):
    """The embedded broker could not start (most often: the port is taken)."""


@dataclass
class BrokerPolicy:
    """Who may connect and what they may touch. Mutated as devices enrol."""

    topics: Topics
    service_users: dict[str, str] = field(default_factory=dict)  # username -> digest
    devices: dict[str, str] = field(default_factory=dict)  # device id -> digest

    def add_service_user(self, username: str, password: str) -> None:
        self.service_users[username] = digest(password)

    def add_device(self, device_id: str, secret_digest: str) -> None:
        self.devices[device_id] = secret_digest

    def authenticate(self, username: str | None, password: str | None) -> bool:
        if not username or password is None:
            return False
        stored = self.service_users.get(username) or self.devices.get(username)
        return stored is not None and matches(password, stored)

    def may(self, username: str | None, topic: str, action: Action) -> bool:
        if username in self.service_users:
            return True
        if username is None or username not in self.devices:
            return False
        if action == Action.PUBLISH:
            return self.topics.device_may_publish(username, topic)
        if action == Action.SUBSCRIBE:
            return self.topics.device_may_subscribe(username, topic)
        return True  # RECEIVE: subscriptions were already confined


@dataclass
class _PluginConfig:
    policy: Any = None


class DeviceAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Checks username/password against the policy; refuses a will on a foreign topic."""

    Config = _PluginConfig

    async def authenticate(self, *, session: Session) -> bool:
        policy: BrokerPolicy = self.config.policy
        password = session.password
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        if not policy.authenticate(session.username, password):
            log.info("mqtt login refused for %r", session.username)
            return False
        if session.will_flag and not policy.may(session.username, session.will_topic or "",
                                                Action.PUBLISH):
            log.warning("mqtt login refused for %r: will on topic %r is not its own",
                        session.username, session.will_topic)
            return False
        return True


class DeviceTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """Confines devices to their own topics."""

    Config = _PluginConfig

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        policy: BrokerPolicy = self.config.policy
        if session is None or topic is None or action is None:
            return False
        allowed = policy.may(session.username, topic, action)
        if not allowed:
            log.info("mqtt %s on %r refused for %r", action.value, topic, session.username)
        return allowed


class SnapshotDict(dict[str, Any]):
    """A dict whose iteration works on a copy, so it may change while being iterated.

    amqtt's broadcast loop iterates its subscription table across ``await``s; a
    client subscribing or leaving meanwhile raised "dictionary changed size during
    iteration" and the message was not delivered to the remaining subscribers.
    """

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def keys(self) -> list[str]:  # type: ignore[override]
        return list(super().keys())

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return list(super().items())

    def values(self) -> list[Any]:  # type: ignore[override]
        return list(super().values())


class _GuardedBroker(Broker):  # type: ignore[misc]
    """amqtt with retained messages delivered only for the session's own subscriptions,
    and a subscription table that tolerates changes while a message is broadcast."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = SnapshotDict()

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter = subscription[0]
        holders = self._subscriptions.get(topic_filter, [])
        if not any(s.client_id == session.client_id for s, _ in holders):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)


class EmbeddedBroker:
    """Runs the broker in a background thread until ``stop``."""

    def __init__(self, listen: HostPort, policy: BrokerPolicy) -> None:
        self.listen = listen
        self.policy = policy
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedded-broker",
                                        daemon=True)
        self._broker: Broker | None = None

    def _config(self) -> dict[str, Any]:
        plugin_cfg = {"policy": self.policy}
        return {
            "listeners": {"default": {"type": "tcp", "bind": str(self.listen)}},
            "plugins": {
                f"{__name__}.DeviceAuthPlugin": plugin_cfg,
                f"{__name__}.DeviceTopicPlugin": plugin_cfg,
            },
        }

    def start(self, timeout: float = 15.0) -> None:
        """Start listening; raise BrokerStartError if the broker cannot."""
        self._thread.start()

        async def _start() -> None:
            self._broker = _GuardedBroker(self._config())
            await self._broker.start()

        future = asyncio.run_coroutine_threadsafe(_start(), self._loop)
        try:
            future.result(timeout)
        except Exception as exc:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise BrokerStartError(
                f"embedded MQTT broker cannot listen on {self.listen}: {exc}. "
                "Free the port, choose another with --broker-listen, "
                "or use an external broker with --mqtt mqtt://HOST:PORT"
            ) from exc

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down and end its thread."""
        if self._broker is not None:
            future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            try:
                future.result(timeout)
            except Exception:  # shutting down anyway
                log.exception("embedded broker did not shut down cleanly")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
