"""Shared fixtures: real databases and brokers, and a real controller process.

Every test that crosses the broker or the database runs on two backends: the
embedded defaults (SQLite + the embedded broker) and, from ``EDGEFLEET_TEST_*``,
PostgreSQL + Mosquitto. A missing service skips, unless ``EDGEFLEET_TEST_REQUIRE=all``
(as in CI), where it fails.
"""

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cli.api import Api
from cli.ports import free_port

REQUIRE_ALL = os.environ.get("EDGEFLEET_TEST_REQUIRE") == "all"
PG_URL = os.environ.get("EDGEFLEET_TEST_DATABASE_URL")
MQTT_URL = os.environ.get("EDGEFLEET_TEST_MQTT_URL")


def unavailable(what: str) -> None:
    """Skip for a missing service or extra; fail instead when CI requires everything."""
    if REQUIRE_ALL:
        pytest.fail(f"{what} is required (EDGEFLEET_TEST_REQUIRE=all)")
    pytest.skip(f"{what} is not configured")


def wait_for(check: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Backend:
    """Where a test's controller keeps its data and meets its devices."""

    name: str
    database_url: str | None  # None: SQLite in the data dir
    mqtt_url: str | None  # None: the embedded broker
    topic_root: str = field(default_factory=lambda: f"test/{secrets.token_hex(4)}/ef/v1")

    def settings(self, data_dir: Path, **overrides: Any) -> Any:
        """Controller Settings for an in-process Runtime on this backend."""
        from controller.settings import HostPort, MqttUrl, Settings

        return Settings(**{
            "data_dir": data_dir, "database_url": self.database_url,
            "mqtt_url": MqttUrl.parse(self.mqtt_url) if self.mqtt_url else None,
            "broker_listen": HostPort("127.0.0.1", free_port()), "topic_root": self.topic_root,
            **overrides})


def _pg_schema_url(base: str) -> Iterator[str]:
    """A fresh PostgreSQL schema for one test, dropped afterwards."""
    import sqlalchemy as sa

    from controller.db.engine import scratch_schema

    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(scratch_schema(base, "t"))
        except sa.exc.OperationalError as exc:
            pytest.fail(f"PostgreSQL at {base} is not reachable: {exc}")
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated-from-empty database URL on each database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    if not PG_URL:
        unavailable("PostgreSQL (EDGEFLEET_TEST_DATABASE_URL)")
    yield from _pg_schema_url(PG_URL)  # type: ignore[arg-type]


@pytest.fixture(params=["embedded", "external"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Embedded defaults, or PostgreSQL + Mosquitto from the environment."""
    if request.param == "embedded":
        yield Backend("embedded", None, None)
        return
    if not PG_URL:
        unavailable("PostgreSQL (EDGEFLEET_TEST_DATABASE_URL)")
    if not MQTT_URL:
        unavailable("Mosquitto (EDGEFLEET_TEST_MQTT_URL)")
    for url in _pg_schema_url(PG_URL):  # type: ignore[arg-type]
        yield Backend("external", url, MQTT_URL)


@dataclass
class ControllerProcess:
    """A real ``edgefleet controller serve`` process."""

    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    broker_url: str
    keepalive: int
    log_path: Path
    admin: Api

    def api(self, token: str | None) -> Api:
        return Api(self.url, token)

    def token(self, role: str) -> str:
        return str(self.admin.call("POST", "/tokens", {"name": f"test-{role}", "role": role})
                   ["token"])

    def enroll_token(self, uses: int = 1, **extra: Any) -> str:
        return str(self.admin.call("POST", "/enroll-tokens", {"uses": uses, **extra})["token"])

    def devices(self) -> list[dict[str, Any]]:
        return list(self.admin.call("GET", "/devices"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


@pytest.fixture
def start_controller(tmp_path: Path,
                     backend: Backend) -> Iterator[Callable[..., ControllerProcess]]:
    """Start controller processes on ``backend``; all are killed at teardown."""
    procs: list[ControllerProcess] = []

    def start(*extra: str, keepalive: int = 4, health_interval: float = 1.0,
              data_dir: Path | None = None, env: dict[str, str] | None = None,
              like: ControllerProcess | None = None,
              replica_of: ControllerProcess | None = None) -> ControllerProcess:
        """Start a controller; ``like`` reuses another's data dir, ports and broker (a
        restart); ``replica_of`` shares its data dir and database on a new HTTP port."""
        if like is not None or replica_of is not None:
            data_dir = (like or replica_of).data_dir  # type: ignore[union-attr]
        data_dir = data_dir or tmp_path / f"controller{len(procs)}"
        http = like.url.removeprefix("http://") if like else f"127.0.0.1:{free_port()}"
        args = ["controller", "serve", "--data-dir", str(data_dir), "--http", http,
                "--topic-root", backend.topic_root, "--keepalive", str(keepalive),
                "--health-interval", str(health_interval)]
        if backend.mqtt_url:
            args += ["--mqtt", backend.mqtt_url]
            broker_url = backend.mqtt_url
        else:
            port = int(like.broker_url.rpartition(":")[2]) if like else free_port()
            args += ["--broker-listen", f"127.0.0.1:{port}"]
            broker_url = f"mqtt://127.0.0.1:{port}"
        if backend.database_url:
            args += ["--db", backend.database_url]
        log_path = tmp_path / f"controller{len(procs)}.log"
        run_env = {k: v for k, v in os.environ.items()
                   if k not in ("EDGEFLEET_DATABASE_URL", "EDGEFLEET_MQTT_URL")}
        run_env.update(env or {})
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cli(*args, *extra), stdout=log, stderr=subprocess.STDOUT,
                                    env=run_env)
        url = f"http://{http}"

        def up() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"controller exited with {proc.returncode}:\n{log_path.read_text()}")
            return Api(url, None).ready()

        wait_for(up, 60, "the controller to become ready")
        admin = run_env.get("EDGEFLEET_ADMIN_TOKEN") or (data_dir / "admin-token").read_text()
        controller = ControllerProcess(proc, url, data_dir, broker_url, keepalive, log_path,
                                       Api(url, admin.strip()))
        procs.append(controller)
        return controller

    yield start
    for c in procs:
        if c.proc.poll() is None:
            c.proc.terminate()
            try:
                c.proc.wait(15)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start CLI subprocesses (sim, agent), killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(*args: str, log_name: str = "proc", env: dict[str, str] | None = None
            ) -> subprocess.Popen[bytes]:
        log_path = tmp_path / f"{log_name}{len(procs)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cli(*args), stdout=log, stderr=subprocess.STDOUT,
                                    env=None if env is None else os.environ | env)
        proc.log_path = log_path  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
