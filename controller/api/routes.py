"""Routes of ``/api/v1``: devices, fleet summary, tokens, enrolment; health probes."""

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy import text

from controller import audit, fleet
from controller.api.deps import Admin, Db, Operator, Rt, Viewer
from controller.api.errors import ApiError
from controller.db.models import Device
from controller.dynsec import DynsecError
from controller.security import Role, create_api_token, create_enroll_token

api = APIRouter(prefix="/api/v1")
probes = APIRouter()

Labels = Annotated[dict[str, str], Field(default_factory=dict, max_length=64)]


class DeviceOut(BaseModel):
    id: str
    name: str
    status: str
    status_since: datetime | None
    last_seen_at: datetime | None
    labels: dict[str, Any]
    device_class: str
    agent_version: str | None
    capabilities: dict[str, Any] | None
    last_health: dict[str, Any] | None
    health_count: int
    enrolled_at: datetime
    desired_generation: int
    desired: dict[str, Any] | None
    reported: dict[str, Any] | None

    @classmethod
    def of(cls, d: Device) -> "DeviceOut":
        return cls(id=d.id, name=d.name, status=d.status, status_since=d.status_since,
                   last_seen_at=d.last_seen_at, labels=d.labels,
                   device_class=fleet.device_class(d.capabilities), agent_version=d.agent_version,
                   capabilities=d.capabilities, last_health=d.last_health,
                   health_count=d.health_count, enrolled_at=d.enrolled_at,
                   desired_generation=d.desired_generation, desired=d.desired,
                   reported=d.reported)


@api.get("/devices", response_model=list[DeviceOut])
def list_devices(session: Db, _who: Viewer,
                 status: Annotated[str | None, Query(pattern="^(online|offline|enrolled)$")] = None,
                 limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
                 offset: Annotated[int, Query(ge=0)] = 0) -> list[DeviceOut]:
    return [DeviceOut.of(d) for d in fleet.list_devices(session, status=status, limit=limit,
                                                          offset=offset)]


def device_or_404(session: Db, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise ApiError(404, "device_not_found", f"no device {device_id!r}")
    return device


@api.get("/devices/{device_id}", response_model=DeviceOut)
def get_device(device_id: str, session: Db, _who: Viewer) -> DeviceOut:
    return DeviceOut.of(device_or_404(session, device_id))


@api.get("/devices/{device_id}/health")
def device_health(device_id: str, session: Db, rt: Rt, _who: Viewer,
                  minutes: Annotated[float, Query(gt=0, le=60)] = 10) -> list[dict[str, Any]]:
    """The device's health reports of the last ``minutes``, oldest first, each with the
    time ``t`` it arrived (unix seconds)."""
    device_or_404(session, device_id)
    return fleet.health_history(session, device_id,
                                since=rt.clock() - timedelta(minutes=minutes))


@api.get("/whoami")
def whoami(who: Viewer) -> dict[str, str]:
    """The caller's token name and role (the dashboard shows buttons by role)."""
    return {"name": who.name, "role": who.role.name.lower()}


@api.delete("/devices/{device_id}", status_code=204)
def delete_device(device_id: str, session: Db, rt: Rt, who: Operator) -> Response:
    device = device_or_404(session, device_id)
    session.delete(device)
    audit.record(session, actor=who.name, action="device.delete", target=device_id,
                 remote=who.remote, now=rt.clock())
    session.commit()
    rt.forget_device(device_id)  # also clears its retained desired state
    return Response(status_code=204)


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    remote: str | None
    detail: dict[str, Any]


@api.get("/audit", response_model=list[AuditOut])
def list_audit(session: Db, _who: Operator, actor: str | None = None,
               action: Annotated[str | None, Query(max_length=64)] = None,
               target: str | None = None, since: datetime | None = None,
               before_id: Annotated[int | None, Query(ge=1)] = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AuditOut]:
    """Who changed what, newest first (operators and admins: it names people and
    addresses). Page back with ``before_id`` = the last id of the previous page."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)  # a time without a zone is read as UTC
    rows = audit.entries(session, actor=actor, action=action, target=target, since=since,
                         before_id=before_id, limit=limit)
    return [AuditOut(id=r.id, at=r.at, actor=r.actor, action=r.action, target=r.target,
                     remote=r.remote, detail=r.detail) for r in rows]


@api.get("/fleet/summary")
def fleet_summary(session: Db, _who: Viewer) -> dict[str, Any]:
    return fleet.summary(session)


class EnrollTokenIn(BaseModel):
    expires_in_s: int = Field(3600, ge=60, le=30 * 86400)
    uses: int = Field(1, ge=1, le=100_000)
    labels: Labels


class EnrollTokenOut(BaseModel):
    id: str
    token: str
    expires_at: datetime
    uses: int


@api.post("/enroll-tokens", status_code=201, response_model=EnrollTokenOut)
def new_enroll_token(body: EnrollTokenIn, session: Db, rt: Rt, who: Operator) -> EnrollTokenOut:
    now = rt.clock()
    token, row = create_enroll_token(session, now=now, ttl=timedelta(seconds=body.expires_in_s),
                                     uses=body.uses, labels=body.labels, created_by=who.name)
    audit.record(session, actor=who.name, action="enroll_token.create", target=row.id,
                 remote=who.remote, now=now, detail={"uses": body.uses, "labels": body.labels})
    return EnrollTokenOut(id=row.id, token=token, expires_at=row.expires_at, uses=body.uses)


class ApiTokenIn(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    role: str = Field(pattern="^(viewer|operator|admin)$")


class ApiTokenOut(BaseModel):
    name: str
    role: str
    token: str


@api.post("/tokens", status_code=201, response_model=ApiTokenOut)
def new_api_token(body: ApiTokenIn, session: Db, rt: Rt, who: Admin) -> ApiTokenOut:
    now = rt.clock()
    token = create_api_token(session, name=body.name, role=Role.parse(body.role), now=now)
    audit.record(session, actor=who.name, action="api_token.create", target=body.name,
                 remote=who.remote, now=now, detail={"role": body.role})
    return ApiTokenOut(name=body.name, role=body.role, token=token)


class EnrollIn(BaseModel):
    token: str = Field(min_length=1, max_length=256)
    name: str | None = Field(None, max_length=128)
    labels: Labels


class EnrollOut(BaseModel):
    device_id: str
    mqtt_url: str
    mqtt_username: str
    mqtt_password: str
    topic_root: str
    keepalive_s: int
    health_interval_s: float
    desired_state_key: str
    tuf_root: str


@api.post("/enroll", status_code=201, response_model=EnrollOut)
def enroll(body: EnrollIn, request: Request, session: Db, rt: Rt) -> EnrollOut:
    """Device enrolment: authenticated by the enrolment token in the body, not a bearer."""
    now = rt.clock()
    try:
        done = fleet.enroll(session, token=body.token, name=body.name, labels=body.labels, now=now)
    except fleet.EnrollRefused as exc:
        raise ApiError(403, "enroll_refused", str(exc)) from None
    device = done.device
    try:
        rt.provision_device(device.id, done.mqtt_secret)
    except DynsecError as exc:  # nothing is committed: the token keeps its use
        raise ApiError(503, "broker_refused", f"{exc}; try again, or check the broker") from None
    try:
        audit.record(session, actor=f"enroll-token:{device.enroll_token_id}",
                     action="device.enroll", target=device.id,
                     remote=request.client.host if request.client else None, now=now,
                     detail={"name": device.name})
        session.commit()
    except Exception:  # the enrolment did not happen: no broker account outlives it
        rt.unprovision_device(device.id)
        raise
    rt.admit_device(device.id, device.mqtt_secret_hash)
    s = rt.settings
    return EnrollOut(device_id=device.id, mqtt_url=s.device_mqtt_url, mqtt_username=device.id,
                     mqtt_password=done.mqtt_secret, topic_root=s.topic_root,
                     keepalive_s=s.keepalive_s, health_interval_s=s.health_interval_s,
                     desired_state_key=rt.desired_key_text,
                     tuf_root=rt.trust.trusted_root().decode())


@probes.get("/metrics", response_class=PlainTextResponse)
def metrics(rt: Rt, _who: Viewer) -> Response:
    """Prometheus metrics (a viewer token: Prometheus sends it as a bearer token)."""
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@probes.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@probes.get("/readyz")
def readyz(session: Db, rt: Rt) -> Response:
    """Readiness: the database answers and the broker connection is up."""
    checks = {"database": "ok", "mqtt": "ok" if rt.mqtt_connected() else "down",
              "ingest": "ok" if rt.ingestor.alive else "down"}
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any database failure means not ready
        checks["database"] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return Response(json.dumps({"ready": ready, "checks": checks}), media_type="application/json",
                    status_code=200 if ready else 503)
