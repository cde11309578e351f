"""TUF downloads over MQTT: a ``tuf.ngclient`` fetcher that asks the controller per chunk.

``FetchChannel`` sends one ``FetchRequest`` on the device's ``fetch`` topic and waits
for the matching response on its ``data`` topic (fed by ``deliver`` from the MQTT
callback). ``MqttFetcher`` turns a URL into requests by offset, so a download cut by a
disconnect carries on from the last chunk it got; each request is retried with backoff
and given up after ``attempts``. The Updater verifies everything it gets.
"""

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator

from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

from shared.errors import ProtocolError
from shared.fetch import DEFAULT_CHUNK, FetchRequest, FetchResponse, decode_response, encode_request

log = logging.getLogger(__name__)

META_URL = "mqtt:meta/"
TARGETS_URL = "mqtt:targets/"


class FetchTimeout(exceptions.DownloadError):
    """The controller did not answer a chunk request in time, after every retry."""


class FetchChannel:
    """One request at a time to the controller; ``publish(payload)`` sends a request.

    For shared blob downloads, ``watch(sha)`` subscribes to the blob's broadcast topic
    (``subscribe(sha)``) and keeps every chunk that arrives there, in order or ahead,
    up to ``max_ahead`` bytes; ``unwatch`` stops.
    """

    def __init__(self, publish: Callable[[bytes], object], *,
                 subscribe: Callable[[str], object] | None = None,
                 unsubscribe: Callable[[str], object] | None = None,
                 max_ahead: int = 64 << 20) -> None:
        self._publish = publish
        self._subscribe, self._unsubscribe = subscribe, unsubscribe
        self._cond = threading.Condition()
        self._waiting: str | None = None
        self._answer: tuple[FetchResponse, bytes] | None = None
        self._watched: str | None = None
        self._chunks: dict[int, tuple[int, bytes]] = {}  # offset -> (total, data)
        self._max_ahead = max_ahead

    @property
    def shares(self) -> bool:
        return self._subscribe is not None

    def watch(self, sha: str) -> None:
        with self._cond:
            self._watched, self._chunks = sha, {}
        if self._subscribe is not None:
            self._subscribe(sha)

    def unwatch(self, sha: str) -> None:
        with self._cond:
            self._watched, self._chunks = None, {}
        if self._unsubscribe is not None:
            self._unsubscribe(sha)

    def shared_chunk(self, path: str, offset: int, length: int, timeout: float
                     ) -> tuple[FetchResponse, bytes] | tuple[int, bytes] | None:
        """The chunk at ``offset`` of the watched blob: already here, or asked for (it
        comes on the blob topic, or an error comes to this device). None on timeout."""
        with self._cond:
            if offset in self._chunks:
                return self._chunks.pop(offset)
        request_id = secrets.token_hex(8)
        with self._cond:
            self._waiting, self._answer = request_id, None
        self._publish(encode_request(FetchRequest(id=request_id, path=path, offset=offset,
                                                  length=length, shared=True)))
        with self._cond:
            self._cond.wait_for(lambda: offset in self._chunks or self._answer is not None,
                                timeout)
            answer, self._waiting, self._answer = self._answer, None, None
            if offset in self._chunks:
                return self._chunks.pop(offset)
        return answer

    def deliver_shared(self, sha: str, payload: bytes) -> None:
        """From the MQTT callback: a chunk broadcast on a blob topic."""
        try:
            response, data = decode_response(payload)
        except ProtocolError as exc:
            log.warning("dropped a malformed blob chunk: %s", exc)
            return
        with self._cond:
            held = sum(len(d) for _, d in self._chunks.values())
            if sha != self._watched or response.status != "ok" or held > self._max_ahead:
                return
            self._chunks[response.offset] = (response.total, data)
            self._cond.notify_all()

    def request(self, path: str, offset: int, length: int, timeout: float
                ) -> tuple[FetchResponse, bytes] | None:
        """The response to one request, or None if none came within ``timeout``."""
        request_id = secrets.token_hex(8)
        with self._cond:
            self._waiting, self._answer = request_id, None
        self._publish(encode_request(FetchRequest(id=request_id, path=path, offset=offset,
                                                  length=length)))
        with self._cond:
            self._cond.wait_for(lambda: self._answer is not None, timeout)
            answer, self._waiting, self._answer = self._answer, None, None
        return answer

    def deliver(self, payload: bytes) -> None:
        """From the MQTT callback: hand a response to the waiting request (others: drop)."""
        try:
            response, data = decode_response(payload)
        except ProtocolError as exc:
            log.warning("dropped a malformed fetch response: %s", exc)
            return
        with self._cond:
            if response.id == self._waiting:
                self._answer = (response, data)
                self._cond.notify_all()


class MqttFetcher(FetcherInterface):
    """Fetches ``mqtt:meta/...`` and ``mqtt:targets/...`` URLs chunk by chunk."""

    def __init__(self, channel: FetchChannel, *, chunk_size: int = DEFAULT_CHUNK,
                 timeout: float = 10.0, shared_timeout: float = 3.0, attempts: int = 6,
                 backoff: float = 0.5,
                 on_progress: Callable[[str, int, int], None] | None = None) -> None:
        self._channel = channel
        self._shared_timeout = shared_timeout
        self._chunk, self._timeout, self._attempts, self._backoff = (chunk_size, timeout,
                                                                     attempts, backoff)
        self._on_progress = on_progress

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith("mqtt:"):
            raise exceptions.DownloadError(f"not an MQTT URL: {url}")
        path = url.removeprefix("mqtt:")
        sha = _blob_digest(path) if self._channel.shares else None
        if sha is None:
            yield from self._chunks(path, self._chunk_at)
            return
        self._channel.watch(sha)
        try:
            yield from self._chunks(path, self._shared_chunk_at)
        finally:
            self._channel.unwatch(sha)

    def _chunks(self, path: str, get: Callable[[str, int], tuple[FetchResponse, bytes]]
                ) -> Iterator[bytes]:
        offset, total = 0, None
        while total is None or offset < total:
            response, data = get(path, offset)
            if response.status == "not_found":
                raise exceptions.DownloadHTTPError(response.error or f"{path} not found", 404)
            if response.status != "ok" or response.offset != offset:
                raise exceptions.DownloadError(f"fetching {path} at {offset}: {response.error}")
            total = response.total
            if not data and offset < total:
                raise exceptions.DownloadError(f"empty chunk of {path} at {offset} of {total}")
            offset += len(data)
            if self._on_progress is not None:
                self._on_progress(path, offset, total)
            yield data

    def _chunk_at(self, path: str, offset: int) -> tuple[FetchResponse, bytes]:
        return self._retrying(path, offset, lambda: self._channel.request(
            path, offset, self._chunk, self._timeout))

    def _shared_chunk_at(self, path: str, offset: int) -> tuple[FetchResponse, bytes]:
        def once() -> tuple[FetchResponse, bytes] | None:
            got = self._channel.shared_chunk(path, offset, self._chunk, self._shared_timeout)
            if got is None or isinstance(got[0], FetchResponse):
                return got
            total, data = got
            return FetchResponse(id="shared", status="ok", offset=offset, total=total), data
        return self._retrying(path, offset, once)

    def _retrying(self, path: str, offset: int,
                  once: Callable[[], tuple[FetchResponse, bytes] | None]
                  ) -> tuple[FetchResponse, bytes]:
        delay = self._backoff
        for attempt in range(1, self._attempts + 1):
            answer = once()
            if answer is not None:
                return answer
            log.info("no answer for %s at %d (attempt %d of %d); retrying in %.1fs", path,
                     offset, attempt, self._attempts, delay)
            time.sleep(delay)  # backoff between retries, not synchronisation
            delay = min(delay * 2, 10.0)
        raise FetchTimeout(f"the controller did not answer for {path} at offset {offset} "
                           f"after {self._attempts} attempts")


def _blob_digest(path: str) -> str | None:
    """The sha256 of a ``targets/.../<sha256>.<name>`` path (consistent snapshots)."""
    if not path.startswith("targets/"):
        return None
    digest = path.rpartition("/")[2].partition(".")[0]
    return digest if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) else None
