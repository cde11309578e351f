"""TUF downloads over MQTT: a ``tuf.ngclient`` fetcher that asks the controller per chunk.

``FetchChannel`` carries requests on the device's ``fetch`` topic and answers from its
``data`` topic and, for shared blobs, the blob's broadcast topic (fed by ``deliver`` and
``deliver_shared`` from the MQTT callback). ``MqttFetcher`` fetches metadata one chunk
at a time and blobs with a window of chunks in flight (a stop-and-wait transfer is
bound by round trips, and a broker without TCP_NODELAY adds ~40 ms to each). Chunks are
asked for by offset, so a download cut by a disconnect carries on from the last chunk
it got; a chunk is asked again with backoff and given up after ``attempts``. How long a
blob download waits for its next chunk follows the gaps between the chunks it gets
(``Pace``), and it asks for a few chunks ahead until it has measured the link's rate,
so a slow link is not sent each chunk several times. The
Updater verifies the metadata it gets; ``download_verified`` checks a blob against the
Updater's signed target info.
"""

import errno
import hashlib
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tuf.api import exceptions
from tuf.api.metadata import TargetFile
from tuf.ngclient.fetcher import FetcherInterface

from agent.faults import crash_point
from shared.errors import ProtocolError
from shared.fetch import (
    DEFAULT_CHUNK,
    FetchRequest,
    FetchResponse,
    decode_response,
    encode_request,
    target_digest,
)
from shared.files import write_atomic

log = logging.getLogger(__name__)

#: how often a growing download is synced and its length recorded (its resume points)
CHECKPOINT = 4 << 20
#: at most this many seconds of the link's measured rate is asked for ahead of a download
AHEAD_S = 4.0
#: chunks asked for at first, before the link's rate is measured
SLOW_START = 4
#: where in a download the ``download_half`` crash point fires (the resume tests)
RESUME_TEST_CRASH = 0.5

META_URL = "mqtt:meta/"
TARGETS_URL = "mqtt:targets/"


class Pace:
    """How long to wait for the next chunk of a download, from the gaps between chunks
    as they arrive (RFC 6298's estimator, on inter-arrival gaps rather than round trips):
    the smoothed gap plus four times its variation, at least ``floor`` and at most
    ``cap``; doubled after each miss (Karn), until a chunk arrives again. Before any
    chunk it is ``first``: the first one also carries a round trip and a queue. A fixed
    timeout shorter than one chunk's time on the link gives up on every chunk in flight
    and asks for it again: each chunk crosses the link several times."""

    def __init__(self, floor: float, first: float, cap: float) -> None:
        self.floor, self.cap = floor, cap
        self._first = max(first, floor)
        self._gap: float | None = None
        self._var = 0.0
        self._last: float | None = None
        self._backoff = 1

    def asked(self, now: float) -> None:
        """A request went out; the first gap runs from the first one."""
        if self._last is None:
            self._last = now

    def arrived(self, now: float) -> None:
        if self._last is not None and self._backoff == 1:
            gap = now - self._last
            if self._gap is None:
                self._gap, self._var = gap, gap / 2
            else:
                self._var = 0.75 * self._var + 0.25 * abs(self._gap - gap)
                self._gap = 0.875 * self._gap + 0.125 * gap
        self._last, self._backoff = now, 1

    def missed(self) -> None:
        self._backoff = min(self._backoff * 2, 64)

    def timeout(self) -> float:
        base = self._first if self._gap is None else self._gap + 4 * self._var
        return min(self.cap, max(self.floor, base) * self._backoff)


class FetchTimeout(exceptions.DownloadError):
    """The controller did not answer a chunk request in time, after every retry."""


Answer = tuple[FetchResponse, bytes]


class FetchChannel:
    """Requests to the controller and their answers; ``publish(payload)`` sends one.

    ``request`` is one request and its answer (metadata). A blob download ``watch``es
    the blob: answers for it are kept by offset, whether they come to this device or,
    when ``subscribe`` is given, on the blob's broadcast topic, up to ``max_ahead`` bytes.
    """

    def __init__(self, publish: Callable[[bytes], object], *,
                 subscribe: Callable[[str], object] | None = None,
                 unsubscribe: Callable[[str], object] | None = None,
                 max_ahead: int = 64 << 20) -> None:
        self._publish = publish
        self._subscribe, self._unsubscribe = subscribe, unsubscribe
        self._cond = threading.Condition()
        self._waiting: str | None = None
        self._answer: Answer | None = None
        self._watched: str | None = None
        self._watch_id = ""
        self._chunks: dict[int, Answer] = {}
        self._position = 0  # the offset the download waits for next
        self.last_arrival = 0.0  # when a chunk of the watched blob last came in
        self._pace: Pace | None = None
        self._max_ahead = max_ahead

    @property
    def shares(self) -> bool:
        return self._subscribe is not None

    def request(self, path: str, offset: int, length: int, timeout: float) -> Answer | None:
        """The answer to one request, or None if none came within ``timeout``."""
        request_id = secrets.token_hex(8)
        with self._cond:
            self._waiting, self._answer = request_id, None
        self._publish(encode_request(FetchRequest(id=request_id, path=path, offset=offset,
                                                  length=length)))
        with self._cond:
            self._cond.wait_for(lambda: self._answer is not None, timeout)
            answer, self._waiting, self._answer = self._answer, None, None
        return answer

    def watch(self, sha: str, pace: "Pace | None" = None) -> None:
        """Keep the chunks of blob ``sha`` that arrive; ``pace`` hears of each arrival."""
        with self._cond:
            self._watched, self._watch_id, self._chunks = sha, secrets.token_hex(8), {}
            self._position, self._pace = 0, pace
        if self._subscribe is not None:
            self._subscribe(sha)

    def unwatch(self, sha: str) -> None:
        with self._cond:
            self._watched, self._chunks, self._pace = None, {}, None
        if self._unsubscribe is not None:
            self._unsubscribe(sha)

    def ask(self, path: str, offset: int, length: int, count: int = 1, *,
            retry: bool = False) -> None:
        """Ask for ``count`` chunks of the watched blob from ``offset``; ``take`` gets them."""
        self._publish(encode_request(FetchRequest(id=self._watch_id, path=path, offset=offset,
                                                  length=length, count=count,
                                                  shared=self.shares, retry=retry)))

    def furthest(self) -> int:
        """The largest offset held (-1 if none)."""
        with self._cond:
            return max(self._chunks, default=-1)

    def held(self, offset: int) -> bool:
        """Whether the chunk at ``offset`` of the watched blob is already here."""
        with self._cond:
            return offset in self._chunks

    def take(self, offset: int, timeout: float) -> Answer | None:
        """The answer for ``offset`` of the watched blob, or None within ``timeout``."""
        with self._cond:
            self._position = offset
            self._cond.wait_for(lambda: offset in self._chunks, timeout)
            return self._chunks.pop(offset, None)

    def deliver(self, payload: bytes) -> None:
        """From the MQTT callback: an answer on this device's ``data`` topic."""
        answer = _decode(payload)
        if answer is None:
            return
        with self._cond:
            if answer[0].id == self._waiting:
                self._answer = answer
            elif answer[0].id == self._watch_id and self._watched is not None:
                self._keep(answer)
            self._cond.notify_all()

    def deliver_shared(self, sha: str, payload: bytes) -> None:
        """From the MQTT callback: a chunk broadcast on a blob topic."""
        answer = _decode(payload)
        if answer is None or answer[0].status != "ok":
            return
        with self._cond:
            if sha == self._watched:
                self._keep(answer)
                self._cond.notify_all()

    def _keep(self, answer: Answer) -> None:
        """Hold a chunk for the download, unless it is behind it (broadcast for others)."""
        self.last_arrival = time.monotonic()
        if self._pace is not None:
            self._pace.arrived(self.last_arrival)
        if answer[0].offset < self._position:
            return
        if sum(len(data) for _, data in self._chunks.values()) <= self._max_ahead:
            self._chunks[answer[0].offset] = answer


def _check_length_and_hashes(info: TargetFile, length: int, digests: dict[str, Any]) -> None:
    if length != info.length:
        raise exceptions.LengthOrHashMismatchError(
            f"Observed length {length} does not match expected length {info.length}")
    for algo, digest in digests.items():
        if digest.hexdigest() != info.hashes[algo]:
            raise exceptions.LengthOrHashMismatchError(
                f"Observed hash {digest.hexdigest()} does not match expected hash "
                f"{info.hashes[algo]}")


def _hasher(algo: str) -> Any:
    """A hash object for a TUF hash algorithm name (python-tuf's names and refusals)."""
    if algo == "blake2b-256":
        return hashlib.blake2b(digest_size=32)
    try:
        return hashlib.new(algo)
    except (ValueError, TypeError):
        raise exceptions.LengthOrHashMismatchError(
            f"Unsupported algorithm '{algo}'") from None


def _decode(payload: bytes) -> Answer | None:
    try:
        return decode_response(payload)
    except ProtocolError as exc:
        log.warning("dropped a malformed fetch answer: %s", exc)
        return None


class MqttFetcher(FetcherInterface):
    """Fetches ``mqtt:meta/...`` and ``mqtt:targets/...`` URLs chunk by chunk."""

    def __init__(self, channel: FetchChannel, *, chunk_size: int = DEFAULT_CHUNK,
                 window: int = 64, timeout: float = 10.0, blob_timeout: float = 3.0,
                 attempts: int = 6, backoff: float = 0.5, stall_s: float = 120.0,
                 quiet: float = 1.0,
                 progress: Callable[[str, int, int], None] | None = None,
                 spool_dir: Path | None = None) -> None:
        self._channel = channel
        self._progress = progress  # (target path, bytes so far, total) after every chunk
        self._spool_dir = spool_dir
        self._chunk, self._window = chunk_size, window
        self._timeout, self._blob_timeout = timeout, blob_timeout
        self._attempts, self._backoff, self._stall_s = attempts, backoff, stall_s
        self._quiet = quiet

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """As python-tuf's, but spooled in ``spool_dir`` (the agent's state directory)
        rather than the system's temporary directory: on an edge box /tmp is often a
        small RAM disk, and a full disk must show up where the free-space check looked."""
        if self._spool_dir is None:
            with super().download_file(url, max_length) as spooled:
                yield spooled
            return
        with tempfile.TemporaryFile(dir=self._spool_dir) as spool:
            self._write(url, max_length, spool)
            spool.seek(0)
            yield spool

    def download_verified(self, info: TargetFile, dest: Path) -> None:
        """Download the signed target ``info`` (from a refreshed Updater) into ``dest`` and
        check its length and every hash it lists, as python-tuf's
        ``TargetFile.verify_length_and_hashes`` does, hashing each chunk as it arrives.
        ``Updater.download_target`` spools the file, then reads it again to hash it and a
        third time to copy it: a third of a 50 MiB download's time here.

        The file grows as ``<dest>.part``; every ``CHECKPOINT`` bytes it is synced and
        its length recorded in ``<dest>.part.json``. A download cut short (the agent
        killed, the power lost, the link down past every retry) keeps both, and the next
        one re-hashes that prefix and asks only for what follows it. A file that fails
        the check, or that filled the disk, is removed, prefix and all."""
        directory, sep, name = info.path.rpartition("/")
        # consistent snapshots, as the controller signs them: the digest prefixes the name
        url = f"{TARGETS_URL}{directory}{sep}{info.hashes['sha256']}.{name}"
        digests = {algo: _hasher(algo) for algo in info.hashes}
        part, mark = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")
        start = _kept_prefix(part, mark, info.length, digests)
        if start:
            log.info("resuming %s at byte %d of %d (re-hashed what was kept)", info.path,
                     start, info.length)
        try:
            with part.open("r+b" if start else "wb") as out:
                out.seek(start)
                out.truncate()
                received = self._write(url, info.length, out, digests.values(), start=start,
                                       checkpoint=lambda n: _checkpoint(out, mark, n))
            _check_length_and_hashes(info, received, digests)
        except exceptions.LengthOrHashMismatchError:
            _forget(part, mark)
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  # keeping the prefix would keep the disk full
                _forget(part, mark)
            raise
        os.replace(part, dest)
        mark.unlink(missing_ok=True)

    def _write(self, url: str, max_length: int, out: IO[bytes],
               digests: Iterable[Any] = (), *, start: int = 0,
               checkpoint: Callable[[int], None] | None = None) -> int:
        received, synced = start, start
        chunks = self.fetch(url) if not start else self._fetch_from(url, start)
        for chunk in chunks:
            received += len(chunk)
            if received > max_length:
                raise exceptions.DownloadLengthMismatchError(
                    f"Downloaded {received} bytes exceeding the maximum allowed length "
                    f"of {max_length}")
            out.write(chunk)
            for digest in digests:
                digest.update(chunk)
            if checkpoint is not None and received - synced >= CHECKPOINT:
                checkpoint(received)
                synced = received
            if received >= max_length * RESUME_TEST_CRASH and received - len(chunk) < \
                    max_length * RESUME_TEST_CRASH:
                crash_point("download_half")
        return received

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._fetch_from(url, 0)

    def _fetch_from(self, url: str, start: int) -> Iterator[bytes]:
        if not url.startswith("mqtt:"):
            raise exceptions.DownloadError(f"not an MQTT URL: {url}")
        path = url.removeprefix("mqtt:")
        sha = target_digest(path)
        if sha is None:
            yield from self._one_by_one(path)
            return
        pace = Pace(self._blob_timeout, self._timeout, self._stall_s / 4)
        self._channel.watch(sha, pace)
        try:
            yield from self._windowed(path, pace, start)
        finally:
            self._channel.unwatch(sha)

    def _one_by_one(self, path: str) -> Iterator[bytes]:
        offset, total = 0, None
        while total is None or offset < total:
            answer = None
            for attempt in range(self._attempts):
                answer = self._channel.request(path, offset, self._chunk, self._timeout)
                if answer is not None:
                    break
                self._pause(path, offset, attempt)
            if answer is None:
                raise FetchTimeout(f"the controller did not answer for {path} at offset "
                                   f"{offset} after {self._attempts} attempts")
            total, data = _check(path, offset, answer)
            offset += len(data)
            yield data

    def _windowed(self, path: str, pace: Pace, start: int = 0) -> Iterator[bytes]:
        """Keep up to ``window`` chunks asked for ahead, in runs of half a window.

        A device that joins while the blob is being broadcast for others keeps what flows
        past and asks for what it missed only once the flow pauses, together with the
        other late joiners, so one republication serves them all. After a miss it asks
        again for a few chunks, to itself alone; it gives up only when nothing has
        arrived for ``stall_s``."""
        offset, total, asked_to, misses = start, None, start, 0
        run = self._run(0, 0.0)
        progress_at = began = time.monotonic()
        while total is None or offset < total:
            waiting = False
            if total is None:
                if asked_to == offset:  # nothing asked yet, or asking again after a miss
                    self._channel.ask(path, offset, self._chunk, retry=misses > 0)
                    pace.asked(time.monotonic())
                    asked_to = offset + self._chunk
            elif asked_to - offset <= run * self._chunk and asked_to < total:
                waiting = self._others_flowing(asked_to + run * self._chunk)
                if not waiting:
                    asked_to = self._ask_missing(path, asked_to, total, 4 if misses else run,
                                                 retry=misses > 0)
                    pace.asked(time.monotonic())
            answer = self._channel.take(offset, self._quiet if waiting else pace.timeout())
            flowing = time.monotonic() - self._channel.last_arrival < pace.timeout()
            if answer is None and (waiting or flowing) \
                    and time.monotonic() - progress_at < self._stall_s:
                continue  # others' broadcast, or ours reaching a slow device: no retry
            if answer is None:
                if time.monotonic() - progress_at > self._stall_s:
                    raise FetchTimeout(f"nothing arrived for {path} at offset {offset} for "
                                       f"{self._stall_s:.0f} s")
                self._pause(path, offset, min(misses, 4), waited=pace.timeout())
                pace.missed()
                misses += 1
                asked_to = offset  # ask again for everything from here
                continue
            misses, progress_at = 0, time.monotonic()
            total, data = _check(path, offset, answer)
            offset += len(data)
            asked_to = max(asked_to, offset)
            run = self._run(offset - start, time.monotonic() - began)
            if self._progress is not None:
                self._progress(path, offset, total)
            yield data

    def _run(self, got: int, elapsed: float) -> int:
        """Chunks to ask for at a time: half the window, but no more than the link has
        carried in ``AHEAD_S`` so far. What is asked for and not yet here is lost when
        the link drops; on a 2 Mbit/s link a full window is a minute of traffic. Until a
        rate is measured, ``SLOW_START`` chunks."""
        if got < 4 * self._chunk or elapsed <= 0:  # no rate yet: a few, as TCP's slow start
            return max(1, min(SLOW_START, self._window // 2))
        return max(2, min(self._window // 2, int(got / elapsed * AHEAD_S / self._chunk)))

    def _others_flowing(self, beyond: int) -> bool:
        """Chunks beyond anything this device asked for arrived just now: someone else's
        download is being broadcast."""
        return (time.monotonic() - self._channel.last_arrival < self._quiet
                and self._channel.furthest() >= beyond)

    def _ask_missing(self, path: str, start: int, total: int, most: int, *, retry: bool
                     ) -> int:
        """Ask for the first run of at most ``most`` chunks from ``start`` that are not
        here yet (others' broadcasts fill the rest); return where asking got to."""
        held = self._channel.held
        while start < total and held(start):
            start += self._chunk
        count = 0
        while count < most and start + count * self._chunk < total \
                and not held(start + count * self._chunk):
            count += 1
        if count:
            self._channel.ask(path, start, self._chunk, count, retry=retry)
        return start + count * self._chunk

    def _pause(self, path: str, offset: int, attempt: int, *, waited: float | None = None
               ) -> None:
        delay = min(self._backoff * 2 ** attempt, 10.0)
        log.info("no answer for %s at %d in %.1fs (attempt %d of %d); asking again in %.1fs",
                 path, offset, self._timeout if waited is None else waited, attempt + 1,
                 self._attempts, delay)
        time.sleep(delay)  # backoff between retries, not synchronisation


def _kept_prefix(part: Path, mark: Path, length: int, digests: dict[str, Any]) -> int:
    """The length of the synced prefix of an earlier attempt (0: none); ``digests`` (by
    algorithm) then hold that prefix, and are untouched when it is 0. The file is cut
    back to it by the caller (beyond it, a power loss may have left anything)."""
    try:
        kept = int(json.loads(mark.read_bytes())["length"])
    except (OSError, ValueError, KeyError, TypeError):
        _forget(part, mark)
        return 0
    if not 0 < kept < length or not part.exists() or part.stat().st_size < kept:
        _forget(part, mark)
        return 0
    trial = {algo: digest.copy() for algo, digest in digests.items()}
    with part.open("rb") as f:
        left = kept
        while left:
            block = f.read(min(left, 1 << 20))
            if not block:  # shorter than it was a moment ago: start again, cleanly
                _forget(part, mark)
                return 0
            left -= len(block)
            for digest in trial.values():
                digest.update(block)
    digests.update(trial)
    return kept


def _checkpoint(out: IO[bytes], mark: Path, length: int) -> None:
    out.flush()
    os.fsync(out.fileno())
    write_atomic(mark, json.dumps({"length": length}).encode())


def _forget(part: Path, mark: Path) -> None:
    part.unlink(missing_ok=True)
    mark.unlink(missing_ok=True)


def _check(path: str, offset: int, answer: Answer) -> tuple[int, bytes]:
    """The total size and the chunk of a good answer; raise what the Updater expects."""
    response, data = answer
    if response.status == "not_found":
        raise exceptions.DownloadHTTPError(response.error or f"{path} not found", 404)
    if response.status != "ok" or response.offset != offset:
        raise exceptions.DownloadError(f"fetching {path} at {offset}: {response.error}")
    if not data and offset < response.total:
        raise exceptions.DownloadError(f"empty chunk of {path} at {offset} of {response.total}")
    return response.total, data

