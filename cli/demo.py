"""``edgefleet demo``: a controller on embedded defaults, a simulated fleet, and rollouts.

Everything runs as real processes (``controller serve`` and ``sim``) in a temporary
data directory, on the default ports when they are free and on free ports when not.
The story: a fleet of mixed device classes comes online; three versions of a model are
pushed (each gets an int8 variant); v1 goes everywhere; v2 passes a three-stage canary
rollout; v3, which the simulator makes slow and error-prone on one device class, fails
that class's gate in its canary stage and is rolled back automatically.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.live import Live

from cli.api import Api
from cli.views import devices_table, fleet_models_table, rollout_view

MODEL = "classifier"
#: what the simulated devices do wrong with v3 (``agent.simdevice``)
FAULT = f"{MODEL}@3.0.0/gateway-1g:latency=3,error_rate=0.2"
CANARY = "10%:10s,50%:10s,100%"


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pick_port(preferred: int, host: str = "127.0.0.1") -> int:
    """``preferred`` if it is free, else a free port the OS picks."""
    return preferred if port_free(preferred, host) else free_port(host)


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return False


def run_demo(count: int, *, timeout: float, console: Console, rollouts: bool = True) -> int:
    data_dir = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    http_port, broker_port = pick_port(8080), pick_port(1883)
    exe = [sys.executable, "-m", "cli"]
    env = {**os.environ, "EDGEFLEET_LOG_LEVEL": "warning"}
    for var in ("EDGEFLEET_DATABASE_URL", "EDGEFLEET_MQTT_URL"):
        env.pop(var, None)  # the demo runs on embedded defaults
    console.print(f"[bold]edgefleet demo[/]: controller on http://127.0.0.1:{http_port}, "
                  f"embedded broker on 127.0.0.1:{broker_port}, data in {data_dir}")
    procs: list[subprocess.Popen[bytes]] = []
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
        if (code := _watch_fleet(api, count, timeout, console)) or not rollouts:
            return code
        return _story(api, data_dir, console)
    finally:
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


def _story(api: Api, data_dir: Path, console: Console) -> int:
    """Push three versions; roll out v1 everywhere, v2 in canary stages, v3 (rolled back)."""
    from cli.samples import mlp_onnx

    started = time.monotonic()
    for i, version in enumerate(("1.0.0", "2.0.0", "3.0.0")):
        path = data_dir / f"{MODEL}-{version}.onnx"
        path.write_bytes(mlp_onnx(seed=i))
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
             ("3.0.0", CANARY, "rolled_back", "v3, which breaks on gateway-1g devices")]
    for version, stages, expected, title in steps:
        console.rule(f"[bold]rollout of {MODEL}@{version}: {title}")
        out = api.call("POST", "/rollouts", {"model": MODEL, "version": version,
                                             "stages": stages})
        out = _watch_rollout(api, out["id"], console)
        if out["state"] != expected:
            console.print(f"[red]{MODEL}@{version} ended {out['state']}, expected {expected}[/]")
            return 1
    summary = api.call("GET", "/fleet/summary")
    console.print(fleet_models_table(summary))
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
