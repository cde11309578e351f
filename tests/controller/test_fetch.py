"""The fetch server's fan-out decisions, on a real TUF repository and blob store."""

import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from controller.fetch import FetchServer
from controller.registry.blobs import BlobStore
from controller.registry.trust import TrustRepository
from shared.fetch import FetchRequest, encode_request
from shared.topics import Topics
from tests.conftest import wait_for

CHUNK = 4096


class World:
    def __init__(self, tmp_path: Path) -> None:
        trust = TrustRepository(tmp_path / "trust")
        trust.initialize(now=datetime.now(UTC))
        blob = BlobStore(tmp_path / "blobs").put_bytes(os.urandom(3 * CHUNK))
        self.sha = blob.sha256
        name = f"m/{self.sha[:8]}.onnx"
        trust.set_targets({name: TargetFile(blob.size, {"sha256": self.sha}, name)},
                          now=datetime.now(UTC))
        self.path = f"targets/m/{self.sha}.{self.sha[:8]}.onnx"
        self.now = 0.0
        self.sent: list[str] = []
        self._lock = threading.Lock()
        self.topics = Topics("t/v1")
        self.server = FetchServer(trust, BlobStore(tmp_path / "blobs"), self.topics,
                                  self._publish, clock=lambda: self.now, coalesce=0.05)

    def _publish(self, topic: str, _payload: bytes) -> None:
        with self._lock:
            self.sent.append(topic)

    def ask(self, device: str, at: float, download: str, offset: int = 0) -> None:
        """``device`` asks for the chunk at ``offset``, shared, at time ``at``."""
        self.now = at
        self.server.submit(device, encode_request(FetchRequest(
            id=download, path=self.path, offset=offset, length=CHUNK, shared=True)))

    def wait_sent(self, n: int) -> None:
        wait_for(lambda: len(self.sent) >= n, 10, f"{n} publications")


@pytest.fixture
def world(tmp_path: Path):
    w = World(tmp_path)
    yield w
    w.server.stop()


def test_a_lone_device_fetching_a_blob_others_fetched_long_ago_is_answered_at_once(world):
    world.ask("dev-a", 0.0, "a1")
    world.wait_sent(1)
    world.ask("dev-b", 60.0, "b1")  # nobody else is fetching it now
    world.wait_sent(2)
    assert world.sent == [world.topics.blob(world.sha)] * 2
    assert world.server.held_chunks == 0


def test_late_joiners_of_a_crowd_share_one_held_republication(world):
    world.ask("dev-a", 0.0, "a1")
    world.wait_sent(1)
    world.ask("dev-a", 8.0, "a1", offset=CHUNK)  # a slow download, still going
    world.wait_sent(2)
    # they join long after chunk 0 went out, while dev-a still fetches: held, then one
    # republication serves both
    world.ask("dev-b", 10.0, "b1")
    world.ask("dev-c", 10.1, "c1")
    world.wait_sent(3)
    world.server.stop()  # the republisher has sent everything it held
    assert world.sent == [world.topics.blob(world.sha)] * 3
    assert world.server.held_chunks == 1
