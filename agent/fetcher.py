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
    """One request at a time to the controller; ``publish(payload)`` sends a request."""

    def __init__(self, publish: Callable[[bytes], object]) -> None:
        self._publish = publish
        self._cond = threading.Condition()
        self._waiting: str | None = None
        self._answer: tuple[FetchResponse, bytes] | None = None

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
                 timeout: float = 10.0, attempts: int = 6, backoff: float = 0.5,
                 on_progress: Callable[[str, int, int], None] | None = None) -> None:
        self._channel = channel
        self._chunk, self._timeout, self._attempts, self._backoff = (chunk_size, timeout,
                                                                     attempts, backoff)
        self._on_progress = on_progress

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith("mqtt:"):
            raise exceptions.DownloadError(f"not an MQTT URL: {url}")
        path = url.removeprefix("mqtt:")
        offset, total = 0, None
        while total is None or offset < total:
            response, data = self._chunk_at(path, offset)
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
        delay = self._backoff
        for attempt in range(1, self._attempts + 1):
            answer = self._channel.request(path, offset, self._chunk, self._timeout)
            if answer is not None:
                return answer
            log.info("no answer for %s at %d (attempt %d of %d); retrying in %.1fs", path,
                     offset, attempt, self._attempts, delay)
            time.sleep(delay)  # backoff between retries, not synchronisation
            delay = min(delay * 2, 10.0)
        raise FetchTimeout(f"the controller did not answer for {path} at offset {offset} "
                           f"after {self._attempts} attempts")
