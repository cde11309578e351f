"""Fleet services: enrolment, device queries, the fleet summary.

Functions over a session; they never commit (the request or the job does).
"""

import secrets
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from controller.db.models import Device
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


def summary(session: Session) -> dict[str, Any]:
    """Device counts by status and by class."""
    by_status = dict(session.execute(select(Device.status, func.count()).group_by(Device.status))
                     .all())
    classes: Counter[str] = Counter(
        device_class(caps) for caps in session.scalars(select(Device.capabilities))
    )
    return {
        "devices": sum(by_status.values()),
        "by_status": {k: by_status.get(k, 0) for k in ("online", "offline", "enrolled")},
        "by_class": dict(sorted(classes.items())),
    }
