"""``edgefleet sim``: many simulated devices in one process, on the real agent code.

Each simulated device enrols over HTTP like a real one, then runs a real
``DeviceSession`` over its own MQTT connection; only capabilities and health
figures are made up, from a mix of hardware profiles. Clients are spread over
several 127.x.y.z source addresses when the broker is local, so large fleets do not
exhaust one address's ephemeral ports.
"""

import heapq
import itertools
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from agent.config import ConfigError, Identity, write_private
from agent.enroll import request_enrolment
from agent.mqtt import MultiLoop, device_client, parse_broker
from agent.session import DeviceSession
from agent.simdevice import Faults, SimDevice
from shared.messages import Capabilities, Health, Runtime

log = logging.getLogger(__name__)

GIB = 1 << 30
ORT = Runtime(name="onnxruntime", version="1.32.0", providers=("CPUExecutionProvider",))
LLAMA = Runtime(name="llama.cpp", version="0.3.36")


@dataclass(frozen=True)
class Profile:
    """A kind of simulated hardware."""

    name: str
    arch: str
    cpu_count: int
    ram_bytes: int
    runtimes: tuple[Runtime, ...]
    flags: tuple[str, ...] = ()


PROFILES = {
    "mixed": (
        Profile("pi4-2g", "arm64", 4, 2 * GIB, (ORT,), ("asimd", "neon")),
        Profile("jetson-8g", "arm64", 6, 8 * GIB, (ORT, LLAMA), ("asimd", "neon")),
        Profile("nuc-16g", "x86_64", 8, 16 * GIB, (ORT, LLAMA), ("avx2", "fma")),
        Profile("gateway-1g", "x86_64", 2, 1 * GIB, (ORT,), ("sse4_2",)),
    ),
}


def sim_capabilities(profile: Profile) -> Capabilities:
    return Capabilities(arch=profile.arch, cpu_count=profile.cpu_count, cpu_flags=profile.flags,
                        ram_bytes=profile.ram_bytes, disk_free_bytes=32 * GIB,
                        runtimes=profile.runtimes)


def sim_health(profile: Profile, rng: random.Random) -> Callable[[int, datetime], Health]:
    def health(seq: int, now: datetime) -> Health:
        used = int(profile.ram_bytes * rng.uniform(0.2, 0.6))
        return Health(seq=seq, sent_at=now, cpu_percent=round(rng.uniform(2, 60), 1),
                      mem_used_bytes=used, mem_total_bytes=profile.ram_bytes,
                      disk_free_bytes=32 * GIB, temperature_c=round(rng.uniform(35, 70), 1))

    return health


def _now() -> datetime:
    return datetime.now(UTC)


def sim_session(identity: Identity, profile: Profile, rng: random.Random, *,
                health: Callable[[int, datetime], Health] | None = None) -> DeviceSession:
    """The real device session of ``identity``, with ``profile``'s hardware."""
    return DeviceSession(identity, capabilities=partial(sim_capabilities, profile),
                         health=health or sim_health(profile, rng),
                         labels={"profile": profile.name}, clock=_now)


def enroll_fleet(controller: str, token: str, count: int, *, state_dir: Path | None,
                 labels: dict[str, str], workers: int = 8) -> list[Identity]:
    """Enrol ``count`` devices (reusing identities saved in ``state_dir``)."""
    saved: list[Identity] = []
    path = state_dir / "sim-identities.json" if state_dir else None
    if path and path.exists():
        saved = [Identity.from_enrolment(d) for d in json.loads(path.read_text())]
    needed = max(0, count - len(saved))

    def one(i: int) -> Identity:
        return request_enrolment(controller, token, name=f"sim-{len(saved) + i:05d}",
                                 labels={**labels, "sim": "true"})

    with ThreadPoolExecutor(workers) as pool:
        fresh = list(pool.map(one, range(needed)))
    identities = (saved + fresh)[:count]
    if path:
        write_private(path, json.dumps([vars(i) for i in saved + fresh]))
    return identities


def _source_address(index: int, host: str) -> str:
    if not host.startswith("127."):
        return ""
    return f"127.0.{1 + index // 4000}.{1 + index % 250}"


class Simulator:
    """Runs the sessions of many simulated devices on one MultiLoop."""

    def __init__(self, identities: list[Identity], *, profile: str = "mixed",
                 seed: int = 0, faults: Faults | None = None, step_s: float = 0.2) -> None:
        if not identities:
            raise ConfigError("no devices to simulate")
        if profile not in PROFILES:
            raise ConfigError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
        rng = random.Random(seed)  # noqa: S311
        first = identities[0]
        host = parse_broker(first.mqtt_url)[0]
        self.loop = MultiLoop(first.mqtt_url, first.keepalive_s)
        self.sessions: list[DeviceSession] = []
        self.devices: list[SimDevice] = []
        self.online = 0
        self._lock = threading.Lock()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        for index, ident in enumerate(identities):
            prof = PROFILES[profile][index % len(PROFILES[profile])]
            device_rng = random.Random(rng.random())  # noqa: S311
            device = SimDevice(prof.name, device_rng, faults=faults or {},
                               schedule=self._schedule, ram_bytes=prof.ram_bytes, step_s=step_s)
            session = sim_session(ident, prof, device_rng, health=device.health)
            client = device_client(session, on_up=self._up, on_down=self._down,
                                   bind_address=_source_address(index, host))
            device.bind(session, client)
            self.sessions.append(session)
            self.devices.append(device)
            self.loop.add(client)
        self.health_interval = first.health_interval_s

    def _schedule(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` from the loop after ``delay`` seconds (loop thread only)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), callback))

    def _run_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            heapq.heappop(self._timers)[2]()

    def _up(self) -> None:
        with self._lock:
            self.online += 1

    def _down(self) -> None:
        with self._lock:
            self.online -= 1

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set, spreading health reports evenly over the interval."""
        n = len(self.sessions)
        spacing = self.health_interval / n
        next_at = time.monotonic() + self.health_interval
        cursor = 0
        clients = self.loop.clients
        while not stop.is_set():
            self.loop.step(timeout=min(0.05, spacing))
            now = time.monotonic()
            self._run_timers(now)
            while next_at <= now:
                session, client = self.sessions[cursor], clients[cursor]
                if client.is_connected():
                    session.send_health(client)
                cursor = (cursor + 1) % n
                next_at += spacing
        for session, client in zip(self.sessions, clients, strict=True):
            if client.is_connected():
                session.going_offline(client)
        self.loop.close()
