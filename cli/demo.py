"""``edgefleet demo``: a controller on embedded defaults and a simulated fleet.

Everything runs as real processes (``controller serve`` and ``sim``) in a temporary
data directory, on the default ports when they are free and on free ports when not.
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
from cli.views import devices_table


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


def run_demo(count: int, *, timeout: float, console: Console) -> int:
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
        enroll = api.call("POST", "/enroll-tokens", {"uses": count, "expires_in_s": 3600})
        console.print(f"starting {count} simulated devices of mixed hardware classes")
        procs.append(subprocess.Popen(  # noqa: S603 - our own CLI
            [*exe, "sim", "--devices", str(count), "--controller", url,
             "--token", enroll["token"]], env=env))
        return _watch_fleet(api, count, timeout, console)
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
