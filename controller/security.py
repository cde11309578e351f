"""Secrets: API tokens and roles, enrolment tokens, device MQTT secrets, key files.

Only sha256 digests of tokens and secrets are stored; a secret is shown once, when
it is created. Files holding secrets are written with mode 0600.
"""

import hashlib
import hmac
import os
import secrets
import uuid
from datetime import datetime, timedelta
from enum import IntEnum
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from controller.db.models import ApiToken, EnrollToken


class Role(IntEnum):
    """API roles; each includes the rights of the ones below it."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> "Role":
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown role {name!r}; use viewer, operator or admin") from None


def digest(secret: str) -> str:
    """The stored form of a token or secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    """Constant-time comparison of a presented secret with a stored digest."""
    return hmac.compare_digest(digest(secret), stored_digest)


def new_secret(prefix: str) -> str:
    """A fresh random secret with a recognisable prefix (``efa_``, ``efe_``, ``efd_``)."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def write_secret_file(path: Path, content: str | bytes) -> None:
    """Write ``content`` to ``path`` with mode 0600, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_api_token(session: Session, *, name: str, role: Role, now: datetime,
                     token: str | None = None) -> str:
    """Store a new API token and return its secret (the only time it is visible)."""
    token = token or new_secret("efa")
    session.add(ApiToken(id=str(uuid.uuid4()), name=name, role=role.name.lower(),
                         token_hash=digest(token), created_at=now, revoked_at=None))
    return token


def lookup_api_token(session: Session, token: str) -> ApiToken | None:
    """The live API token with this secret, if any."""
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest(token)))
    if row is None or row.revoked_at is not None:
        return None
    return row


def ensure_admin_token(session: Session, *, data_dir: Path, configured: str | None,
                       now: datetime) -> str | None:
    """Create the first admin token on a new database.

    Uses ``configured`` (EDGEFLEET_ADMIN_TOKEN) if given; otherwise generates one and
    writes it to ``<data_dir>/admin-token`` (0600). Returns the token when one was
    created, None when an admin token already exists.
    """
    exists = session.scalar(select(ApiToken.id).where(ApiToken.role == "admin").limit(1))
    if exists is not None:
        return None
    token = create_api_token(session, name="bootstrap-admin", role=Role.ADMIN, now=now,
                             token=configured)
    if configured is None:
        write_secret_file(data_dir / "admin-token", token + "\n")
    return token


def create_enroll_token(session: Session, *, now: datetime, ttl: timedelta, uses: int,
                        labels: dict[str, str], created_by: str) -> tuple[str, EnrollToken]:
    """Store an enrolment token valid for ``ttl`` and ``uses`` enrolments."""
    if uses < 1:
        raise ValueError("an enrolment token needs at least one use")
    token = new_secret("efe")
    row = EnrollToken(id=str(uuid.uuid4()), token_hash=digest(token), created_at=now,
                      expires_at=now + ttl, uses_left=uses, labels=labels, created_by=created_by)
    session.add(row)
    return token, row


def consume_enroll_token(session: Session, token: str, *, now: datetime) -> EnrollToken | None:
    """Spend one use of an enrolment token; None if unknown, used up or expired.

    The decrement is a single conditional UPDATE, so two devices racing for the last
    use cannot both win.
    """
    row = session.scalar(select(EnrollToken).where(EnrollToken.token_hash == digest(token)))
    if row is None or row.expires_at <= now:
        return None
    spent = session.execute(
        update(EnrollToken)
        .where(EnrollToken.id == row.id, EnrollToken.uses_left > 0)
        .values(uses_left=EnrollToken.uses_left - 1)
    )
    if spent.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return row
