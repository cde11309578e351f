"""Fleet-state ingestion: device messages in, batched database writes out.

The MQTT network thread only decodes and calls ``submit``; a writer thread drains
the queue in batches (up to ``batch`` messages, or whatever arrived within
``linger`` seconds) and writes each batch in one transaction with executemany.
A batch whose write fails is retried, not dropped.
"""

import copy
import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import String, Table, bindparam, case, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from controller.db.engine import transaction
from controller.db.models import Device, HealthReport, UTCDateTime
from shared.messages import Health, Hello, Message, Presence
from shared.topics import Kind

log = logging.getLogger(__name__)


class Inbound(NamedTuple):
    """One decoded device message, stamped on arrival (a tuple: this is the hot path)."""

    device_id: str
    kind: Kind
    message: Message
    received_at: float  # time.time()
    raw: bytes = b""  # the validated payload, stored as received (health reports)


@dataclass
class IngestStats:
    """Counters, read by /metrics and the benchmarks."""

    received: int = 0
    persisted: int = 0
    batches: int = 0
    write_failures: int = 0


@dataclass
class DeviceDelta:
    """What a batch changes about one device, merged until the next device flush."""

    status: str = "online"
    status_at: float = 0.0
    last_seen_at: float = 0.0
    last_health: bytes | None = None
    health_count: int = 0
    hello: Hello | None = None
    urgent: bool = False  # a presence or hello: write now, not at the next flush


def merge(pending: dict[str, DeviceDelta], items: Sequence[Inbound]) -> None:
    """Fold messages into per-device deltas; later messages win."""
    for item in items:
        delta = pending.get(item.device_id)
        if delta is None:
            delta = pending[item.device_id] = DeviceDelta()
        delta.last_seen_at = item.received_at
        msg = item.message
        if isinstance(msg, Health):
            delta.status, delta.status_at = "online", item.received_at
            delta.last_health = item.raw
            delta.health_count += 1
        elif isinstance(msg, Presence):
            delta.status, delta.status_at, delta.urgent = msg.state, item.received_at, True
        elif isinstance(msg, Hello):
            delta.status, delta.status_at, delta.urgent = "online", item.received_at, True
            delta.hello = msg


def apply_batch(session: Session, items: Sequence[Inbound], *,
                pending: dict[str, DeviceDelta] | None = None, flush_devices: bool = True) -> int:
    """Write a batch of device messages; return how many were persisted.

    Every health report is inserted. Device rows (status, last seen, last health)
    are updated from ``pending`` when ``flush_devices`` is true or a presence or
    hello is waiting; otherwise the deltas stay in ``pending`` for a later flush.
    Messages from devices that no longer exist (deleted since the message was
    queued) are skipped, so one of them cannot block the batch.
    """
    ids = {item.device_id for item in items}
    existing = set(session.scalars(select(Device.id).where(Device.id.in_(ids))))
    items = [item for item in items if item.device_id in existing]
    _insert_health(session, [i for i in items if i.kind == Kind.HEALTH])
    pending = {} if pending is None else pending
    merge(pending, items)
    if flush_devices or any(d.urgent for d in pending.values()):
        _update_devices(session, pending)
        pending.clear()
    return len(items)


def _insert_health(session: Session, items: Sequence[Inbound]) -> None:
    """executemany straight to the driver: the payload is stored as received, validated."""
    if not items:
        return
    conn = session.connection()
    table = cast(Table, HealthReport.__table__)
    when = table.c.received_at.type._cached_bind_processor(conn.dialect)  # noqa: SLF001
    to_dt = datetime.fromtimestamp
    rows = [(i.device_id, when(to_dt(i.received_at, UTC)) if when else to_dt(i.received_at, UTC),
             cast(Health, i.message).seq, i.raw.decode()) for i in items]
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    conn.exec_driver_sql(
        f"INSERT INTO health_reports (device_id, received_at, seq, data) "  # noqa: S608
        f"VALUES ({mark}, {mark}, {mark}, {mark})", rows)


def _update_devices(session: Session, deltas: dict[str, DeviceDelta]) -> None:
    t = cast(Table, Device.__table__)
    to_dt = datetime.fromtimestamp
    rows = []
    for device_id, d in deltas.items():
        rows.append({
            "b_id": device_id, "b_status": d.status,
            "b_since": to_dt(d.status_at, UTC),
            "b_seen": to_dt(d.last_seen_at, UTC), "b_count": d.health_count,
        })
    status = bindparam("b_status", type_=String)
    values: dict[str, Any] = {
        "status": status,
        "status_since": case((t.c.status != status, bindparam("b_since", type_=UTCDateTime())),
                             else_=t.c.status_since),
        "last_seen_at": bindparam("b_seen"),
        "health_count": t.c.health_count + bindparam("b_count"),
    }
    where = t.c.id == bindparam("b_id")
    if rows:
        session.execute(update(t).where(where).values(values), rows)
    health = [{"b_id": device_id, "b_health": json.loads(d.last_health)}
              for device_id, d in deltas.items() if d.last_health is not None]
    if health:
        session.execute(update(t).where(where).values(last_health=bindparam("b_health")), health)
    for device_id, d in deltas.items():
        if d.hello is not None:
            _apply_hello(session, device_id, d.hello)


def _apply_hello(session: Session, device_id: str, hello: Hello) -> None:
    device = session.get(Device, device_id)
    if device is None:
        return
    device.agent_version = hello.agent_version
    device.capabilities = hello.capabilities.model_dump(mode="json")
    device.labels = {**device.labels, **hello.labels}


def mark_stale_offline(session: Session, *, now: datetime, silent_for: timedelta) -> int:
    """Mark devices offline that claim to be online but have been silent too long.

    A last will normally does this; this catches what a will cannot (a broker that
    lost its sessions, a controller that was down when the will was sent).
    """
    cutoff = now - silent_for
    result = session.execute(
        update(Device)
        .where(Device.status == "online", Device.last_seen_at < cutoff)
        .values(status="offline", status_since=now)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def known_device_ids(session: Session) -> set[str]:
    return set(session.scalars(select(Device.id)))


class Ingestor:
    """Queues device messages and writes them in batches on its own thread.

    Health reports are committed with every batch; device rows are updated at most
    every ``device_flush`` seconds (at once for a presence or hello), so the write
    load grows with the number of devices, not with the message rate.
    """

    def __init__(self, factory: sessionmaker[Session], *, batch: int = 2000,
                 linger: float = 0.05, device_flush: float = 1.0,
                 retry_delay: float = 1.0) -> None:
        self._factory = factory
        self._batch = batch
        self._linger = linger
        self._device_flush = device_flush
        self._retry_delay = retry_delay
        self._queue: queue.SimpleQueue[Inbound | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self._pending: dict[str, DeviceDelta] = {}
        self._flushed_at = time.monotonic()
        self.stats = IngestStats()

    def submit(self, item: Inbound) -> None:
        """Queue one message; called from the MQTT network thread."""
        self.stats.received += 1
        self._queue.put(item)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the writer thread (give up after ``timeout``)."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("ingest writer still retrying at shutdown; %d messages unwritten",
                      self.stats.received - self.stats.persisted)
            self._stopping.set()
            self._thread.join(1.0)

    def _run(self) -> None:
        done = False
        while not done:
            try:
                item = self._queue.get(timeout=self._device_flush)
            except queue.Empty:
                if self._pending:
                    self._write([])
                continue
            if item is None:
                break
            items = [item]
            done = self._fill(items)
            self._write(items)
        self._write([], final=True)

    def _fill(self, items: list[Inbound]) -> bool:
        """Top the batch up from the queue; True when the stop marker was seen."""
        deadline = time.monotonic() + self._linger
        while len(items) < self._batch:
            remaining = deadline - time.monotonic()
            try:
                item = (self._queue.get(timeout=remaining) if remaining > 0
                        else self._queue.get_nowait())
            except queue.Empty:
                return False
            if item is None:
                return True
            items.append(item)
        return False

    def _write(self, items: list[Inbound], *, final: bool = False) -> None:
        flush = final or time.monotonic() - self._flushed_at >= self._device_flush
        while True:
            # Work on a copy, so a failed transaction leaves the pending deltas intact.
            pending = {k: copy.copy(v) for k, v in self._pending.items()}
            try:
                with transaction(self._factory) as session:
                    persisted = apply_batch(session, items, pending=pending, flush_devices=flush)
            except Exception:
                self.stats.write_failures += 1
                log.exception("writing %d device messages failed; retrying", len(items))
                if self._stopping.wait(self._retry_delay):
                    return
            else:
                self._pending = pending
                if not pending:
                    self._flushed_at = time.monotonic()
                self.stats.persisted += persisted
                self.stats.batches += 1
                return
