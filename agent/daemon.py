"""``edgefleet agent run``: one device, its MQTT connection and its health timer."""

import logging
import signal
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from agent import probe
from agent.config import AgentConfig, Identity
from agent.mqtt import device_client, parse_broker
from agent.session import DeviceSession

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


def run(config_path: Path) -> None:
    """Run until SIGTERM/SIGINT; reconnects to the broker with backoff on its own."""
    config = AgentConfig.load(config_path)
    identity = Identity.load(config.state_dir).with_overrides(config)
    session = DeviceSession(
        identity,
        capabilities=lambda: probe.capabilities(config.state_dir),
        health=lambda seq, now: probe.health(seq, now, config.state_dir),
        labels=config.labels,
        clock=_now,
    )
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    client = device_client(session)
    host, port, _ = parse_broker(identity.mqtt_url)
    client.connect_async(host, port, keepalive=identity.keepalive_s)
    client.loop_start()
    log.info("agent %s starting; broker %s", identity.device_id, identity.mqtt_url)
    try:
        while not stop.wait(identity.health_interval_s):
            if client.is_connected():
                session.send_health(client)
    finally:
        if client.is_connected():
            session.going_offline(client)
        client.disconnect()
        client.loop_stop()
