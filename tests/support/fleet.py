"""Harnesses for tests and benchmarks that run real agents.

- ``RealFleet``: N agents running the real daemon (``edgefleet agent run``: MQTT link,
  TUF over MQTT, installer, model worker, local API), each with its own state dir,
  config and local API port, enrolled like real boxes; each can be SIGKILLed and
  started again. ``memory_limit`` puts agents in different RAM tiers (device classes).
- ``Traffic``: a load generator driving each agent's local API with real inputs at a
  set rate, so the health figures the controller judges are what the agents measured.
- ``fetch_spy``: what devices ask the controller for (fetch requests, per device, read
  off the broker).

A spy needs a broker that lets it subscribe to devices' topics: Mosquitto as the tests
run it (``EDGEFLEET_TEST_MQTT_URL``, anonymous on 127.0.0.1). The embedded broker admits
only enrolled devices, each to its own topics, so a spy there is refused.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class RealAgent:
    """One enrolled agent: its files, its local API and (while running) its process."""

    name: str
    config: Path
    state: Path
    local: str  # the local inference API's base URL
    device_id: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    link: Any = None  # a tests.support.links.ShapedLink it runs behind, if any

    def models(self) -> list[dict[str, Any]]:
        """What its local API says it serves (``GET /v1/models``)."""
        with urllib.request.urlopen(f"{self.local}/v1/models", timeout=10) as resp:  # noqa: S310
            return list(json.loads(resp.read())["data"])

    def serves(self) -> str | None:
        """``name@version`` of the model it serves, or None (also while it is down)."""
        try:
            models = self.models()
        except OSError:
            return None
        return f"{models[0]['id']}@{models[0]['version']}" if models else None


class RealFleet:
    """Real agents of one controller (``api``: an admin ``cli.api.Api``); ``close`` kills
    them all."""

    def __init__(self, api: Any, root: Path, *, probation_s: float = 0.5) -> None:
        self.api, self.root, self.probation_s = api, root, probation_s
        self.agents: list[RealAgent] = []

    def add(self, name: str, *, memory_limit: int | None = None,
            labels: dict[str, str] | None = None, env: dict[str, str] | None = None,
            mqtt_url: str | None = None, link: Any = None) -> RealAgent:
        """Enrol an agent (not started) with ``edgefleet agent enroll``, as a box would;
        ``link``: it runs in that ``ShapedLink``'s namespace (then ``mqtt_url`` is the
        broker as seen from there)."""
        from cli.demo import free_port

        token = self.api.call("POST", "/enroll-tokens", {"uses": 1})["token"]
        port = free_port()
        # behind a link, the local API listens on the namespace's address, so traffic
        # from the host reaches it (across the link, as from another box)
        listen = link.device if link is not None else "127.0.0.1"
        config, state = self.root / f"{name}.toml", self.root / name
        args = ["agent", "enroll", "--controller", self.api.controller, "--token", token,
                "--config", str(config), "--state-dir", str(state), "--name", name,
                "--inference-listen", f"{listen}:{port}"]
        for key, value in (labels or {}).items():
            args += ["--label", f"{key}={value}"]
        done = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True,
                              text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"enrolling {name} failed: {done.stderr}")
        extra = f"probation_s = {self.probation_s}\n"
        if mqtt_url is not None:
            extra += f"mqtt_url = {json.dumps(mqtt_url)}\n"
        if memory_limit is not None:
            extra += f"memory_limit_bytes = {memory_limit}\n"
        config.write_text(config.read_text().replace("[labels]", extra + "\n[labels]"))
        agent = RealAgent(name, config, state, f"http://{listen}:{port}", env=env or {},
                          link=link)
        self.agents.append(agent)
        return agent

    def start(self, agent: RealAgent, env: dict[str, str] | None = None) -> None:
        """Start (or start again) ``agent``'s daemon."""
        agent.log = self.root / f"{agent.name}.{len(self.agents)}.{time.monotonic_ns()}.log"
        command = [sys.executable, "-m", "cli", "agent", "run", "--config", str(agent.config)]
        if agent.link is not None:
            command = agent.link.command(*command)
        with agent.log.open("wb") as log:
            agent.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT,
                env=os.environ | agent.env | (env or {}))

    def kill(self, agent: RealAgent) -> None:
        """SIGKILL, as a power cut would (the state dir stays)."""
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.send_signal(signal.SIGKILL)
            agent.proc.wait(30)

    def wait_online(self, timeout: float = 120) -> None:
        """Until every started agent is online with its capabilities; fills device ids."""
        from tests.conftest import wait_for

        def all_online() -> bool:
            devices = {d["name"]: d for d in self.api.call("GET", "/devices")}
            for agent in self.agents:
                d = devices.get(agent.name)
                if d is None or d["status"] != "online" or not d["capabilities"]:
                    return False
                agent.device_id = d["id"]
            return True

        wait_for(all_online, timeout, f"{len(self.agents)} agents online")

    def close(self) -> None:
        for agent in self.agents:
            self.kill(agent)


class Traffic:
    """Inference requests to each agent's local API, ``rate`` per second per agent, from
    one thread; ``body(agent)`` is the request for the model it serves (None: skip it).
    Counts answers by status."""

    def __init__(self, agents: list[RealAgent], body: Callable[[RealAgent], tuple[str, bytes]
                                                                  | None], *,
                 rate: float = 10.0) -> None:
        self._agents, self._body, self._period = agents, body, 1.0 / rate
        self._stop = threading.Event()
        self.answers: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            for agent in self._agents:
                request = self._body(agent)
                if request is not None:
                    status = _post(agent.local + request[0], request[1])
                    self.answers[status] = self.answers.get(status, 0) + 1
            due += self._period
            self._stop.wait(max(0.0, due - time.monotonic()))  # pacing, not synchronisation


def _post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, method="POST",  # noqa: S310
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0  # down (killed, restarting): no answer
