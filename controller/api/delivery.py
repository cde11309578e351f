"""Routes that set what a device runs: ``/api/v1/devices/{id}/pin``; and its events."""

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import select

from controller import audit, delivery
from controller.api.deps import Db, Operator, Rt, Viewer
from controller.api.errors import ApiError
from controller.api.routes import DeviceOut, device_or_404
from controller.db.models import DeviceEvent, ModelVersion
from controller.registry import service

router = APIRouter(prefix="/api/v1/devices")


class PinIn(BaseModel):
    model: Annotated[str, Field(pattern=r"^[^@]+@[^@]+$", description="NAME@VERSION")]


class EventOut(BaseModel):
    at: datetime
    kind: str
    generation: int
    detail: str


@router.put("/{device_id}/pin", response_model=DeviceOut)
def pin(device_id: str, body: PinIn, session: Db, rt: Rt, who: Operator) -> DeviceOut:
    """Make the device run NAME@VERSION (the variant that fits it best), now."""
    name, _, version = body.model.partition("@")
    row = service.find_version(session, name=name, version=version)
    if row is None:
        raise ApiError(404, "version_not_found", f"no version {body.model}")
    return _assign(device_id, row, session, rt, who, action="device.pin")


@router.delete("/{device_id}/pin", response_model=DeviceOut)
def unpin(device_id: str, session: Db, rt: Rt, who: Operator) -> DeviceOut:
    """Make the device run no model."""
    return _assign(device_id, None, session, rt, who, action="device.unpin")


def _assign(device_id: str, version: ModelVersion | None, session: Db, rt: Rt, who: Operator,
            *, action: str) -> DeviceOut:
    device = device_or_404(session, device_id)
    try:
        assignment = delivery.assign(session, device, version, now=rt.clock(),
                                     signer=rt.signer)
    except delivery.DeliveryError as exc:
        raise ApiError(exc.status, exc.code, exc.detail) from None
    audit.record(session, actor=who.name, action=action, target=device_id, remote=who.remote,
                 now=rt.clock(), detail=dict(device.desired or {}))
    out = DeviceOut.of(device)
    session.commit()
    rt.publish_desired(assignment)
    return out


@router.get("/{device_id}/events", response_model=list[EventOut])
def events(device_id: str, session: Db, _who: Viewer,
           limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[EventOut]:
    """The device's latest events, oldest first."""
    device_or_404(session, device_id)
    rows = session.scalars(select(DeviceEvent).where(DeviceEvent.device_id == device_id)
                           .order_by(DeviceEvent.id.desc()).limit(limit))
    return [EventOut(at=e.at, kind=e.kind, generation=e.generation, detail=e.detail)
            for e in reversed(list(rows))]
