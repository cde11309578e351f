"""The content-addressed blob store."""

import hashlib
import os
import time
from pathlib import Path

import pytest

from controller.registry.blobs import BlobStore, BlobTooLarge


def test_blobs_are_stored_by_content_once(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    a = store.put([b"hello ", b"world"], max_bytes=100)
    b = store.put_bytes(b"hello world")
    assert (a.sha256, a.size) == (b.sha256, b.size)
    assert a.created
    assert not b.created
    assert a.sha256 == hashlib.sha256(b"hello world").hexdigest()
    assert a.path.read_bytes() == b"hello world"
    assert list(store.all()) == [a.sha256]


def test_an_oversize_stream_leaves_nothing_behind(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(BlobTooLarge, match="10-byte limit"):
        store.put([b"12345", b"67890", b"x"], max_bytes=10)
    assert list(store.all()) == []
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_a_failing_stream_leaves_nothing_behind(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)

    def chunks():
        yield b"partial"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.put(chunks(), max_bytes=100)
    assert list(store.all()) == []
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_collect_removes_unreferenced_blobs_and_old_strays_only(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    keep, drop = store.put_bytes(b"keep"), store.put_bytes(b"drop")
    just_pushed = store.put_bytes(b"not registered yet")
    old, fresh = tmp_path / ".tmp" / "old.part", tmp_path / ".tmp" / "fresh.part"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    an_hour_ago = time.time() - 7200
    for path in (old, keep.path, drop.path):
        os.utime(path, (an_hour_ago, an_hour_ago))
    assert store.collect({keep.sha256}) == [drop.sha256]
    assert store.get(just_pushed.sha256) is not None  # a push in progress keeps its blob
    assert store.get(keep.sha256) is not None
    assert store.get(drop.sha256) is None
    assert not old.exists()
    assert fresh.exists()


def test_only_hex_digests_name_blobs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sha256"):
        BlobStore(tmp_path).path("../../etc/passwd")
