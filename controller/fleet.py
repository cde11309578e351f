"""Fleet services: enrolment, device queries, the fleet summary.

Functions over a session; they never commit (the request or the job does).
"""

import secrets
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.models import Device, HealthBatch
from controller.security import consume_enroll_token, digest, new_secret


class EnrollRefused(Exception):
    """The enrolment token is unknown, used up or expired."""


@dataclass(frozen=True)
class Enrolled:
    device: Device
    mqtt_secret: str  # shown once, to the device


def new_device_id() -> str:
    return f"dev-{secrets.token_hex(6)}"


def enroll(session: Session, *, token: str, name: str | None, labels: dict[str, str],
           now: datetime) -> Enrolled:
    """Spend one use of ``token`` and create a device with fresh MQTT credentials."""
    grant = consume_enroll_token(session, token, now=now)
    if grant is None:
        raise EnrollRefused("enrolment token is unknown, used up or expired; "
                            "create one with `edgefleet enroll-token create`")
    device_id = new_device_id()
    secret = new_secret("efd")
    device = Device(
        id=device_id, name=name or device_id, labels={**grant.labels, **labels},
        mqtt_secret_hash=digest(secret), enrolled_at=now, enroll_token_id=grant.id,
        status="enrolled", status_since=now, health_count=0,
    )
    session.add(device)
    session.flush()
    return Enrolled(device, secret)


def device_class(capabilities: dict[str, Any] | None) -> str:
    """A device's class for strata and summaries: architecture x RAM tier x runtimes."""
    if not capabilities:
        return "unknown"
    gib = capabilities.get("ram_bytes", 0) / (1 << 30)
    tier = "ram<2G" if gib < 2 else "ram<8G" if gib < 8 else "ram8G+"
    runtimes = sorted(r.get("name", "?") for r in capabilities.get("runtimes", []))
    return f"{capabilities.get('arch', '?')}/{tier}/{'+'.join(runtimes) or 'none'}"


def list_devices(session: Session, *, status: str | None = None, limit: int = 1000,
                 offset: int = 0) -> list[Device]:
    query = select(Device).order_by(Device.enrolled_at, Device.id).limit(limit).offset(offset)
    if status:
        query = query.where(Device.status == status)
    return list(session.scalars(query))


def health_history(session: Session, device_id: str, *, since: datetime,
                   limit: int = 2000) -> list[dict[str, Any]]:
    """A device's health reports received since ``since``, oldest first, each with its
    arrival time ``t`` (unix seconds). Read from the batches of that window; batches
    that do not mention the device are skipped by the database."""
    rows = session.scalars(
        select(HealthBatch).where(HealthBatch.received_to >= since,
                                  HealthBatch.reports.contains(f'"d":"{device_id}"',
                                                               autoescape=True))
        .order_by(HealthBatch.id))
    cutoff = since.timestamp()
    out = [{"t": e["t"], **e["r"]} for batch in rows for e in batch.entries()
           if e["d"] == device_id and e["t"] >= cutoff]
    return out[-limit:]


def model_ref(reported: dict[str, Any] | None) -> str:
    """``name@version`` a device reports running, or ``none``."""
    if not reported or not reported.get("model"):
        return "none"
    return f"{reported['model']}@{reported.get('version')}"


def census(session: Session) -> Counter[tuple[str, str, str]]:
    """Devices counted by (status, class, model@version they report running): the one
    count the summary, the dashboard and /metrics are all read from."""
    rows = session.execute(select(Device.status, Device.capabilities, Device.reported))
    return Counter((status, device_class(caps), model_ref(reported))
                   for status, caps, reported in rows)


def summary(session: Session) -> dict[str, Any]:
    """Device counts by status, by class, by model version, and by class and model."""
    counts = census(session)
    by_status = dict.fromkeys(("online", "offline", "enrolled"), 0)
    by_class: Counter[str] = Counter()
    by_model: Counter[str] = Counter()
    cells: dict[str, Counter[str]] = {}
    for (status, cls, model), n in counts.items():
        by_status[status] = by_status.get(status, 0) + n
        by_class[cls] += n
        by_model[model] += n
        cells.setdefault(cls, Counter())[model] += n
    return {
        "devices": sum(by_status.values()),
        "by_status": by_status,
        "by_class": dict(sorted(by_class.items())),
        "by_model": dict(sorted(by_model.items())),
        "by_class_model": {cls: dict(sorted(c.items())) for cls, c in sorted(cells.items())},
    }
