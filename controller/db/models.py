"""ORM models. The schema is owned by Alembic (``migrations/``), never ``create_all``."""

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JsonType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; always hands back timezone-aware datetimes (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JsonType}


class ApiToken(Base):
    """A bearer token for the API. Only its sha256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class EnrollToken(Base):
    """A one-time (or N-time) enrolment token that expires. Only its sha256 is stored."""

    __tablename__ = "enroll_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    uses_left: Mapped[int] = mapped_column(Integer)
    labels: Mapped[dict[str, Any]]
    created_by: Mapped[str] = mapped_column(String(128))


class Device(Base):
    """One edge device: identity, credentials, capabilities and last known state."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    labels: Mapped[dict[str, Any]]
    mqtt_secret_hash: Mapped[str] = mapped_column(String(64))
    enrolled_at: Mapped[datetime]
    enroll_token_id: Mapped[str | None] = mapped_column(String(36))
    status: Mapped[str] = mapped_column(String(16), default="enrolled")
    status_since: Mapped[datetime | None]
    last_seen_at: Mapped[datetime | None]
    agent_version: Mapped[str | None] = mapped_column(String(64))
    capabilities: Mapped[dict[str, Any] | None]
    last_health: Mapped[dict[str, Any] | None]
    health_count: Mapped[int] = mapped_column(BigInteger, default=0)
    #: the generation of the last desired state published (0: never)
    desired_generation: Mapped[int] = mapped_column(BigInteger, default=0)
    desired: Mapped[dict[str, Any] | None]  # the DesiredState signed for it, as JSON
    reported: Mapped[dict[str, Any] | None]  # the device's last ReportedState


class DeviceEvent(Base):
    """One step of an install (or anything else) a device reported."""

    __tablename__ = "device_events"
    __table_args__ = (Index("ix_device_events_device_id", "device_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(128))
    generation: Mapped[int] = mapped_column(BigInteger)
    detail: Mapped[str] = mapped_column(Text)


class HealthBatch(Base):
    """The health reports of one ingest batch, each stored verbatim.

    ``reports`` is a JSON array of ``{"d": device id, "t": received at (unix
    seconds), "r": the report as the device sent it}``. One row per batch rather
    than per report: a row per report cost the ingest worker about twice the CPU of
    the whole bare MQTT receive path (docs/adr/0003). Windows of time are read by
    ``received_to``; per-device history is filtered from those windows.
    """

    __tablename__ = "health_batches"
    __table_args__ = (Index("ix_health_batches_received_to", "received_to"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    received_from: Mapped[datetime]
    received_to: Mapped[datetime]
    count: Mapped[int] = mapped_column(Integer)
    reports: Mapped[str] = mapped_column(Text)

    def entries(self) -> list[dict[str, Any]]:
        """The batch's reports as dicts: ``{"d": device, "t": unix time, "r": report}``."""
        return list(json.loads(self.reports))


class Model(Base):
    """A named model; its versions carry the artifacts."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[datetime]


class ModelVersion(Base):
    """One immutable, semantically versioned release of a model."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_name", "version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_name: Mapped[str] = mapped_column(ForeignKey("models.name", ondelete="CASCADE"))
    version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(128))
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: inputs, tolerance, latency budget (see ``registry.smoke``); the expected outputs
    #: live on each variant, since a quantised variant computes its own.
    smoke_test: Mapped[dict[str, Any] | None]
    #: the pusher's sample inputs (a blob: ``registry.inputs``'s ``.npz``), if given
    samples_sha256: Mapped[str | None] = mapped_column(String(64))
    #: how to derive: ``inputs`` (declarations), ``variants``, ``floor``, ``metric``
    derive_options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: derived variants not offered: ``[{"name", "reason", "comparison"}]``
    refused: Mapped[list[Any]] = mapped_column(JsonType, default=list)


class Variant(Base):
    """One artifact of a version: the pushed source or a quantised derivative."""

    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("version_id", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))  # "source", "int8", "q4_k_m", ...
    format: Mapped[str] = mapped_column(String(16))
    quantization: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    requirements: Mapped[dict[str, Any]]
    ram_estimate_bytes: Mapped[int] = mapped_column(BigInteger)
    target_path: Mapped[str] = mapped_column(String(512), unique=True)
    created_at: Mapped[datetime]
    derived_from: Mapped[str | None] = mapped_column(String(64))  # the source variant's name
    comparison: Mapped[dict[str, Any] | None]  # against the source, on the smoke inputs
    #: the variant's smoke test (``shared.smoke``'s file: inputs and its expected outputs)
    smoke_sha256: Mapped[str | None] = mapped_column(String(64))
    smoke_size: Mapped[int | None] = mapped_column(BigInteger)
    #: ``ram_estimate_bytes`` is the peak RSS of a process that ran the samples on it
    ram_measured: Mapped[bool] = mapped_column(default=False)


class Job(Base):
    """Background work on a version (quantisation, smoke-test outputs), with progress."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    version_id: Mapped[str] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # queued|running|succeeded|failed
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(String(512), default="")
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class AuditEntry(Base):
    """Who changed what, when, from where."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    remote: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]]


class Rollout(Base):
    """A staged rollout plan and where it stands (``controller.rollouts``)."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id",
                                                       ondelete="RESTRICT"))
    selector: Mapped[dict[str, Any]]
    classes: Mapped[list[str]] = mapped_column(JsonType)
    stages: Mapped[list[dict[str, Any]]] = mapped_column(JsonType)
    gates: Mapped[dict[str, Any]]
    on_failure: Mapped[str] = mapped_column(String(16))
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    probes: Mapped[dict[str, Any] | None] = mapped_column(JsonType)  # plan.Probes; None: none
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[int] = mapped_column(Integer)
    entered_at: Mapped[datetime]  # when ``state`` began
    paused_from: Mapped[str | None] = mapped_column(String(16))
    inconclusive_since: Mapped[datetime | None]
    baseline: Mapped[dict[str, Any]]  # per class, measured at creation (controller.rollouts.gates)
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text, default="")  # why it is where it is


class RolloutMember(Base):
    """A device of a rollout's target set: its class, and what the rollout did to it."""

    __tablename__ = "rollout_members"
    __table_args__ = (Index("ix_rollout_members_device", "device_id"),)

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"),
                                            primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    cls: Mapped[str] = mapped_column(String(160))
    variant: Mapped[str] = mapped_column(String(64))
    joined_at: Mapped[datetime]
    left_at: Mapped[datetime | None]  # no longer in the target set: not counted
    assigned_stage: Mapped[int | None] = mapped_column(Integer)
    assigned_at: Mapped[datetime | None]
    generation: Mapped[int | None] = mapped_column(BigInteger)  # of the target's desired state
    previous: Mapped[dict[str, Any] | None]  # {"model", "version"} it had before, if any
    outcome: Mapped[str] = mapped_column(String(16), default="pending")
    reason: Mapped[str] = mapped_column(Text, default="")
    revert_generation: Mapped[int | None] = mapped_column(BigInteger)
    reverted_at: Mapped[datetime | None]  # when it reported running the previous model


class RolloutEvent(Base):
    """The timeline: every transition, gate evaluation and operator action."""

    __tablename__ = "rollout_events"
    __table_args__ = (Index("ix_rollout_events_rollout", "rollout_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(16))  # transition | gate | action | note
    state: Mapped[str] = mapped_column(String(16))  # the state after it
    stage: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(128))  # "scheduler" or the token's name
    reason: Mapped[str] = mapped_column(Text)
    figures: Mapped[dict[str, Any] | None]
