"""Routes of ``/api/v1/models``: push a version (streamed upload), list, show."""

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from controller import audit
from controller.api.deps import Db, Operator, Principal, Rt, Viewer
from controller.api.errors import ApiError
from controller.db.engine import transaction
from controller.registry import service
from controller.registry.blobs import Blob, BlobTooLarge
from controller.registry.inspect import InvalidModel, inspect_artifact
from controller.runtime import Runtime

router = APIRouter(prefix="/api/v1/models")


class VersionOut(BaseModel):
    name: str
    version: str
    created_at: datetime
    created_by: str
    variants: list[dict[str, Any]]


@router.post("/{name}/versions/{version}", status_code=201, response_model=VersionOut)
async def push_version(name: str, version: str, request: Request, rt: Rt, who: Operator,
                       filename: str | None = None) -> VersionOut:
    """Upload a model file as the request body (streamed to disk, size-capped),
    validate it, register it and sign it. A refused upload leaves nothing behind."""
    await run_in_threadpool(_check, rt, name, version)
    writer = rt.blobs.writer(max_bytes=rt.settings.max_upload_bytes)
    try:
        async for chunk in request.stream():
            writer.write(chunk)
        blob = writer.commit()
    except BlobTooLarge as exc:
        writer.abort()
        raise ApiError(413, "too_large", f"{exc}; raise --max-upload on the controller "
                       "if this model is meant to be this large") from None
    except ClientDisconnect:
        writer.abort()
        raise ApiError(400, "upload_interrupted", "the upload ended early") from None
    return await run_in_threadpool(_register, rt, who, name, version, blob, filename)


def _check(rt: Runtime, name: str, version: str) -> None:
    with transaction(rt.session_factory) as session:
        try:
            service.check_new_version(session, name=name, version=version)
        except service.RegistryError as exc:
            raise ApiError(exc.status, exc.code, exc.detail) from None


def _register(rt: Runtime, who: Principal, name: str, version: str, blob: Blob,
              filename: str | None) -> VersionOut:
    try:
        info = inspect_artifact(blob.path, filename=filename)
        with transaction(rt.session_factory) as session:
            row = service.register_version(session, name=name, version=version, blob=blob,
                                           info=info, now=rt.clock(), actor=who.name)
            audit.record(session, actor=who.name, action="model.push", target=f"{name}@{version}",
                         remote=who.remote, now=rt.clock(),
                         detail={"sha256": blob.sha256, "size": blob.size})
            service.publish_targets(session, rt.trust, now=rt.clock())
            view = service.describe(session, row, rt.trust.targets())
    except (InvalidModel, service.RegistryError) as exc:
        _forget_blob(rt, blob)
        if isinstance(exc, InvalidModel):
            raise ApiError(422, "invalid_model", str(exc)) from None
        raise ApiError(exc.status, exc.code, exc.detail) from None
    except Exception:
        _forget_blob(rt, blob)
        raise
    return VersionOut(**view.__dict__)


def _forget_blob(rt: Runtime, blob: Blob) -> None:
    """Remove a blob this upload added, unless a registered variant uses it."""
    if not blob.created:
        return
    with rt.session_factory() as session:
        if blob.sha256 not in service.referenced_blobs(session):
            rt.blobs.delete(blob.sha256)


@router.get("", response_model=list[VersionOut])
def list_models(session: Db, rt: Rt, _who: Viewer) -> list[VersionOut]:
    signed = rt.trust.targets()
    return [VersionOut(**service.describe(session, v, signed).__dict__)
            for v in service.list_versions(session)]


@router.get("/{name}/versions/{version}", response_model=VersionOut)
def show_version(name: str, version: str, session: Db, rt: Rt, _who: Viewer) -> VersionOut:
    row = service.find_version(session, name=name, version=version)
    if row is None:
        raise ApiError(404, "version_not_found", f"no version {name}@{version}")
    return VersionOut(**service.describe(session, row, rt.trust.targets()).__dict__)
