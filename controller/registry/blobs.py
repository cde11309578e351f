"""Content-addressed blob store on the filesystem.

A blob lives at ``<root>/sha256/<ab>/<full hex digest>``. Writes stream to a temp
file in the same directory tree, are fsynced and renamed into place, so a reader
never sees a partial blob and a crash leaves at most a stray temp file (removed by
``collect``). Identical content is stored once.
"""

import hashlib
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_TMP = ".tmp"


class BlobTooLarge(Exception):
    """The stream went over the size cap; nothing was stored."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"upload is larger than the {limit}-byte limit")
        self.limit = limit


@dataclass(frozen=True)
class Blob:
    sha256: str
    size: int
    path: Path


class BlobStore:
    """Stores and finds blobs by their sha256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        (root / _TMP).mkdir(exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def get(self, sha256: str) -> Blob | None:
        path = self.path(sha256)
        try:
            return Blob(sha256, path.stat().st_size, path)
        except FileNotFoundError:
            return None

    def put(self, chunks: Iterable[bytes], *, max_bytes: int) -> Blob:
        """Stream ``chunks`` into the store; raise BlobTooLarge past ``max_bytes``."""
        tmp = self.root / _TMP / f"{secrets.token_hex(8)}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            with tmp.open("wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise BlobTooLarge(max_bytes)
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            sha = digest.hexdigest()
            final = self.path(sha)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return Blob(sha, size, final)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, data: bytes, *, max_bytes: int | None = None) -> Blob:
        return self.put([data], max_bytes=len(data) if max_bytes is None else max_bytes)

    def delete(self, sha256: str) -> bool:
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def all(self) -> Iterator[str]:
        for path in (self.root / "sha256").glob("*/*"):
            yield path.name

    def collect(self, referenced: set[str], *, stray_after_s: float = 3600) -> list[str]:
        """Delete blobs not in ``referenced``, and temp files older than ``stray_after_s``
        (a crashed upload's); return the digests deleted."""
        gone = [sha for sha in self.all() if sha not in referenced and self.delete(sha)]
        cutoff = time.time() - stray_after_s
        for stray in (self.root / _TMP).glob("*.part"):
            if stray.stat().st_mtime < cutoff:
                stray.unlink(missing_ok=True)
        return gone


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
