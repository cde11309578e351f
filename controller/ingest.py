"""Fleet-state writes: decoded device messages in, batched database writes out.

``BatchWriter`` runs in the ingest worker process (``controller.ingest_process``):
each chunk of messages is one transaction that stores all its health reports,
verbatim, in one ``health_batches`` row; device rows are updated from merged
per-device deltas at most once a second. A batch whose write fails is retried,
not dropped. Nothing here touches MQTT.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import String, Table, Text, bindparam, case, func, insert, select, update
from sqlalchemy import cast as cast_
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, sessionmaker

from controller.db.engine import transaction
from controller.db.models import Device, DeviceEvent, HealthBatch, UTCDateTime
from controller.rollouts import observe
from shared.messages import DesiredState, Event, Hello, Message, Presence, ReportedState
from shared.topics import Kind

log = logging.getLogger(__name__)


class Inbound(NamedTuple):
    """One decoded device message, stamped on arrival (a tuple: this is the hot path)."""

    device_id: str
    kind: Kind
    message: Message | None  # None for health reports: checked, and stored as received
    received_at: float  # time.time()
    raw: bytes = b""  # the validated payload, stored as received (health reports)


@dataclass
class IngestStats:
    """Counters, read by /metrics and the benchmarks."""

    persisted: int = 0
    batches: int = 0
    write_failures: int = 0


@dataclass(slots=True)
class DeviceDelta:
    """What messages change about one device, merged until the next device flush."""

    status: str = "online"
    status_at: float = 0.0
    last_seen_at: float = 0.0
    last_health: bytes | None = None
    health_count: int = 0
    hello: Hello | None = None
    reported: ReportedState | None = None
    events: tuple[tuple[float, Event], ...] = ()
    urgent: bool = False  # a presence, hello or install news: write now, not at the next flush

    def copy(self) -> "DeviceDelta":
        return DeviceDelta(self.status, self.status_at, self.last_seen_at, self.last_health,
                           self.health_count, self.hello, self.reported, self.events,
                           self.urgent)


def merge(pending: dict[str, DeviceDelta], items: Sequence[Inbound]) -> None:
    """Fold messages into per-device deltas; later messages win.

    Entries of ``pending`` are replaced, never changed in place (a delta is copied the
    first time a batch touches it), so a shallow copy of a dict of deltas is a
    snapshot that a failed transaction leaves intact.
    """
    batch: dict[str, DeviceDelta] = {}
    health = Kind.HEALTH
    for device_id, kind, msg, at, raw in items:  # the hot loop: health reports
        delta = batch.get(device_id)
        if delta is None:
            old = pending.get(device_id)
            delta = batch[device_id] = DeviceDelta(status_at=at) if old is None else old.copy()
        delta.last_seen_at = at
        if kind is health:
            if delta.status != "online":  # back from offline: online since this report
                delta.status, delta.status_at = "online", at
            delta.last_health = raw
            delta.health_count += 1
        elif isinstance(msg, Presence):
            delta.status, delta.status_at, delta.urgent = msg.state, at, True
        elif isinstance(msg, Hello):
            delta.status, delta.status_at, delta.urgent = "online", at, True
            delta.hello = msg
        elif isinstance(msg, ReportedState):
            delta.reported, delta.urgent = msg, True
        elif isinstance(msg, Event):
            delta.events, delta.urgent = (*delta.events, (at, msg)), True
    pending.update(batch)


def apply_batch(session: Session, items: Sequence[Inbound], *,
                pending: dict[str, DeviceDelta] | None = None,
                flush_devices: bool = True) -> int:
    """Write a batch of device messages; return how many were persisted.

    The batch's health reports go into one ``health_batches`` row, verbatim. Device
    rows (status, last seen, last health, report count) are updated from ``pending``
    when ``flush_devices`` is true or a presence or hello is waiting; otherwise the
    deltas stay in ``pending`` for a later flush. A device deleted meanwhile is
    simply not updated (its row is gone), so it cannot block a batch.
    """
    health = [item for item in items if item.kind == Kind.HEALTH]
    if health:
        session.add(health_batch(health))
    pending = {} if pending is None else pending
    merge(pending, items)
    if flush_devices or any(d.urgent for d in pending.values()):
        _update_devices(session, pending)
        pending.clear()
    return len(items)


def health_batch(items: Sequence[Inbound]) -> HealthBatch:
    """One row holding every report of ``items`` as received (already validated)."""
    entries = b",".join(b'{"d":"%s","t":%.6f,"r":%s}' % (i.device_id.encode(), i.received_at,
                                                         i.raw) for i in items)
    times = [i.received_at for i in items]
    return HealthBatch(received_from=datetime.fromtimestamp(min(times), UTC),
                       received_to=datetime.fromtimestamp(max(times), UTC), count=len(items),
                       reports=(b"[%s]" % entries).decode())


def _update_devices(session: Session, deltas: dict[str, DeviceDelta]) -> None:
    t = cast(Table, Device.__table__)
    to_dt = datetime.fromtimestamp
    # The last health report is bound as the JSON text the device sent, not parsed and
    # serialised again: one statement per flush, a few microseconds less per device.
    raw = bindparam("b_health", type_=Text)
    health = cast_(raw, JSONB) if session.get_bind().dialect.name == "postgresql" else raw
    rows = [{"b_id": device_id, "b_status": d.status, "b_since": to_dt(d.status_at, UTC),
             "b_seen": to_dt(d.last_seen_at, UTC), "b_count": d.health_count,
             "b_health": d.last_health.decode() if d.last_health is not None else None}
            for device_id, d in deltas.items()]
    status = bindparam("b_status", type_=String)
    values: dict[str, Any] = {
        "status": status,
        "status_since": case((t.c.status != status, bindparam("b_since", type_=UTCDateTime())),
                             else_=t.c.status_since),
        "last_seen_at": bindparam("b_seen"),
        "health_count": t.c.health_count + bindparam("b_count"),
        "last_health": func.coalesce(health, t.c.last_health),
    }
    where = t.c.id == bindparam("b_id")
    if rows:
        session.execute(update(t).where(where).values(values), rows)
    for device_id, d in deltas.items():
        if d.hello is not None:
            _apply_hello(session, device_id, d.hello)
    reported = [{"b_id": device_id, "b_reported": d.reported.model_dump(mode="json")}
                for device_id, d in deltas.items() if d.reported is not None]
    if reported:
        session.execute(update(t).where(where).values(reported=bindparam("b_reported")),
                        reported)
    events = [{"device_id": device_id, "at": to_dt(at, UTC), "kind": e.kind,
               "generation": e.generation, "detail": e.detail}
              for device_id, d in deltas.items() for at, e in d.events]
    if events:
        known = set(session.scalars(select(Device.id).where(
            Device.id.in_({e["device_id"] for e in events}))))
        if kept := [e for e in events if e["device_id"] in known]:  # deleted devices: drop
            session.execute(insert(DeviceEvent), kept)


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


def adopt_install_outcomes(session: Session) -> int:
    """Take a device's install outcome from its health reports where that is newer than
    its reported state; return how many devices changed.

    The reported-state message can be lost (a broker dropping messages under load);
    health reports repeat the outcome of the last install, so a lost report delays what
    the controller shows, never loses it. Only an outcome of the desired generation is
    taken (its model comes from the desired state), and never over a newer report.
    """
    known = func.coalesce(Device.reported["generation"].as_integer(), 0)
    rows = session.execute(select(Device.id, Device.desired, Device.desired_generation,
                                  Device.last_health)
                           .where(Device.desired_generation > known)).all()
    changed = 0
    for device_id, desired, generation, health in rows:
        seen = observe.health_outcome(health)
        if seen is None or seen.generation != generation or not seen.final or not desired:
            continue
        d = DesiredState.model_validate(desired)
        reported = ReportedState(generation=generation, model=d.model, version=d.version,
                                 variant=d.variant, state=seen.state, detail=seen.detail)
        result = session.execute(update(Device).where(Device.id == device_id, known < generation)
                                 .values(reported=reported.model_dump(mode="json")))
        changed += int(result.rowcount)  # type: ignore[attr-defined]
    return changed


class BatchWriter:
    """Writes batches of device messages; retries failures; flushes device rows.

    Health reports are committed with every batch; device rows are updated at most
    every ``device_flush`` seconds (at once for a presence or hello), so the write
    load grows with the number of devices, not with the message rate. A batch whose
    transaction fails is retried until it is written or ``stopping`` is set; the
    pending device deltas survive the failure.
    """

    def __init__(self, factory: sessionmaker[Session], *, device_flush: float = 1.0,
                 retry_delay: float = 1.0, stopping: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._factory = factory
        self._device_flush = device_flush
        self._retry_delay = retry_delay
        self._stopping = stopping or threading.Event()
        self._clock = clock
        self._pending: dict[str, DeviceDelta] = {}
        self._flushed_at = clock()
        self.stats = IngestStats()

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def write(self, items: Sequence[Inbound], *, final: bool = False) -> bool:
        """Write ``items``; False if it gave up because ``stopping`` was set."""
        flush = final or self._clock() - self._flushed_at >= self._device_flush
        while True:
            # Work on a snapshot, so a failed transaction leaves the pending deltas intact.
            pending = dict(self._pending)
            try:
                with transaction(self._factory) as session:
                    persisted = apply_batch(session, items, pending=pending,
                                            flush_devices=flush)
            except Exception:
                self.stats.write_failures += 1
                log.exception("writing %d device messages failed; retrying", len(items))
                if self._stopping.wait(self._retry_delay):
                    return False
            else:
                self._pending = pending
                if not pending:
                    self._flushed_at = self._clock()
                self.stats.persisted += persisted
                self.stats.batches += 1
                return True
