"""Ingestion in a worker process, so database work never holds the receiver's GIL.

paho's network thread reads one packet per select() for QoS 0 traffic and must win
the GIL back after every read; a writer thread in the same process turned that into
a convoy that capped ingestion at about a quarter of a bare subscriber's rate
(measured with bench/ingest.py). The receiving side now only looks up the topic's
route and appends ``(device_id, kind, payload, received_at)`` to a deque, without a
lock; a sender thread ships what is queued to the worker every ``linger`` seconds.
The worker decodes (size-checked, validated) and writes with ``BatchWriter``.

Counters live in shared memory. If the worker falls behind by more than
``max_backlog`` messages, new messages are dropped and counted, never queued
without bound. A worker that dies is replaced at the next send; the chunk it was
writing is lost, and the restart is logged and counted.
"""

import gc
import logging
import multiprocessing as mp
import threading
import time
from collections import deque
from ctypes import c_longlong
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from shared import logs
from shared.errors import ProtocolError
from shared.messages import Message, check_health_many, decode_for
from shared.topics import Kind

if TYPE_CHECKING:
    from controller.ingest import BatchWriter, Inbound

log = logging.getLogger(__name__)

Raw = tuple[str, str, bytes, float]  # device id, kind, payload, time.time()
_KINDS = {kind.value: kind for kind in Kind}


@dataclass
class Counters:
    """Shared-memory counters, readable from the controller process."""

    persisted: "c_longlong"
    batches: "c_longlong"
    write_failures: "c_longlong"
    malformed: "c_longlong"


class IngestStats:
    """A read view over the counters, shaped like ``ingest.IngestStats``."""

    def __init__(self, counters: Counters, process: "IngestProcess") -> None:
        self._c = counters
        self._p = process

    @property
    def received(self) -> int:
        return self._p.received

    @property
    def dropped_backlog(self) -> int:
        return self._p.dropped_backlog

    @property
    def persisted(self) -> int:
        return int(self._c.persisted.value)

    @property
    def batches(self) -> int:
        return int(self._c.batches.value)

    @property
    def write_failures(self) -> int:
        return int(self._c.write_failures.value)

    @property
    def malformed(self) -> int:
        return int(self._c.malformed.value)


def _worker(conn: Connection, db_url: str, counters: Counters, device_flush: float,
            log_level: int, log_format: str) -> None:
    """The worker process: decode what arrives and write it, until told to stop."""
    logs.setup(log_level, log_format, role="ingest")
    from controller.db.engine import make_engine, session_factory
    from controller.ingest import BatchWriter

    engine = make_engine(db_url)
    writer = BatchWriter(session_factory(engine), device_flush=device_flush)
    # Every report allocates a handful of objects; with default thresholds the cyclic
    # collector ran often enough to cost about a third of the worker's time per report
    # (17 -> 12 us decoding, measured). Nothing here builds cycles worth chasing early.
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    while True:
        if not conn.poll(device_flush):
            if writer.has_pending:
                writer.write([])  # device rows are due even when nothing arrives
            continue
        chunk: list[Raw] | None = conn.recv()
        if chunk is None:
            break
        items = decode_chunk(chunk, counters)
        before = (writer.stats.persisted, writer.stats.batches, writer.stats.write_failures)
        writer.write(items)
        _count(counters, writer, before)
    before = (writer.stats.persisted, writer.stats.batches, writer.stats.write_failures)
    writer.write([], final=True)
    _count(counters, writer, before)
    engine.dispose()
    conn.send("stopped")


def decode_chunk(chunk: list[Raw], counters: Counters) -> list["Inbound"]:
    """Decode a chunk of raw messages; count and log the malformed ones."""
    from controller.ingest import Inbound

    checks = iter(check_health_many([raw[2] for raw in chunk if raw[1] == "health"]))
    health, new = Kind.HEALTH, tuple.__new__  # tuple.__new__: a third of Inbound()'s cost
    items: list[Inbound] = []
    for device_id, kind_name, payload, at in chunk:
        message: Message | ProtocolError | None
        if kind_name == "health":
            message = next(checks)  # None: valid; stored as received, no object needed
            if message is None:
                items.append(new(Inbound, (device_id, health, None, at, payload)))
                continue
        else:
            kind = _KINDS.get(kind_name)
            if kind is None:
                continue
            try:
                message = decode_for(kind, payload)
            except ProtocolError as exc:
                message = exc
        if isinstance(message, ProtocolError):
            counters.malformed.value += 1
            log.warning("dropped %s message from %s: %s", kind_name, device_id, message)
            continue
        items.append(Inbound(device_id, _KINDS[kind_name], message, at, payload))
    return items


def _count(counters: Counters, writer: "BatchWriter", before: tuple[int, int, int]) -> None:
    """Add what the last write did (deltas: a restarted worker keeps the totals)."""
    counters.persisted.value += writer.stats.persisted - before[0]
    counters.batches.value += writer.stats.batches - before[1]
    counters.write_failures.value += writer.stats.write_failures - before[2]


def _log_format() -> str:
    """The format this process logs in, for the worker to match."""
    handlers = logging.getLogger().handlers
    return "json" if any(isinstance(h.formatter, logs.JsonFormatter) for h in handlers) else "text"


class IngestProcess:
    """The controller's side of the ingest worker."""

    def __init__(self, db_url: str, *, linger: float = 0.05, device_flush: float = 1.0,
                 max_backlog: int = 500_000) -> None:
        ctx = mp.get_context("spawn")
        # Raw values: the worker is their only writer; no locks, no semaphores to leak.
        self._counters = Counters(*(ctx.RawValue("q", 0) for _ in range(4)))
        self.stats = IngestStats(self._counters, self)
        self._ctx, self._db_url, self._device_flush = ctx, db_url, device_flush
        self._conn, self._process = self._spawn()
        self.restarts = 0
        self._linger = linger
        self._max_backlog = max_backlog
        # deque.append and popleft are atomic: the network thread appends without a lock
        # and the sender thread takes from the other end.
        self.queue: deque[Raw] = deque()
        self.received = 0
        self.dropped_backlog = 0
        self._stopping = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="ingest-sender",
                                        daemon=True)

    def _spawn(self) -> tuple[Connection, mp.process.BaseProcess]:
        conn, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker, name="edgefleet-ingest", daemon=True,
            args=(child, self._db_url, self._counters, self._device_flush,
                  logging.getLogger().level, _log_format()))
        return conn, process

    @property
    def pid(self) -> int:
        return self._process.pid or 0

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def start(self) -> None:
        self._process.start()
        self._sender.start()

    def _restart(self) -> None:
        log.error("the ingest worker died (exit code %s); starting a new one",
                  self._process.exitcode)
        self._process.join(1)
        self._conn, self._process = self._spawn()
        self._process.start()
        self.restarts += 1

    def submit(self, device_id: str, kind: str, payload: bytes, received_at: float) -> None:
        """Queue one raw message (``kind`` is a Kind value); from the MQTT network thread."""
        self.received += 1
        if len(self.queue) >= self._max_backlog:
            self.dropped_backlog += 1
            return
        self.queue.append((device_id, kind, payload, received_at))

    def _send_loop(self) -> None:
        while not self._stopping.wait(self._linger):
            self._ship()
        self._ship()

    def _ship(self) -> None:
        take = self.queue.popleft
        chunk = [take() for _ in range(len(self.queue))]
        while chunk:
            try:
                self._conn.send(chunk)  # blocks while the worker is busy: back-pressure
            except (BrokenPipeError, ConnectionResetError, EOFError):
                # The chunk the dead worker was writing is lost; this one is not.
                self._restart()
            else:
                return

    def stop(self, timeout: float = 15.0) -> None:
        """Ship what is buffered, let the worker write it, and end the worker."""
        self._stopping.set()
        self._sender.join(timeout)
        try:
            self._conn.send(None)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._process.is_alive():
                if self._conn.poll(0.1):
                    self._conn.recv()
                    break
        except (BrokenPipeError, EOFError, OSError):
            log.exception("the ingest worker was already gone")
        self._process.join(5)
        if self._process.is_alive():
            log.error("the ingest worker did not stop; killing it")
            self._process.kill()
            self._process.join(5)
