"""`edgefleet keys`: an offline root key, imported and rotated, trusted by old devices."""

import json
import stat
import subprocess
from pathlib import Path

from controller.registry.blobs import BlobStore
from controller.registry.trust import TrustRepository
from tests.conftest import cli
from tests.controller.registry.test_trust import NOW, download, publish, updater


def keys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli("keys", *args), capture_output=True, text=True, timeout=60,
                          check=False)


def test_an_offline_root_is_imported_rotated_and_trusted_by_old_devices(tmp_path: Path) -> None:
    data = tmp_path / "data"
    old_key, new_key = tmp_path / "usb" / "root.pem", tmp_path / "usb" / "root-2.pem"
    assert keys("generate", str(old_key)).returncode == 0
    assert stat.S_IMODE(old_key.stat().st_mode) == 0o600
    assert keys("generate", str(old_key)).returncode != 0  # never overwrites a key
    made = keys("init", "--data-dir", str(data), "--root-key", str(old_key))
    assert made.returncode == 0, made.stderr
    repo, blobs = TrustRepository(data / "tuf"), BlobStore(data / "blobs")
    assert not (repo.keys_dir / "root.pem").exists()  # the controller never holds it
    device_root = repo.trusted_root()

    refused = keys("rotate-root", "--data-dir", str(data))  # the old key is offline
    assert refused.returncode != 0
    assert "--old-key" in refused.stderr
    keys("generate", str(new_key))
    rotated = keys("rotate-root", "--data-dir", str(data), "--old-key", str(old_key),
                   "--new-key", str(new_key))
    assert rotated.returncode == 0, rotated.stderr
    assert "root version 2" in rotated.stdout
    assert not (repo.keys_dir / "root.pem").exists()

    publish(repo, blobs, {"models/m/1.0.0/source.onnx": b"model"}, now=NOW)
    device = updater(repo, blobs, tmp_path / "device", root=device_root)
    assert download(device, "models/m/1.0.0/source.onnx") == b"model"
    trusted = json.loads((tmp_path / "device" / "meta" / "root.json").read_bytes())
    assert trusted["signed"]["version"] == 2
