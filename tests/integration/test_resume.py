"""A download cut by a broker restart resumes where it stopped, on both brokers.

Embedded broker: the controller that hosts it is restarted. Mosquitto: a private one
(so the shared test broker stays up) is stopped and started on the same port.
"""

import hashlib
import random
import shutil
import subprocess
import threading
from pathlib import Path

from agent.config import Identity
from agent.link import DeviceLink
from agent.sim import PROFILES, sim_session
from tests.conftest import Backend, free_port, unavailable, wait_for
from tests.integration.test_delivery import push
from tests.models import tiny_onnx

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
