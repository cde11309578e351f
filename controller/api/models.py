"""Routes of the model registry: upload an artifact, register a version, list, show, delete.

A push is two requests, as in OCI registries: ``POST /api/v1/uploads`` streams the model
file to disk (size-capped) and validates it, and ``POST /api/v1/models/{name}/versions/
{version}`` registers the upload with its labels and smoke test. An upload that is never
registered is collected with the other unreferenced blobs after an hour.
"""

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect

from controller import audit
from controller.api.deps import Db, Operator, Principal, Rt, Viewer
from controller.api.errors import ApiError
from controller.db.engine import transaction
from controller.db.models import ModelVersion
from controller.registry import jobs, options, service
from controller.registry.blobs import Blob, BlobTooLarge
from controller.registry.inputs import InputError, read_samples
from controller.registry.inspect import InvalidModel, inspect_artifact
from controller.runtime import Runtime
from shared.smoke import SmokeTest

router = APIRouter(prefix="/api/v1")


class UploadOut(BaseModel):
    sha256: str
    size: int
    format: str
    quantization: str


class VersionIn(BaseModel):
    upload: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$",
                                 description="sha256 returned by POST /api/v1/uploads")]
    labels: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=256)]] \
        = Field(default_factory=dict, max_length=32)
    smoke_test: SmokeTest | None = None
    samples: Annotated[str | None, Field(
        pattern=r"^[0-9a-f]{64}$", description="sha256 of a samples upload "
        "(POST /api/v1/uploads?kind=samples): the inputs derivation and fidelity use")] = None
    inputs: dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=128)]] \
        = Field(default_factory=dict, max_length=64, description="input name -> declaration "
                "(float32[1,3,224,224], int64:16000, zeros, ...) for generated samples")
    variants: Annotated[list[Annotated[str, Field(max_length=32)]] | None, Field(
        max_length=16, description="derived variants to build (default: the format's)")] = None
    derive: bool = Field(True, description="false: build no derived variants")
    min_fidelity: Annotated[str | None, Field(
        max_length=256, description="quality floor, e.g. cosine>=0.99,top1>=0.95: a "
        "variant below it is refused before it is signed")] = None
    metric: Annotated[str | None, Field(max_length=32, description="the fidelity metric "
                                        "that describes this model (default: from outputs)")] \
        = None
    text: Annotated[str | None, Field(
        min_length=1, max_length=256 << 10, description="text a GGUF language model's "
        "perplexity is measured on, source against each variant (default: the smoke "
        "prompts)")] = None


class VersionOut(BaseModel):
    name: str
    version: str
    created_at: datetime
    created_by: str
    labels: dict[str, str]
    status: str
    deployable: bool
    job: dict[str, Any] | None
    smoke_test: dict[str, Any] | None
    variants: list[dict[str, Any]]
    refused: list[dict[str, Any]]


@router.post("/uploads", status_code=201, response_model=UploadOut)
async def upload(request: Request, rt: Rt, who: Operator, filename: str | None = None,
                 kind: Literal["model", "samples"] = "model") -> UploadOut:
    """Stream a model file (or, with ``kind=samples``, a samples ``.npz``) to disk,
    size-capped, and validate it. A refused upload leaves nothing behind."""
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
    if kind == "samples":
        try:
            await run_in_threadpool(read_samples, blob.path.read_bytes())
        except InputError as exc:
            await run_in_threadpool(_forget_blob, rt, blob)
            raise ApiError(422, "invalid_samples", str(exc)) from None
        await run_in_threadpool(_record_upload, rt, who, blob, filename)
        return UploadOut(sha256=blob.sha256, size=blob.size, format="samples",
                         quantization="")
    try:
        info = await run_in_threadpool(inspect_artifact, blob.path, filename=filename)
    except InvalidModel as exc:
        await run_in_threadpool(_forget_blob, rt, blob)
        raise ApiError(422, "invalid_model", str(exc)) from None
    await run_in_threadpool(_record_upload, rt, who, blob, filename)
    return UploadOut(sha256=blob.sha256, size=blob.size, format=info.format,
                     quantization=info.quantization)


def _record_upload(rt: Runtime, who: Principal, blob: Blob, filename: str | None) -> None:
    with transaction(rt.session_factory) as session:
        audit.record(session, actor=who.name, action="upload.create", target=blob.sha256,
                     remote=who.remote, now=rt.clock(),
                     detail={"size": blob.size, "filename": filename})


def _forget_blob(rt: Runtime, blob: Blob) -> None:
    """Remove a blob this upload added, unless a registered variant uses it."""
    if not blob.created:
        return
    with rt.session_factory() as session:
        if blob.sha256 not in service.referenced_blobs(session):
            rt.blobs.delete(blob.sha256)


@router.post("/models/{name}/versions/{version}", status_code=201, response_model=VersionOut)
def create_version(name: str, version: str, body: VersionIn, rt: Rt,
                   who: Operator) -> VersionOut:
    """Register an upload as NAME@VERSION; its smoke test and quantised variants are
    built by a background job whose progress the version shows."""
    blob = rt.blobs.get(body.upload)
    if blob is None:
        raise ApiError(404, "upload_not_found", f"no upload {body.upload}; upload the file "
                       "first (POST /api/v1/uploads)")
    samples = None
    if body.samples is not None:
        samples = rt.blobs.get(body.samples)
        if samples is None:
            raise ApiError(404, "upload_not_found", f"no samples upload {body.samples}; "
                           "upload them first (POST /api/v1/uploads?kind=samples)")
    try:
        info = inspect_artifact(blob.path)
        derive_options = options.derive_options(
            info, declared=body.inputs, variants=body.variants, derive=body.derive,
            floor=body.min_fidelity, metric=body.metric,
            samples=None if samples is None else read_samples(samples.path.read_bytes()),
            smoke_inputs=body.smoke_test is not None and body.smoke_test.inputs is not None,
            text=body.text)
        with transaction(rt.session_factory) as session:
            row = service.register_version(
                session, name=name, version=version, blob=blob, info=info, now=rt.clock(),
                actor=who.name, labels=body.labels,
                smoke_test=None if body.smoke_test is None
                else body.smoke_test.model_dump(exclude_none=True),
                samples=None if samples is None else samples.sha256,
                derive_options=derive_options)
            jobs.enqueue(session, version=row, now=rt.clock())
            audit.record(session, actor=who.name, action="model.push", target=f"{name}@{version}",
                         remote=who.remote, now=rt.clock(),
                         detail={"sha256": blob.sha256, "size": blob.size})
            service.publish_targets(session, rt.trust, now=rt.clock())
            view = service.describe(session, row, rt.trust.targets())
    except InvalidModel as exc:
        raise ApiError(422, "invalid_model", str(exc)) from None
    except InputError as exc:
        raise ApiError(422, "invalid_samples", str(exc)) from None
    except service.RegistryError as exc:
        raise ApiError(exc.status, exc.code, exc.detail) from None
    rt.jobs.wake()
    return VersionOut(**view.__dict__)


@router.get("/models", response_model=list[VersionOut])
def list_models(session: Db, rt: Rt, _who: Viewer) -> list[VersionOut]:
    signed = rt.trust.targets()
    return [VersionOut(**service.describe(session, v, signed).__dict__)
            for v in service.list_versions(session)]


@router.get("/models/{name}/versions", response_model=list[VersionOut])
def list_model_versions(name: str, session: Db, rt: Rt, _who: Viewer) -> list[VersionOut]:
    versions = service.list_versions(session, name=name)
    if not versions:
        raise ApiError(404, "model_not_found", f"no model {name!r}")
    signed = rt.trust.targets()
    return [VersionOut(**service.describe(session, v, signed).__dict__) for v in versions]


@router.get("/models/{name}/versions/{version}", response_model=VersionOut)
def show_version(name: str, version: str, session: Db, rt: Rt, _who: Viewer) -> VersionOut:
    return VersionOut(**service.describe(session, _find(session, name, version),
                                         rt.trust.targets()).__dict__)


@router.delete("/models/{name}/versions/{version}", status_code=204)
def delete_version(name: str, version: str, rt: Rt, who: Operator) -> None:
    """Delete a version no device runs; its blobs go with the next collection."""
    with transaction(rt.session_factory) as session:
        row = _find(session, name, version)
        try:
            service.delete_version(session, row)
        except service.RegistryError as exc:
            raise ApiError(exc.status, exc.code, exc.detail) from None
        audit.record(session, actor=who.name, action="model.delete", target=f"{name}@{version}",
                     remote=who.remote, now=rt.clock(), detail={})
        service.publish_targets(session, rt.trust, now=rt.clock())


def _find(session: Session, name: str, version: str) -> ModelVersion:
    row = service.find_version(session, name=name, version=version)
    if row is None:
        raise ApiError(404, "version_not_found", f"no version {name}@{version}")
    return row

