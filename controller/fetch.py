"""Serves TUF metadata and signed blobs to devices over MQTT (``shared.fetch``).

Requests arrive on the network thread and are answered from a small thread pool, so a
slow disk never stalls ingestion. A device may fetch any served metadata file and the
blob of any *currently signed* target, by its hash; nothing else in the blob store.
Answers go to the requesting device's own ``data`` topic, which only it may read.
"""

import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from controller.registry.blobs import BlobStore
from controller.registry.trust import TrustRepository
from shared.errors import ProtocolError
from shared.fetch import FetchRequest, FetchResponse, decode_request, encode_response
from shared.topics import Kind, Topics

log = logging.getLogger(__name__)

_TARGET_NAME = re.compile(r"^([0-9a-f]{64})\.[^/]+$")


class FetchServer:
    """Answers devices' fetch requests; ``publish(topic, payload)`` sends an answer."""

    def __init__(self, trust: TrustRepository, blobs: BlobStore, topics: Topics,
                 publish: Callable[[str, bytes], None], *, workers: int = 4) -> None:
        self._trust, self._blobs, self._topics, self._publish = trust, blobs, topics, publish
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")
        self._signed: tuple[int, frozenset[str]] = (-1, frozenset())
        self.served_bytes = 0

    def submit(self, device_id: str, payload: bytes) -> None:
        """From the MQTT network thread: answer later, on a pool thread."""
        self._pool.submit(self._serve, device_id, payload)

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _serve(self, device_id: str, payload: bytes) -> None:
        try:
            request = decode_request(payload)
        except ProtocolError as exc:
            log.warning("dropped a fetch request from %s: %s", device_id, exc)
            return
        try:
            response, data = self.answer(request)
        except Exception:
            log.exception("answering %s's fetch of %s failed", device_id, request.path)
            return
        self.served_bytes += len(data)
        self._publish(self._topics.device(device_id, Kind.DATA), encode_response(response, data))

    def answer(self, request: FetchRequest) -> tuple[FetchResponse, bytes]:
        """The response to ``request`` and its chunk."""
        kind, _, name = request.path.partition("/")
        if kind == "meta":
            whole = self._trust.read(name)
            if whole is None:
                return self._missing(request, f"no metadata {name}"), b""
            total = len(whole)
            data = whole[request.offset:request.offset + request.length]
        else:
            match = _TARGET_NAME.match(name.rpartition("/")[2])
            sha = match.group(1) if match else None
            blob = self._blobs.get(sha) if sha and sha in self._signed_hashes() else None
            if blob is None:
                return self._missing(request, f"no signed target {name}"), b""
            total = blob.size
            with blob.path.open("rb") as f:
                f.seek(request.offset)
                data = f.read(request.length)
        if request.offset > total:
            return FetchResponse(id=request.id, status="bad_request", total=total,
                                 error=f"offset {request.offset} is past the end ({total})"), b""
        return FetchResponse(id=request.id, status="ok", offset=request.offset,
                             total=total), data

    @staticmethod
    def _missing(request: FetchRequest, why: str) -> FetchResponse:
        return FetchResponse(id=request.id, status="not_found", error=why)

    def _signed_hashes(self) -> frozenset[str]:
        """Hashes of the signed targets, re-read when a new targets version is out."""
        version = self._trust.load("timestamp").signed.snapshot_meta.version
        if version != self._signed[0]:
            hashes = frozenset(t.hashes["sha256"] for t in self._trust.targets().values())
            self._signed = (version, hashes)
        return self._signed[1]
