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

from shared.files import fsync_dir

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
    created: bool = False  # this write added it (it was not stored before)


class BlobWriter:
    """An upload in progress: ``write`` chunks, then ``commit`` (or ``abort``)."""

    def __init__(self, store: "BlobStore", max_bytes: int) -> None:
        self._store, self._max = store, max_bytes
        self._tmp = store.root / _TMP / f"{secrets.token_hex(8)}.part"
        self._file = self._tmp.open("wb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max:
            raise BlobTooLarge(self._max)
        self._digest.update(chunk)
        self._file.write(chunk)

    def commit(self) -> Blob:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        sha = self._digest.hexdigest()
        final = self._store.path(sha)
        final.parent.mkdir(exist_ok=True)
        existed = final.exists()
        os.replace(self._tmp, final)
        fsync_dir(final.parent)
        return Blob(sha, self.size, final, created=not existed)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._file.closed:
            self.abort()


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

    def writer(self, *, max_bytes: int) -> BlobWriter:
        """Start a streamed write; use as a context manager so a failure aborts it."""
        return BlobWriter(self, max_bytes)

    def put(self, chunks: Iterable[bytes], *, max_bytes: int) -> Blob:
        """Stream ``chunks`` into the store; raise BlobTooLarge past ``max_bytes``."""
        with self.writer(max_bytes=max_bytes) as w:
            for chunk in chunks:
                w.write(chunk)
            return w.commit()

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
        """Delete blobs not in ``referenced`` and temp files (a crashed upload's), both
        only when older than ``stray_after_s``: a push in progress has a stored blob
        that is not referenced yet. Return the digests deleted."""
        cutoff = time.time() - stray_after_s
        gone = [sha for sha in self.all()
                if sha not in referenced and self.path(sha).stat().st_mtime < cutoff
                and self.delete(sha)]
        for stray in (self.root / _TMP).glob("*.part"):
            if stray.stat().st_mtime < cutoff:
                stray.unlink(missing_ok=True)
        return gone
