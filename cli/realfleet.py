"""Real agents on one host, for the demo, the tests and the benchmarks.

- ``RealFleet``: N agents running the real daemon (``edgefleet agent run``: MQTT link,
  TUF over MQTT, installer, model worker, local API), each with its own state dir,
  config and local API port, enrolled like real boxes; each can be SIGKILLed and
  started again. ``memory_limit`` puts agents in different RAM tiers (device classes).
- ``Traffic``: a load generator driving each agent's local API with real inputs at a
  set rate, so the health figures the controller judges are what the agents measured.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli.ports import free_port, wait_until


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
    link: Any = None  # a ShapedLink (tests.support.links) it runs behind, if any

    def auth(self) -> dict[str, str]:
        """The header its local API asks for: beyond loopback (behind a link) the agent
        makes a token in its state dir (agent.localauth)."""
        from agent.localauth import TOKEN_FILE

        path = self.state / TOKEN_FILE
        return {"Authorization": f"Bearer {path.read_text().strip()}"} if path.exists() else {}

    def models(self) -> list[dict[str, Any]]:
        """What its local API says it serves (``GET /v1/models``)."""
        request = urllib.request.Request(f"{self.local}/v1/models",  # noqa: S310
                                         headers=self.auth())
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
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
        done = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True,  # noqa: S603
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
            agent.proc = subprocess.Popen(  # noqa: S603 - our own CLI
                command, stdout=log, stderr=subprocess.STDOUT,
                env=os.environ | agent.env | (env or {}))

    def kill(self, agent: RealAgent) -> None:
        """SIGKILL, as a power cut would (the state dir stays)."""
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.send_signal(signal.SIGKILL)
            agent.proc.wait(30)

    def wait_online(self, timeout: float = 120) -> None:
        """Until every started agent is online with its capabilities; fills device ids."""
        def all_online() -> bool:
            devices = {d["name"]: d for d in self.api.call("GET", "/devices")}
            for agent in self.agents:
                d = devices.get(agent.name)
                if d is None or d["status"] != "online" or not d["capabilities"]:
                    return False
                agent.device_id = d["id"]
            return True

        if not wait_until(all_online, timeout):
            raise TimeoutError(f"not all of {len(self.agents)} agents came online in "
                               f"{timeout:.0f} s; their logs are in {self.root}")

    def close(self) -> None:
        for agent in self.agents:
            self.kill(agent)


@dataclass(frozen=True)
class Call:
    """One request to an agent's local API."""

    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: {
        "Content-Type": "application/json"})

    @classmethod
    def kserve(cls, model: str, inputs: dict[str, Any]) -> "Call":
        """A KServe v2 request with its tensors (numpy arrays) as binary data, as an
        application sending large batches would (JSON would cost more than the model)."""
        from agent.kserve import DATATYPES, HEADER

        by_dtype = {dtype: name for name, (dtype, _code) in DATATYPES.items()}
        head = json.dumps({"inputs": [
            {"name": name, "shape": list(a.shape), "datatype": by_dtype[str(a.dtype)],
             "parameters": {"binary_data_size": a.nbytes}} for name, a in inputs.items()]})
        data = b"".join(a.tobytes() for a in inputs.values())
        return cls(f"/v2/models/{model}/infer", head.encode() + data,
                   {"Content-Type": "application/octet-stream", HEADER: str(len(head))})


class Traffic:
    """Inference requests to each agent's local API, ``rate`` per second per agent, a
    thread per agent (a slow or restarting agent holds up only its own); ``call(agent)``
    is the request for the model it serves (None: skip it). Counts answers by status."""

    def __init__(self, agents: list[RealAgent], call: Callable[[RealAgent], Call | None], *,
                 rate: float = 10.0) -> None:
        self._call, self._period = call, 1.0 / rate
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answers: dict[int, int] = {}
        self._threads = [threading.Thread(target=self._run, args=(a,), name=f"traffic-{a.name}",
                                          daemon=True) for a in agents]

    def __enter__(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, agent: RealAgent) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            call = self._call(agent)
            if call is not None:
                status = _post(agent.local + call.path, call, agent.auth())
                with self._lock:
                    self.answers[status] = self.answers.get(status, 0) + 1
            due = max(due + self._period, time.monotonic())  # late: no catching up
            self._stop.wait(max(0.0, due - time.monotonic()))  # pacing, not synchronisation


def _post(url: str, call: Call, auth: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=call.body, method="POST",  # noqa: S310
                                     headers=call.headers | auth)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0  # down (killed, restarting): no answer
