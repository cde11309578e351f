"""A download cut by a broker restart, or by killing the agent, resumes where it stopped.

Embedded broker: the controller that hosts it is restarted. Mosquitto: a private one
(so the shared test broker stays up) is stopped and started on the same port.
"""

import hashlib
import json
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from agent.config import Identity
from agent.link import DeviceLink
from agent.sim import PROFILES, sim_session
from shared.fetch import DEFAULT_CHUNK as CHUNK_DEFAULT
from tests.conftest import Backend, free_port, unavailable, wait_for
from tests.integration.test_delivery import enroll, online, push, reported
from tests.models import tiny_onnx
from tests.support.fleet import fetch_spy

CHUNK = 32 * 1024


def mosquitto(port: int) -> subprocess.Popen[bytes]:
    return mosquitto_with(["-p", str(port)], port)


def mosquitto_with(args: list[str], port: int) -> subprocess.Popen[bytes]:
    """A private Mosquitto started with ``args``, once it listens on ``port``."""
    binary = shutil.which("mosquitto")
    if binary is None:
        unavailable("the mosquitto binary")
    proc = subprocess.Popen([str(binary), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(lambda: _open(port), 10, "mosquitto listening")
    return proc


def _open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def hold_fetch_at(link: DeviceLink, offset: int, asked: list[int] | None = None
                  ) -> tuple[threading.Event, threading.Event]:
    """Hold ``link``'s requests from ``offset`` on: ``paused`` is set when one is held,
    setting ``go_on`` lets them through. ``asked`` records every offset requested."""
    paused, go_on = threading.Event(), threading.Event()
    ask = link.channel.ask

    def gated_ask(path: str, at: int, length: int, count: int = 1, **kw: bool) -> None:
        if at >= offset and not go_on.is_set():
            paused.set()
            go_on.wait(120)
        if asked is not None:
            asked.append(at)
        ask(path, at, length, count, **kw)

    link.channel.ask = gated_ask  # type: ignore[method-assign]
    return paused, go_on


def test_a_download_cut_by_a_broker_restart_resumes_where_it_stopped(
        backend: Backend, start_controller, tmp_path: Path) -> None:
    private = None
    extra: list[str] = []
    if backend.mqtt_url:
        port = free_port()
        private = mosquitto(port)
        extra = ["--mqtt", f"mqtt://127.0.0.1:{port}"]
    controller = start_controller(*extra)
    version = push(controller, tmp_path, "big", "1.0.0", tiny_onnx(hidden=2048, inputs=256),
                   "big.onnx")
    source = version["variants"][0]
    enrolled = controller.admin.call("POST", "/enroll", {"token": controller.enroll_token()})
    identity = Identity.from_enrolment(enrolled)
    session = sim_session(identity, PROFILES["mixed"][2], random.Random(0))
    progress: list[tuple[int, int]] = []
    link = DeviceLink(identity, tmp_path / "device", session, chunk_size=CHUNK, window=4,
                      blob_timeout=1.0, progress=lambda _p, done, total: progress.append(
                          (done, total)))
    link.connect()
    wait_for(link.client.is_connected, 30, "the device connected")

    half = source["size"] // 2
    asked: list[int] = []
    paused, go_on = hold_fetch_at(link, half, asked)
    result: dict[str, str] = {}

    def download() -> None:
        updater = link.updater()
        updater.refresh()
        path = link.download(updater.get_targetinfo(source["target"]))  # the installer's way
        result["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()

    thread = threading.Thread(target=download)
    thread.start()
    assert paused.wait(120), "the download never got half way"
    if private is not None:
        private.terminate()
        private.wait(10)
        private = mosquitto(int(extra[1].rpartition(":")[2]))
    else:
        controller.proc.terminate()
        controller.proc.wait(30)
        controller = start_controller(like=controller)
    cut_at = len(asked)
    go_on.set()
    thread.join(180)
    link.close()
    if private is not None:
        private.terminate()
    assert result == {"sha256": source["sha256"]}  # complete, and verified by TUF
    assert min(asked[cut_at:]) >= half - 4 * CHUNK  # carried on; never from the start
    assert asked.count(0) == 1
    done = [d for d, _ in progress]
    assert done == sorted(done)  # progress never went back across the restart
    assert progress[-1] == (source["size"], source["size"])


@pytest.mark.parametrize("backend", ["external"], indirect=True)  # the spy needs Mosquitto
def test_an_agent_killed_half_way_through_a_download_carries_on_from_what_it_kept(
        backend: Backend, start_controller, spawn, tmp_path: Path) -> None:
    controller = start_controller()
    model = tiny_onnx(hidden=51200, inputs=256)  # 50 MiB of weights
    version = push(controller, tmp_path, "big", "1.0.0", model, "big.onnx", derive=False)
    source = version["variants"][0]
    sha = source["sha256"]
    config, state, _local = enroll(controller, tmp_path, "box-1")
    agent = spawn("agent", "run", "--config", str(config), log_name="killed",
                  env={"EDGEFLEET_AGENT_CRASH_AT": "download_half"})
    device_id = online(controller, "box-1")
    with fetch_spy(str(backend.mqtt_url), backend.topic_root) as spy:
        generation = controller.admin.call("PUT", f"/devices/{device_id}/pin",
                                           {"model": "big@1.0.0"})["desired_generation"]
        assert wait_for(agent.poll, 180, "the agent killed half way") == -9
        mark = state / "tuf" / "download" / f"{sha}.part.json"
        kept = json.loads(mark.read_text())["length"]
        assert 0.4 * source["size"] <= kept <= 0.5 * source["size"] + CHUNK_DEFAULT
        before = [a.request.offset for a in spy.asked(device_id) if a.blob == sha]
        spy.clear()
        spawn("agent", "run", "--config", str(config), log_name="restarted")
        wait_for(lambda: reported(controller, device_id, generation), 180, "the install")
        after = [a.request.offset for a in spy.asked(device_id) if a.blob == sha]
    assert reported(controller, device_id, generation)["state"] == "committed"
    assert min(before) == 0  # the spy saw the first download from its start
    assert after
    assert min(after) >= kept  # asked for nothing it had kept
    active = (state / "current").resolve()
    assert active.name == sha
    assert hashlib.sha256((active / "model.onnx").read_bytes()).hexdigest() == sha
    assert not list((state / "tuf" / "download").glob("*.part*"))
