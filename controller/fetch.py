"""Serves TUF metadata and signed blobs to devices over MQTT (``shared.fetch``).

Requests arrive on the network thread and are answered from a small thread pool, so a
slow disk never stalls ingestion. A device may fetch any served metadata file and the
blob of any *currently signed* target, by its hash; nothing else in the blob store.
Answers go to the requesting device's own ``data`` topic, which only it may read.
"""

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from controller.registry.blobs import BlobStore
from controller.registry.trust import TrustRepository
from shared.errors import ProtocolError
from shared.fetch import (
    FetchRequest,
    FetchResponse,
    decode_request,
    encode_response,
    target_digest,
)
from shared.topics import Kind, Topics

log = logging.getLogger(__name__)

Chunk = tuple[str, int, int]  # blob sha256, offset, length


class FetchServer:
    """Answers devices' fetch requests; ``publish(topic, payload)`` sends an answer."""

    def __init__(self, trust: TrustRepository, blobs: BlobStore, topics: Topics,
                 publish: Callable[[str, bytes], None], *, workers: int = 4,
                 coalesce: float = 0.25, clock: Callable[[], float] = time.monotonic) -> None:
        self._trust, self._blobs, self._topics, self._publish = trust, blobs, topics, publish
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")
        self._signed: tuple[int, frozenset[str]] = (-1, frozenset())
        self._clock = clock
        self._published: dict[Chunk, float] = {}  # shared chunk -> when broadcast
        self._pending: dict[Chunk, float] = {}  # shared chunk -> when it will be again
        self._coalesce, self._recent = coalesce, 5.0
        self._later: queue.Queue[tuple[float, list[tuple[str, bytes, Chunk]]] | None] = \
            queue.Queue()
        self._republisher = threading.Thread(target=self._republish, name="fetch-republish",
                                             daemon=True)
        self._republisher.start()
        self._watching: dict[tuple[str, str], float] = {}  # (device, download id) -> since
        self._askers: dict[str, OrderedDict[str, float]] = {}  # blob -> device -> last ask
        self._lock = threading.Lock()
        self.published_bytes = 0  # what this controller sent (the fan-out benchmark's figure)
        self.broadcast_bytes = 0  # of which on blob topics (the rest: to single devices)
        self.held_chunks = 0  # republications held to gather late joiners

    def submit(self, device_id: str, payload: bytes) -> None:
        """From the MQTT network thread: answer later, on a pool thread."""
        self._pool.submit(self._serve, device_id, payload, self._clock())

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._later.put(None)
        self._republisher.join(5)

    def _serve(self, device_id: str, payload: bytes, received_at: float) -> None:
        try:
            request = decode_request(payload)
        except ProtocolError as exc:
            log.warning("dropped a fetch request from %s: %s", device_id, exc)
            return
        own = self._topics.device(device_id, Kind.DATA)
        sha = target_digest(request.path)
        # A device subscribes to the blob topic before its first request for the blob, so
        # from then on it gets every chunk published there; a retry is re-sent to it alone.
        shared = sha if request.shared and not request.retry else None
        since = self._since((device_id, request.id), received_at) if shared else 0.0
        crowded = self._crowded(shared, device_id, received_at) if shared else False

        later: set[int] = set()

        def wanted(offset: int) -> bool:  # not published to the blob topic since then
            if not shared:
                return True
            verdict = self._claim((shared, offset, request.length), since, crowded)
            if verdict == "later":
                later.add(offset)
            return verdict != "skip"

        deferred: list[tuple[str, bytes, Chunk]] = []
        try:
            for response, data in self.answers(request, wanted):
                ok = shared is not None and response.status == "ok"
                topic = self._topics.blob(shared) if ok and shared else own
                if ok and shared and response.offset in later:
                    deferred.append((topic, encode_response(response, data),
                                     (shared, response.offset, request.length)))
                else:
                    self._send(topic, encode_response(response, data), broadcast=topic != own)
        except Exception:
            log.exception("answering %s's fetch of %s failed", device_id, request.path)
        if deferred:
            with self._lock:
                self.held_chunks += len(deferred)
            self._later.put((self._clock() + self._coalesce, deferred))

    def _send(self, topic: str, payload: bytes, *, broadcast: bool) -> None:
        size = payload.find(b"\n")
        with self._lock:
            self.published_bytes += len(payload) - size - 1
            if broadcast:
                self.broadcast_bytes += len(payload) - size - 1
        self._publish(topic, payload)

    def _republish(self) -> None:
        """The coalescing thread: send held republications when they are due."""
        while (item := self._later.get()) is not None:
            due, batch = item
            time.sleep(max(0.0, due - self._clock()))  # holding them is the point
            for topic, payload, chunk in batch:
                self._send(topic, payload, broadcast=True)
                with self._lock:
                    self._published[chunk] = self._clock()
                    self._pending.pop(chunk, None)

    def _since(self, key: tuple[str, str], received_at: float) -> float:
        with self._lock:
            if len(self._watching) > 100_000:  # forget downloads idle for ten minutes
                self._watching = {k: t for k, t in self._watching.items()
                                  if received_at - t < 600}
            return self._watching.setdefault(key, received_at)

    def _crowded(self, sha: str, device_id: str, now: float) -> bool:
        """Whether another device asked for blob ``sha`` in the last ``recent`` seconds:
        a fleet is fetching it, and more late joiners are coming."""
        with self._lock:
            askers = self._askers.setdefault(sha, OrderedDict())
            askers[device_id] = now
            askers.move_to_end(device_id)
            while now - next(iter(askers.values())) > self._recent:
                askers.popitem(last=False)
            return len(askers) > 1

    def _claim(self, chunk: Chunk, since: float, crowded: bool) -> str:
        """``skip`` if ``chunk`` was (or will be) broadcast since ``since``; ``later`` if it
        was broadcast before and others are fetching the blob too (more who joined late
        will ask: one republication after ``coalesce`` seconds serves them all); else
        ``now``."""
        now = self._clock()
        with self._lock:
            last, pending = self._published.get(chunk), self._pending.get(chunk)
            if (last is not None and last >= since) or (pending is not None
                                                         and pending >= since):
                return "skip"
            if len(self._published) > 1_000_000:
                self._published = {k: t for k, t in self._published.items() if now - t < 600}
            if last is not None and crowded:
                self._pending[chunk] = now + self._coalesce
                return "later"
            self._published[chunk] = now
            return "now"

    def answers(self, request: FetchRequest, wanted: Callable[[int], bool] = lambda _: True
                ) -> Iterator[tuple[FetchResponse, bytes]]:
        """The responses to ``request`` with their chunks: one for metadata, up to
        ``count`` for a target (those at offsets ``wanted`` accepts; the file opened once)."""
        kind, _, name = request.path.partition("/")
        if kind == "meta":
            whole = self._trust.read(name)
            if whole is None:
                yield self._missing(request, f"no metadata {name}"), b""
            elif request.offset > len(whole):
                yield self._past_end(request, len(whole)), b""
            else:
                yield FetchResponse(id=request.id, status="ok", offset=request.offset,
                                    total=len(whole)), \
                    whole[request.offset:request.offset + request.length]
            return
        sha = target_digest(request.path)
        blob = self._blobs.get(sha) if sha and sha in self._signed_hashes() else None
        if blob is None:
            yield self._missing(request, f"no signed target {name}"), b""
            return
        if request.offset > blob.size:
            yield self._past_end(request, blob.size), b""
            return
        with blob.path.open("rb") as f:
            for n in range(request.count):
                offset = request.offset + n * request.length
                if n and offset >= blob.size:
                    return
                if wanted(offset):
                    f.seek(offset)
                    yield FetchResponse(id=request.id, status="ok", offset=offset,
                                        total=blob.size), f.read(request.length)

    @staticmethod
    def _past_end(request: FetchRequest, total: int) -> FetchResponse:
        return FetchResponse(id=request.id, status="bad_request", total=total,
                             error=f"offset {request.offset} is past the end ({total})")

    @staticmethod
    def _missing(request: FetchRequest, why: str) -> FetchResponse:
        return FetchResponse(id=request.id, status="not_found", error=why)

    def _signed_hashes(self) -> frozenset[str]:
        """Hashes of the signed targets, re-read when targets.json changes (by mtime)."""
        stamp = (self._trust.metadata_dir / "targets.json").stat().st_mtime_ns
        if stamp != self._signed[0]:
            hashes = frozenset(t.hashes["sha256"] for t in self._trust.targets().values())
            self._signed = (stamp, hashes)
        return self._signed[1]

