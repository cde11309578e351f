"""Many devices fetching one blob at once: the controller publishes it about once."""

import hashlib
import random
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import TargetFile

from agent.config import Identity
from agent.link import DeviceLink
from agent.sim import PROFILES, sim_session
from controller.api.app import create_app
from controller.runtime import Runtime
from tests.conftest import Backend, wait_for
from tests.models import tiny_onnx

DEVICES = 8


def device(identity: Identity, state_dir: Path) -> DeviceLink:
    session = sim_session(identity, PROFILES["mixed"][2], random.Random(0))
    return DeviceLink(identity, state_dir, session, chunk_size=64 * 1024)


def test_devices_fetching_the_same_blob_share_one_broadcast(backend: Backend,
                                                             tmp_path: Path) -> None:
    settings = backend.settings(tmp_path / "data", max_upload_bytes=64 << 20)
    with TestClient(create_app(settings, runtime=Runtime(settings))) as c:
        c.headers["Authorization"] = "Bearer " + (settings.data_dir / "admin-token").read_text()
        model = tiny_onnx(hidden=2048, inputs=256)  # 2 MiB
        up = c.post("/api/v1/uploads", params={"filename": "m.onnx"}, content=model).json()
        c.post("/api/v1/models/big/versions/1.0.0", json={"upload": up["sha256"]})
        version = wait_for(lambda: (v := c.get("/api/v1/models/big/versions/1.0.0").json())
                           ["status"] == "ready" and v, 120, "the version built")
        target = version["variants"][0]["target"]
        token = c.post("/api/v1/enroll-tokens", json={"uses": DEVICES}).json()["token"]
        links = []
        for i in range(DEVICES):
            enrolled = c.post("/api/v1/enroll", json={"token": token, "name": f"d{i}"}).json()
            links.append(device(Identity.from_enrolment(enrolled), tmp_path / f"d{i}"))
        for link in links:
            link.connect()
        wait_for(lambda: all(link.client.is_connected() for link in links), 30, "connected")
        fetch = c.app.state.runtime.fetch
        before = fetch.published_bytes
        got: dict[int, str] = {}
        start = threading.Barrier(DEVICES)

        def download(i: int) -> None:
            updater = links[i].updater()
            updater.refresh()
            info = updater.get_targetinfo(target)
            start.wait()
            path = Path(updater.download_target(info))
            got[i] = hashlib.sha256(path.read_bytes()).hexdigest()

        threads = [threading.Thread(target=download, args=(i,)) for i in range(DEVICES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for link in links:
            link.close()
        published = fetch.published_bytes - before
    assert got == dict.fromkeys(range(DEVICES), up["sha256"])  # every copy verified by TUF
    assert published < 3 * len(model), (published, len(model))  # not DEVICES x the blob


def test_a_download_that_does_not_match_its_signed_length_and_hashes_is_refused(
        backend: Backend, tmp_path: Path) -> None:
    settings = backend.settings(tmp_path / "data")
    with TestClient(create_app(settings, runtime=Runtime(settings))) as c:
        c.headers["Authorization"] = "Bearer " + (settings.data_dir / "admin-token").read_text()
        up = c.post("/api/v1/uploads", params={"filename": "m.onnx"}, content=tiny_onnx()).json()
        c.post("/api/v1/models/m/versions/1.0.0", json={"upload": up["sha256"]})
        version = wait_for(lambda: (v := c.get("/api/v1/models/m/versions/1.0.0").json())
                           ["status"] == "ready" and v, 120, "the version built")
        source = version["variants"][0]
        token = c.post("/api/v1/enroll-tokens", json={}).json()["token"]
        link = device(Identity.from_enrolment(
            c.post("/api/v1/enroll", json={"token": token}).json()), tmp_path / "d")
        downloads = tmp_path / "d" / "tuf" / "download"
        link.connect()
        try:
            wait_for(link.client.is_connected, 30, "connected")
            updater = link.updater()
            updater.refresh()
            info = updater.get_targetinfo(source["target"])
            assert info is not None
            path = link.download(info)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == source["sha256"]
            path.unlink()

            for wrong, why in (
                    (TargetFile(info.length + 1, info.hashes, info.path), "length"),
                    (TargetFile(info.length, {**info.hashes, "sha512": "00" * 64}, info.path),
                     "hash"),
                    (TargetFile(info.length, {**info.hashes, "md4-ish": "00"}, info.path),
                     "Unsupported algorithm")):
                with pytest.raises(LengthOrHashMismatchError, match=why):
                    link.download(wrong)
                assert list(downloads.iterdir()) == []

            blob = c.app.state.runtime.blobs.path(source["sha256"])
            data = bytearray(blob.read_bytes())
            data[-1] ^= 1  # altered in the store after signing: same length, other bytes
            blob.write_bytes(bytes(data))
            with pytest.raises(LengthOrHashMismatchError, match="hash"):
                link.download(info)
            assert list(downloads.iterdir()) == []
        finally:
            link.close()
