"""Fleet-state ingestion: device messages in, batched database writes out.

The MQTT network thread only decodes and calls ``submit``; a writer thread drains
the queue in batches (up to ``batch`` messages, or whatever arrived within
``linger`` seconds) and writes each batch in one transaction with executemany.
A batch whose write fails is retried, not dropped.
"""

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from controller.db.engine import transaction
from controller.db.models import Device, HealthReport
from shared.messages import Health, Hello, Message, Presence
from shared.topics import Kind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inbound:
    """One decoded device message, stamped on arrival."""

    device_id: str
    kind: Kind
    message: Message
    received_at: datetime


@dataclass
class IngestStats:
    """Counters, read by /metrics and the benchmarks."""

    received: int = 0
    persisted: int = 0
    batches: int = 0
    write_failures: int = 0


@dataclass
class _DeviceDelta:
    status: str | None = None
    status_at: datetime | None = None
    last_seen_at: datetime | None = None
    last_health: dict[str, Any] | None = None
    health_count: int = 0
    hello: Hello | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)


def apply_batch(session: Session, items: Sequence[Inbound]) -> int:
    """Write a batch of device messages; return how many were persisted.

    Messages from devices that no longer exist (deleted since the message was
    queued) are skipped, so one of them cannot block the batch.
    """
    ids = {item.device_id for item in items}
    existing = set(session.scalars(select(Device.id).where(Device.id.in_(ids))))
    items = [item for item in items if item.device_id in existing]
    deltas: dict[str, _DeviceDelta] = {}
    for item in items:
        delta = deltas.setdefault(item.device_id, _DeviceDelta())
        delta.last_seen_at = item.received_at
        msg = item.message
        if isinstance(msg, Presence):
            delta.status, delta.status_at = msg.state, item.received_at
        elif isinstance(msg, Health):
            delta.status, delta.status_at = "online", item.received_at
            delta.last_health = msg.model_dump(mode="json")
            delta.health_count += 1
            delta.reports.append({"device_id": item.device_id, "received_at": item.received_at,
                                  "seq": msg.seq, "data": delta.last_health})
        elif isinstance(msg, Hello):
            delta.status, delta.status_at, delta.hello = "online", item.received_at, msg

    reports = [r for d in deltas.values() for r in d.reports]
    if reports:
        session.execute(insert(HealthReport), reports)
    _update_devices(session, deltas)
    for device_id, delta in deltas.items():
        if delta.hello is not None:
            _apply_hello(session, device_id, delta.hello)
    return len(items)


def _update_devices(session: Session, deltas: dict[str, _DeviceDelta]) -> None:
    t = cast(Table, Device.__table__)
    status_rows = [
        {"b_id": device_id, "b_status": d.status, "b_since": d.status_at, "b_seen": d.last_seen_at,
         "b_count": d.health_count}
        for device_id, d in deltas.items() if d.last_health is None and d.status is not None
    ]
    health_rows = [
        {"b_id": device_id, "b_status": d.status, "b_since": d.status_at, "b_seen": d.last_seen_at,
         "b_count": d.health_count, "b_health": d.last_health}
        for device_id, d in deltas.items() if d.last_health is not None
    ]
    values: dict[str, Any] = {
        "status": bindparam("b_status"),
        "status_since": case((t.c.status != bindparam("b_status"), bindparam("b_since")),
                             else_=t.c.status_since),
        "last_seen_at": bindparam("b_seen"),
        "health_count": t.c.health_count + bindparam("b_count"),
    }
    where = t.c.id == bindparam("b_id")
    if status_rows:
        session.execute(update(t).where(where).values(values), status_rows)
    if health_rows:
        session.execute(
            update(t).where(where).values({**values, "last_health": bindparam("b_health")}),
            health_rows,
        )


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
    """Queues device messages and writes them in batches on its own thread."""

    def __init__(self, factory: sessionmaker[Session], *, batch: int = 2000,
                 linger: float = 0.05, retry_delay: float = 1.0) -> None:
        self._factory = factory
        self._batch = batch
        self._linger = linger
        self._retry_delay = retry_delay
        self._queue: queue.SimpleQueue[Inbound | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
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
            item = self._queue.get()
            if item is None:
                break
            items = [item]
            done = self._fill(items)
            self._write(items)

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

    def _write(self, items: list[Inbound]) -> None:
        while True:
            try:
                with transaction(self._factory) as session:
                    self.stats.persisted += apply_batch(session, items)
            except Exception:
                self.stats.write_failures += 1
                log.exception("writing %d device messages failed; retrying", len(items))
                if self._stopping.wait(self._retry_delay):
                    return
            else:
                self.stats.batches += 1
                return
