"""The TUF repository against a real tuf.ngclient.Updater.

The fetcher here reads the repository and blob store directly (the MQTT fetcher is
issue 4); everything else, including every refusal, is python-tuf's own.
"""

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api import exceptions
from tuf.api.metadata import Metadata, TargetFile
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from controller.registry.blobs import BlobStore
from controller.registry.trust import TrustRepository, new_signer

NOW = datetime.now(UTC).replace(microsecond=0)
META, TARGETS = "edgefleet://meta/", "edgefleet://targets/"


class LocalFetcher(FetcherInterface):
    """Serves metadata from the repository and targets from the blob store by hash."""

    def __init__(self, repo: TrustRepository, blobs: BlobStore) -> None:
        self.repo, self.blobs = repo, blobs

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url.startswith(META):
            data = self.repo.read(url.removeprefix(META))
        else:
            name = url.removeprefix(TARGETS).rsplit("/", 1)[-1]
            blob = self.blobs.get(name.split(".", 1)[0])
            data = blob.path.read_bytes() if blob else None
        if data is None:
            raise exceptions.DownloadHTTPError(f"{url} not found", 404)
        return iter([data])


@pytest.fixture
def repo(tmp_path: Path) -> TrustRepository:
    repo = TrustRepository(tmp_path / "tuf")
    repo.initialize(now=NOW)
    return repo


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def publish(repo: TrustRepository, blobs: BlobStore, files: dict[str, bytes],
            now: datetime = NOW) -> None:
    targets = {}
    for path, data in files.items():
        blob = blobs.put_bytes(data)
        targets[path] = TargetFile(blob.size, {"sha256": blob.sha256}, path,
                                   unrecognized_fields={"custom": {"model": path}})
    repo.set_targets({**repo.targets(), **targets}, now=now)


def updater(repo: TrustRepository, blobs: BlobStore, client_dir: Path,
            root: bytes | None = None) -> Updater:
    (client_dir / "meta").mkdir(parents=True, exist_ok=True)
    (client_dir / "targets").mkdir(exist_ok=True)
    return Updater(str(client_dir / "meta"), META, str(client_dir / "targets"), TARGETS,
                   fetcher=LocalFetcher(repo, blobs), bootstrap=root or repo.trusted_root())


def download(up: Updater, path: str) -> bytes:
    """Look a target up and download it (``get_targetinfo`` refreshes once per Updater)."""
    info = up.get_targetinfo(path)
    assert info is not None, f"{path} is not a target"
    return Path(up.download_target(info)).read_bytes()


def test_a_published_target_downloads_verified_with_its_custom_fields(repo, blobs, tmp_path):
    publish(repo, blobs, {"models/m/1.0.0/fp32.onnx": b"model-bytes" * 100,
                          "models/m/1.0.0/int8.onnx": b"smaller"})
    up = updater(repo, blobs, tmp_path / "client")
    assert download(up, "models/m/1.0.0/fp32.onnx") == b"model-bytes" * 100
    assert download(up, "models/m/1.0.0/int8.onnx") == b"smaller"
    assert up.get_targetinfo("models/m/1.0.0/int8.onnx").custom == {
        "model": "models/m/1.0.0/int8.onnx"}


def test_a_tampered_blob_is_refused(repo, blobs, tmp_path):
    publish(repo, blobs, {"models/m/1.0.0/fp32.onnx": b"genuine"})
    blob = blobs.get(repo.targets()["models/m/1.0.0/fp32.onnx"].hashes["sha256"])
    blob.path.write_bytes(b"evil!!!")  # same length, other content
    with pytest.raises(exceptions.LengthOrHashMismatchError):
        download(updater(repo, blobs, tmp_path / "client"), "models/m/1.0.0/fp32.onnx")


def test_metadata_signed_by_the_wrong_key_is_refused(repo, blobs, tmp_path):
    publish(repo, blobs, {"models/m/1.0.0/fp32.onnx": b"x"})
    rogue, _ = new_signer()
    md = repo.load("timestamp")
    md.signed.version += 1
    md.signatures.clear()
    md.sign(rogue)
    (repo.metadata_dir / "timestamp.json").write_bytes(md.to_bytes())
    with pytest.raises(exceptions.UnsignedMetadataError):
        updater(repo, blobs, tmp_path / "client").refresh()


def test_an_expired_timestamp_is_refused(tmp_path, blobs):
    old = TrustRepository(tmp_path / "old")
    old.initialize(now=NOW - timedelta(days=3))  # timestamp lived one day
    with pytest.raises(exceptions.ExpiredMetadataError):
        updater(old, blobs, tmp_path / "client").refresh()


def test_the_scheduled_refresh_keeps_the_timestamp_fresh(repo):
    assert not repo.refresh(now=NOW)
    later = NOW + timedelta(hours=20)
    assert repo.refresh(now=later)
    assert repo.load("timestamp").signed.expires == later + timedelta(days=1)


def test_a_metadata_rollback_is_refused(repo, blobs, tmp_path):
    publish(repo, blobs, {"models/m/1.0.0/a.onnx": b"a"})
    saved = repo.read("timestamp.json")
    publish(repo, blobs, {"models/m/1.0.0/b.onnx": b"b"})
    up = updater(repo, blobs, tmp_path / "client")
    up.refresh()  # the client has now seen the newer timestamp
    (repo.metadata_dir / "timestamp.json").write_bytes(saved)  # replay the older one
    with pytest.raises(exceptions.BadVersionNumberError):
        updater(repo, blobs, tmp_path / "client").refresh()


def test_root_rotation_is_accepted_by_old_clients_and_a_forged_root_is_not(repo, blobs,
                                                                          tmp_path):
    old_root = repo.trusted_root()
    new_root, new_pem = new_signer()
    repo.rotate_root(new_root, now=NOW, new_key_pem=new_pem)
    publish(repo, blobs, {"models/m/1.0.0/a.onnx": b"a"})
    up = updater(repo, blobs, tmp_path / "client", root=old_root)
    assert download(up, "models/m/1.0.0/a.onnx") == b"a"
    trusted = json.loads((tmp_path / "client" / "meta" / "root.json").read_bytes())
    assert trusted["signed"]["version"] == 2

    forger, _ = new_signer()  # a root version 3 signed only by a key nobody trusts
    md = Metadata.from_bytes(repo.read("2.root.json"))
    md.signed.version = 3
    md.signed.add_key(forger.public_key, "root")
    md.signatures.clear()
    md.sign(forger)
    (repo.metadata_dir / "3.root.json").write_bytes(md.to_bytes())
    with pytest.raises(exceptions.UnsignedMetadataError):
        updater(repo, blobs, tmp_path / "client2", root=old_root).refresh()


def test_an_offline_root_key_never_touches_the_controller(tmp_path):
    offline, _ = new_signer()
    repo = TrustRepository(tmp_path / "tuf")
    repo.initialize(now=NOW, root_signer=offline)
    assert not (repo.keys_dir / "root.pem").exists()
    root = Metadata.from_bytes(repo.trusted_root())
    assert root.signed.roles["root"].keyids == [offline.public_key.keyid]


def test_keys_are_private(repo):
    import stat

    for role in ("root", "targets", "snapshot", "timestamp"):
        assert stat.S_IMODE((repo.keys_dir / f"{role}.pem").stat().st_mode) == 0o600
