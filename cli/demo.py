"""``edgefleet demo``: a controller on embedded defaults, a simulated fleet beside a
handful of real agents, and rollouts.

Everything runs as real processes (``controller serve``, ``sim`` and one ``agent run``
per real agent) in a temporary data directory, on the default ports when they are free
and on free ports when not. The story: a fleet of mixed device classes comes online;
three versions of a model are pushed (each gets an int8 variant); v1 goes everywhere;
v2 passes a three-stage canary rollout; v3 fails its canary stage and is rolled back
automatically: the simulator makes it slow and error-prone on one simulated class, and
on the real agents it really needs 100 MiB more memory on every run (in the file), which
their own measurements show. The real agents are idle, so the plans ask for probes.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cli.api import Api
from cli.ports import pick_port, wait_until
from cli.realfleet import RealAgent, RealFleet
from cli.views import devices_table, fleet_models_table, rollout_view

MODEL = "classifier"
#: what the simulated devices do wrong with v3 (``agent.simdevice``)
FAULT = f"{MODEL}@3.0.0/gateway-1g:latency=3,error_rate=0.2"
CANARY = "10%:10s,50%:10s,100%"
#: the real agents are idle: each canary, and each baseline device, probes its model
PROBES = {"interval_s": 0.2, "max_cpu_share": 0.2}
#: v3's real regression: this much more memory on every run
V3_SCRATCH = 100 << 20
#: the real agents' RAM as they report it: a class of their own (x86_64/ram<8G/...)
REAL_RAM = 4 << 30


def run_demo(count: int, *, timeout: float, console: Console, rollouts: bool = True,
             real: int = 6) -> int:
    data_dir = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    http_port, broker_port = pick_port(8080), pick_port(1883)
    exe = [sys.executable, "-m", "cli"]
    env = {**os.environ, "EDGEFLEET_LOG_LEVEL": "warning"}
    for var in ("EDGEFLEET_DATABASE_URL", "EDGEFLEET_MQTT_URL"):
        env.pop(var, None)  # the demo runs on embedded defaults
    console.print(f"[bold]edgefleet demo[/]: controller on http://127.0.0.1:{http_port}, "
                  f"embedded broker on 127.0.0.1:{broker_port}, data in {data_dir}")
    procs: list[subprocess.Popen[bytes]] = []
    fleet: RealFleet | None = None
    try:
        procs.append(subprocess.Popen(  # noqa: S603 - our own CLI
            [*exe, "controller", "serve", "--data-dir", str(data_dir),
             "--http", f"127.0.0.1:{http_port}", "--broker-listen", f"127.0.0.1:{broker_port}",
             "--keepalive", "5", "--health-interval", "2"], env=env))
        url = f"http://127.0.0.1:{http_port}"
        token_file = data_dir / "admin-token"
        if not wait_until(lambda: token_file.exists() and Api(url, None).ready(), 30):
            console.print("[red]the controller did not become ready in 30 s[/]")
            return 1
        api = Api(url, token_file.read_text().strip())
        console.print(f"dashboard: {url}/ (sign in with the token in {token_file}); "
                      f"Prometheus metrics: {url}/metrics")
        enroll = api.call("POST", "/enroll-tokens", {"uses": count, "expires_in_s": 3600})
        console.print(f"starting {count} simulated devices of mixed hardware classes")
        procs.append(subprocess.Popen(  # noqa: S603 - our own CLI
            [*exe, "sim", "--devices", str(count), "--controller", url,
             "--token", enroll["token"], "--fault", FAULT], env=env))
        if code := _watch_fleet(api, count, timeout, console):
            return code
        if real:
            fleet = _start_agents(api, data_dir / "agents", real, env, console)
        if not rollouts:
            return 0
        return _story(api, data_dir, console, fleet)
    finally:
        if fleet is not None:
            fleet.close()
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


def _watch_fleet(api: Api, count: int, timeout: float, console: Console) -> int:
    started = time.monotonic()
    devices = api.call("GET", "/devices")
    with Live(devices_table(devices), console=console, refresh_per_second=4) as live:
        while time.monotonic() - started < timeout:
            devices = api.call("GET", "/devices")
            live.update(devices_table(devices))
            online = [d for d in devices if d["status"] == "online"]
            if len(online) >= count and all(d["last_health"] for d in online):
                break  # every device online and reporting health
            time.sleep(0.5)
    online = sum(d["status"] == "online" for d in devices)
    elapsed = time.monotonic() - started
    console.print()
    if online < count:
        console.print(f"[red]only {online}/{count} devices online after {elapsed:.0f} s[/]")
        return 1
    console.print(f"[green]{online}/{count} devices online[/] {elapsed:.1f} s after the "
                  "simulator started")
    return 0


def _start_agents(api: Api, root: Path, count: int, env: dict[str, str],
                  console: Console) -> RealFleet:
    """``count`` real agents (``edgefleet agent run``, each with its own state dir, link,
    model worker and local API), enrolled as boxes are."""
    started = time.monotonic()
    fleet = RealFleet(api, root, probation_s=1.0)
    with console.status(f"enrolling and starting {count} real agents", spinner="dots"):
        for i in range(count):
            fleet.start(fleet.add(f"edge-{i}", memory_limit=REAL_RAM, env=env))
        fleet.wait_online(60)
    console.print(f"[green]{count} real agents online[/] {time.monotonic() - started:.1f} s "
                  f"after they were enrolled (logs in {root})")
    return fleet


def _story(api: Api, data_dir: Path, console: Console, fleet: RealFleet | None) -> int:
    """Push three versions; roll out v1 everywhere, v2 in canary stages, v3 (rolled back)."""
    from cli.samples import mlp_onnx

    started = time.monotonic()
    for i, version in enumerate(("1.0.0", "2.0.0", "3.0.0")):
        path = data_dir / f"{MODEL}-{version}.onnx"
        path.write_bytes(mlp_onnx(seed=i, scratch_bytes=V3_SCRATCH if i == 2 else 0))
        up = api.upload("/uploads", path, params={"filename": path.name})
        api.call("POST", f"/models/{MODEL}/versions/{version}", {"upload": up["sha256"]})
        console.print(f"pushed {MODEL}@{version} ({path.stat().st_size:,} bytes); building "
                      "its int8 variant and smoke test")
    with console.status("waiting for the variants", spinner="dots"):
        if not wait_until(lambda: all(v["status"] == "ready" for v in api.call("GET", "/models")),
                          120, interval=0.5):
            console.print("[red]the variants were not built in 120 s[/]")
            return 1
    steps = [("1.0.0", "100%", "completed", "v1 everywhere"),
             ("2.0.0", CANARY, "completed", "v2 in three canary stages"),
             ("3.0.0", CANARY, "rolled_back",
              "v3: slow on gateway-1g (simulated), 100 MiB more memory (real)")]
    for version, stages, expected, title in steps:
        console.rule(f"[bold]rollout of {MODEL}@{version}: {title}")
        out = api.call("POST", "/rollouts", {"model": MODEL, "version": version,
                                             "stages": stages, "probes": PROBES})
        out = _watch_rollout(api, out["id"], console)
        if out["state"] != expected:
            console.print(f"[red]{MODEL}@{version} ended {out['state']}, expected {expected}[/]")
            return 1
        for event in out["timeline"]:
            if event["reason"].startswith("rollback: "):
                console.print(f"why {MODEL}@{version} was rolled back:")
                for reason in event["reason"].removeprefix("rollback: ").split("; "):
                    console.print(f"  - {reason}")
    summary = api.call("GET", "/fleet/summary")
    console.print(fleet_models_table(summary))
    if fleet is not None:
        console.print(real_agents_table(api, fleet.agents))
    on_v2, total = summary["by_model"].get(f"{MODEL}@2.0.0", 0), summary["devices"]
    console.print(f"[green]done in {time.monotonic() - started:.0f} s: {on_v2}/{total} "
                  f"devices run {MODEL}@2.0.0; {MODEL}@3.0.0 was rolled back[/]")
    return 0 if on_v2 == total else 1


def _watch_rollout(api: Api, rollout_id: str, console: Console,
                   timeout: float = 120.0) -> dict[str, object]:
    path = f"/rollouts/{rollout_id}"
    out = api.call("GET", path)
    deadline = time.monotonic() + timeout
    with Live(rollout_view(out), console=console, refresh_per_second=4) as live:
        while out["state"] not in ("completed", "rolled_back", "aborted", "paused") \
                and time.monotonic() < deadline:
            time.sleep(0.5)
            out = api.call("GET", path)
            live.update(rollout_view(out))
    return out  # type: ignore[no-any-return]


def real_agents_table(api: Api, agents: list[RealAgent]) -> Table:
    """What the real agents serve (their local API), measured (their last health report,
    once it is from that model) and did (their events of the last desired state)."""
    def health(agent: RealAgent) -> dict[str, Any]:
        return api.call("GET", f"/devices/{agent.device_id}")["last_health"] or {}

    # a health report lags an install by up to one report interval
    wait_until(lambda: all(health(a).get("active_model") == a.serves() for a in agents), 30)
    table = Table(title="real agents: what they measured", box=box.SIMPLE_HEAD)
    for col in ("agent", "serves", "probes", "p95 ms", "model RSS", "events of the last "
                "desired state"):
        table.add_column(col, justify="right" if col in ("probes", "p95 ms", "model RSS")
                         else "left")
    for agent in agents:
        device = api.call("GET", f"/devices/{agent.device_id}")
        figures = device["last_health"] or {}
        events = [e["kind"] for e in api.call("GET", f"/devices/{agent.device_id}/events")
                  if e["generation"] == device["desired_generation"]]
        p95, rss = figures.get("probe_latency_p95_ms"), figures.get("model_rss_bytes")
        table.add_row(agent.name, agent.serves() or "-", str(figures.get("probe_count", 0)),
                      f"{p95:.2f}" if p95 else "-", f"{rss / 2**20:.0f} MiB" if rss else "-",
                      " ".join(events) or "-")
    return table
