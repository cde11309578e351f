"""``edgefleet agent run``: one device, its MQTT connection and its health timer."""

import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from agent import limits, localauth, probe, systemd
from agent.config import AgentConfig, Identity
from agent.link import DeviceLink
from agent.metrics import AgentMetrics
from agent.probes import Prober
from agent.serving import LocalApi, Serving
from agent.session import DeviceSession, Publisher
from agent.update.installer import Install, Installer, Room
from shared.messages import ReportedState

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


def run(config_path: Path) -> None:
    """Run until SIGTERM/SIGINT; reconnects to the broker with backoff on its own."""
    config = AgentConfig.load(config_path)
    identity = Identity.load(config.state_dir).with_overrides(config)
    limits.remove_stale()  # worker cgroups of an agent that was killed
    serving = Serving(memory_limit=config.memory_limit_bytes, max_queue=config.max_queue,
                      parallel=config.onnx_parallel)
    session = DeviceSession(
        identity,
        capabilities=lambda: probe.capabilities(config.state_dir, config.memory_limit_bytes),
        health=lambda seq, now: probe.health(seq, now, config.state_dir,
                                             serving.health() | installer.health()),
        labels=config.labels,
        clock=_now,
    )
    stop = threading.Event()
    link = DeviceLink(identity, config.state_dir, session, chunk_size=config.fetch_chunk_bytes)
    client = link.client
    installer = Installer(config.state_dir, updater=link.updater,
                          reporter=SessionReporter(session, client, serving.metrics),
                          serving=serving, download=link.download,
                          probation_s=config.probation_s,
                          ram_free=_ram_free(serving, config.memory_limit_bytes))
    link.progress = installer.progress  # download progress events
    session.generation = installer.install.generation
    session.on_desired = installer.want
    host, _, port = config.inference_listen.rpartition(":")
    api = LocalApi(serving, host or "127.0.0.1", int(port), token=localauth.token(config))
    prober = Prober(serving, installer.probe)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    link.connect()
    installer.start()  # loads the active model first
    api.start()
    prober.start()
    log.info("agent %s starting; broker %s; local API on %s", identity.device_id,
             identity.mqtt_url, config.inference_listen)
    systemd.notify("READY=1")
    interval = identity.health_interval_s
    tick = min(interval, systemd.watchdog_interval() or interval)
    due = time.monotonic() + interval
    try:
        while not stop.wait(tick):
            systemd.notify("WATCHDOG=1")  # this loop still turns
            if time.monotonic() >= due:
                due = time.monotonic() + interval
                if client.is_connected():
                    session.send_health(client)
    finally:
        systemd.notify("STOPPING=1")
        api.stop()
        prober.stop()
        installer.stop()
        serving.activate(None)
        if client.is_connected():
            session.going_offline(client)
        link.close()


def _ram_free(serving: Serving, limit: int | None) -> Callable[[], Room]:
    """What a new model may take: the host's available memory, within a memory limit,
    beside the running model or once it is stopped."""
    def room() -> Room:
        import psutil

        used = serving.worker_rss() or 0
        available = int(psutil.virtual_memory().available)
        cap = available + used if limit is None else limit
        return Room(beside=max(0, min(available, cap - used)), alone=min(available + used, cap))

    return room


class SessionReporter:
    """Install news to the controller: an event per step, the reported state at the end."""

    def __init__(self, session: DeviceSession, client: Publisher,
                 metrics: AgentMetrics) -> None:
        self._session, self._client, self._metrics = session, client, metrics

    def event(self, kind: str, generation: int, detail: str) -> None:
        self._session.send_event(self._client, kind, generation, detail or "")

    def reported(self, install: Install) -> None:
        self._metrics.installs.labels(install.state.value).inc()
        self._session.send_reported(self._client, ReportedState(
            generation=install.generation, model=install.model, version=install.version,
            variant=install.variant, state=install.state, detail=install.reason[:2048]))
