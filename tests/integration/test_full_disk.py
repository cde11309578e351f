"""A disk that fills up in the middle of a download fails the install cleanly: reason
``insufficient_disk``, nothing half-written left behind, the running model untouched.

The device's state directory is a small tmpfs; the download is held at half way while
the test fills the disk, then let go."""

import random
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from agent.config import Identity
from agent.link import DeviceLink
from agent.sim import PROFILES, sim_session
from agent.update.installer import Installer
from agent.update.machine import State
from shared.messages import DesiredState
from tests.agent.test_installer import FakeReporter, FakeServing
from tests.conftest import Backend, unavailable, wait_for
from tests.integration.test_delivery import push
from tests.integration.test_resume import hold_fetch_at
from tests.models import tiny_onnx

CHUNK = 32 * 1024


@contextmanager
def small_disk(path: Path, mib: int) -> Iterator[Path]:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        unavailable(f"a {mib} MiB tmpfs for the device (mount: {done.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_disk_filling_up_mid_download_fails_the_install_cleanly(
        backend: Backend, start_controller, tmp_path: Path, monkeypatch) -> None:
    controller = start_controller()
    nowhere = tmp_path / "not-a-directory"
    nowhere.write_bytes(b"")
    monkeypatch.setattr(tempfile, "tempdir", str(nowhere))  # the download must spool on the
    # device's own disk, where the free-space check looked, not in the system's /tmp
    version = push(controller, tmp_path, "big", "1.0.0", tiny_onnx(hidden=2048, inputs=256),
                   "big.onnx")
    source = version["variants"][0]  # about 2 MiB; the free-space check wants twice that
    enrolled = controller.admin.call("POST", "/enroll", {"token": controller.enroll_token()})
    identity = Identity.from_enrolment(enrolled)
    with small_disk(tmp_path / "disk", 16) as disk:
        state = disk / "agent"
        link = DeviceLink(identity, state, sim_session(identity, PROFILES["mixed"][2],
                                                       random.Random(0)),
                          chunk_size=CHUNK, window=4)
        paused, go_on = hold_fetch_at(link, source["size"] // 2)
        link.connect()
        wait_for(link.client.is_connected, 30, "the device connected")
        serving, reporter = FakeServing(), FakeReporter()
        installer = Installer(state, updater=link.updater, reporter=reporter, serving=serving,
                              download=link.download, probation_s=0)  # as the daemon does
        installer.start()
        installer.want(DesiredState(device_id=identity.device_id, generation=1, model="big",
                                    version="1.0.0", variant="source", target=source["target"],
                                    issued_at=datetime.now(UTC)))
        assert paused.wait(120), "the download never got half way"
        with (disk / "filler").open("wb") as filler:  # leave 16 KiB: less than a chunk
            try:
                while True:
                    filler.write(b"\0" * (64 * 1024))
            except OSError:
                pass
        filler_size = (disk / "filler").stat().st_size
        (disk / "filler").unlink()
        with (disk / "filler").open("wb") as filler:
            filler.write(b"\0" * (filler_size - 16 * 1024))
        go_on.set()
        (done,) = wait_for(lambda: reporter.done, 120, "the install to end")
        installer.stop()
        link.close()
        assert done.state == State.FAILED
        assert done.reason.startswith("insufficient_disk"), done.reason
        assert serving.active == [None]  # nothing was activated
        assert not list((state / "models").glob("*")), "a partial model was left behind"
        assert not list((state / "tuf" / "download").glob("*")), "a partial download was left"
