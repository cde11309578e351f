"""The audit log: every mutation, who made it, when and from where."""

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from controller.db.models import AuditEntry


def record(session: Session, *, actor: str, action: str, target: str, now: datetime,
           remote: str | None = None, detail: dict[str, Any] | None = None) -> None:
    """Add an audit entry to the caller's transaction. Never put secrets in ``detail``."""
    session.add(AuditEntry(at=now, actor=actor, action=action, target=target, remote=remote,
                           detail=detail or {}))
