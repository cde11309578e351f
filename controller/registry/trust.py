"""The controller's TUF repository (python-tuf Metadata API), on the filesystem.

Four top-level roles with one Ed25519 key each, consistent snapshots, and every
model variant as a target whose ``custom`` field carries what the agent needs.
Private keys are PEM files with mode 0600 under ``keys/``; the root key may be
kept offline (``initialize(root_signer=...)``, ``rotate_root``), in which case the
controller never holds it. Metadata files are written atomically.

Served names (what a client asks for): ``N.root.json``, ``N.targets.json``,
``N.snapshot.json`` and ``timestamp.json``. Verification is the client's job
(``tuf.ngclient.Updater``); nothing here checks signatures by hand.
"""

import re
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from controller.security import write_secret_file

ROLES = ("root", "targets", "snapshot", "timestamp")
LIFETIME = {"root": timedelta(days=365), "targets": timedelta(days=90),
            "snapshot": timedelta(days=7), "timestamp": timedelta(days=1)}
_SERVED = re.compile(r"^(?:(\d+)\.(root|targets|snapshot)|timestamp)\.json$")
_SERIALIZER = JSONSerializer(compact=True)


class TrustError(Exception):
    """The repository is missing, or a key it needs is not here."""


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_signer() -> tuple[CryptoSigner, bytes]:
    """A fresh Ed25519 signer and its private key as PEM (to store, or keep offline)."""
    key = Ed25519PrivateKey.generate()
    return CryptoSigner(key), _pem(key)


def signer_from_pem(pem: bytes) -> CryptoSigner:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustError("not an Ed25519 private key")
    return CryptoSigner(key)


class TrustRepository:
    """Creates, signs and serves the TUF metadata of the model registry."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.metadata_dir = directory / "metadata"
        self.keys_dir = directory / "keys"
        self._lock = threading.RLock()

    # -- set-up ---------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.metadata_dir / "timestamp.json").exists()

    def initialize(self, *, now: datetime, root_signer: Signer | None = None) -> None:
        """Create version 1 of every role. Without ``root_signer`` a root key is made
        and stored here; with one (an offline key), no root key is kept."""
        with self._lock:
            if self.exists():
                raise TrustError(f"a TUF repository already exists in {self.dir}")
            self.metadata_dir.mkdir(parents=True, exist_ok=True)
            signers: dict[str, Signer] = {}
            for role in ROLES:
                if role == "root" and root_signer is not None:
                    signers[role] = root_signer
                    continue
                signer, pem = new_signer()
                write_secret_file(self.keys_dir / f"{role}.pem", pem)
                signers[role] = signer
            root = Root(expires=now + LIFETIME["root"], consistent_snapshot=True)
            for role in ROLES:
                key = signers[role].public_key
                root.add_key(key, role)
            self._write(Metadata(root), [signers["root"]])
            targets = Metadata(Targets(expires=now + LIFETIME["targets"]))
            self._write(targets, [signers["targets"]])
            snapshot = Metadata(Snapshot(expires=now + LIFETIME["snapshot"]))
            self._write(snapshot, [signers["snapshot"]])
            timestamp = Metadata(Timestamp(expires=now + LIFETIME["timestamp"]))
            self._write(timestamp, [signers["timestamp"]])

    # -- reading --------------------------------------------------------------------------

    def load(self, role: str) -> Metadata[Any]:
        path = self.metadata_dir / f"{role}.json"
        if not path.exists():
            raise TrustError(f"no {role} metadata in {self.metadata_dir}; is the repository "
                             "initialised?")
        return Metadata.from_bytes(path.read_bytes())

    def read(self, name: str) -> bytes | None:
        """The bytes of a served metadata file, or None if there is no such file."""
        if not _SERVED.match(name):
            return None
        path = self.metadata_dir / name
        return path.read_bytes() if path.exists() else None

    def trusted_root(self) -> bytes:
        """``1.root.json``: what a device is given at enrolment to bootstrap trust."""
        data = self.read("1.root.json")
        if data is None:
            raise TrustError("the repository has no 1.root.json")
        return data

    def targets(self) -> dict[str, TargetFile]:
        return dict(self.load("targets").signed.targets)

    # -- changes --------------------------------------------------------------------------

    def set_targets(self, targets: dict[str, TargetFile], *, now: datetime) -> None:
        """Publish a new set of targets: new targets, snapshot and timestamp versions."""
        with self._lock:
            md = self.load("targets")
            md.signed.targets = dict(targets)
            self._bump(md, now)
            self._write(md, [self._signer("targets")])
            self._publish_snapshot(md.signed.version, now=now)

    def refresh(self, *, now: datetime, margin: timedelta = timedelta(hours=12)) -> bool:
        """Re-sign the timestamp (and snapshot) if it expires within ``margin``; the
        scheduler calls this so devices never see expired metadata. True if it did."""
        with self._lock:
            timestamp = self.load("timestamp")
            snapshot = self.load("snapshot")
            if snapshot.signed.expires - now < max(margin, LIFETIME["snapshot"] / 2):
                self._publish_snapshot(self.load("targets").signed.version, now=now)
                return True
            if timestamp.signed.expires - now < margin:
                self._bump(timestamp, now)
                self._write(timestamp, [self._signer("timestamp")])
                return True
            return False

    def rotate_root(self, new_root_signer: Signer, *, now: datetime,
                    old_root_signer: Signer | None = None, new_key_pem: bytes | None = None
                    ) -> None:
        """Replace the root key: the new root is signed by the old and the new key, so
        clients holding the old root accept it. Give ``old_root_signer`` when the root
        key is kept offline, and ``new_key_pem`` to store the new key here."""
        with self._lock:
            old_signer = old_root_signer or self._signer("root")
            md = self.load("root")
            root = md.signed
            for keyid in list(root.roles["root"].keyids):
                root.revoke_key(keyid, "root")
            root.add_key(new_root_signer.public_key, "root")
            root.roles["root"] = Role([new_root_signer.public_key.keyid], threshold=1)
            self._bump(md, now)
            md.signatures.clear()
            md.sign(old_signer, append=True)
            md.sign(new_root_signer, append=True)
            self._save(md)
            if new_key_pem is not None:
                write_secret_file(self.keys_dir / "root.pem", new_key_pem)
            else:
                (self.keys_dir / "root.pem").unlink(missing_ok=True)

    # -- internals ------------------------------------------------------------------------

    def _publish_snapshot(self, targets_version: int, *, now: datetime) -> None:
        snapshot = self.load("snapshot")
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets_version)
        self._bump(snapshot, now)
        self._write(snapshot, [self._signer("snapshot")])
        timestamp = self.load("timestamp")
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        self._bump(timestamp, now)
        self._write(timestamp, [self._signer("timestamp")])

    @staticmethod
    def _bump(md: Metadata[Any], now: datetime) -> None:
        md.signed.version += 1
        md.signed.expires = now + LIFETIME[md.signed.type]

    def _signer(self, role: str) -> Signer:
        path = self.keys_dir / f"{role}.pem"
        if not path.exists():
            raise TrustError(f"the {role} key is not on this controller ({path})")
        return signer_from_pem(path.read_bytes())

    def _write(self, md: Metadata[Any], signers: list[Signer]) -> None:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        self._save(md)

    def _save(self, md: Metadata[Any]) -> None:
        role, data = md.signed.type, md.to_bytes(_SERIALIZER)
        if role != "timestamp":
            write_secret_file(self.metadata_dir / f"{md.signed.version}.{role}.json", data)
        write_secret_file(self.metadata_dir / f"{role}.json", data)
