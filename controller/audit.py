"""The audit log: every mutation, who made it, when and from where.

Routes record an entry in the transaction that makes the change, so a change and
its entry are committed together or not at all. Nothing here commits.
"""

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.models import AuditEntry


def record(session: Session, *, actor: str, action: str, target: str, now: datetime,
           remote: str | None = None, detail: dict[str, Any] | None = None) -> None:
    """Add an audit entry to the caller's transaction. Never put secrets in ``detail``."""
    session.add(AuditEntry(at=now, actor=actor, action=action, target=target, remote=remote,
                           detail=detail or {}))


def entries(session: Session, *, actor: str | None = None, action: str | None = None,
            target: str | None = None, since: datetime | None = None,
            before_id: int | None = None, limit: int = 100) -> Sequence[AuditEntry]:
    """The newest entries first. ``action`` matches a whole action (``rollout.pause``)
    or a family (``rollout``); ``before_id`` pages back from an earlier answer."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    if action is not None:
        query = query.where((AuditEntry.action == action)
                            | AuditEntry.action.startswith(action + ".", autoescape=True))
    if target is not None:
        query = query.where(AuditEntry.target == target)
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    return session.scalars(query).all()
