"""Registry services: register versions and variants, list them, publish TUF targets.

Functions over a session; they never commit. TUF targets are a projection of the
variants table: ``publish_targets`` rebuilds them from the database, so a publish
that failed can simply be run again.
"""

import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from tuf.api.metadata import TargetFile

from controller.db.models import Device, Job, Model, ModelVersion, Variant
from controller.registry.blobs import Blob
from controller.registry.inspect import ArtifactInfo
from controller.registry.trust import TrustRepository
from shared import smoke
from shared.targets import SmokeTargetInfo, TargetInfo

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                     r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z.-]+)?$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


class RegistryError(Exception):
    """A registry request that cannot be done; ``status`` and ``code`` go to the API."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def check_new_version(session: Session, *, name: str, version: str) -> None:
    """Refuse a bad name, a non-semantic version, or a version that exists (immutable)."""
    if not _NAME.match(name):
        raise RegistryError(422, "invalid_name", f"model name {name!r}: use lowercase letters, "
                            "digits, '.', '_' and '-' (at most 128)")
    if not _SEMVER.match(version):
        raise RegistryError(422, "invalid_version",
                            f"version {version!r} is not a semantic version like 1.2.0")
    if find_version(session, name=name, version=version) is not None:
        raise RegistryError(409, "version_exists",
                            f"{name}@{version} exists and versions are immutable; "
                            "push a new version")


def find_version(session: Session, *, name: str, version: str) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.model_name == name,
                                                     ModelVersion.version == version))


def register_version(session: Session, *, name: str, version: str, blob: Blob,
                     info: ArtifactInfo, now: datetime, actor: str,
                     labels: dict[str, str] | None = None,
                     smoke_test: dict[str, Any] | None = None,
                     samples: str | None = None,
                     derive_options: dict[str, Any] | None = None) -> ModelVersion:
    """Add the version and its source variant (validated, stored) to the registry.
    ``smoke_test`` is the operator's, to be completed by the version's derive job;
    ``samples`` (a blob's sha256) and ``derive_options`` say how that job runs."""
    check_new_version(session, name=name, version=version)
    if session.get(Model, name) is None:
        session.add(Model(name=name, created_at=now))
    row = ModelVersion(id=str(uuid.uuid4()), model_name=name, version=version,
                       created_at=now, created_by=actor, labels=labels or {},
                       smoke_test=smoke_test, samples_sha256=samples,
                       derive_options=derive_options or {}, refused=[])
    session.add(row)
    session.add(Variant(
        id=str(uuid.uuid4()), version_id=row.id, name="source", format=info.format,
        quantization=info.quantization, sha256=blob.sha256, size=blob.size,
        requirements=info.requirements, ram_estimate_bytes=info.ram_estimate_bytes,
        target_path=target_path(row, "source", info.format), created_at=now))
    session.flush()
    return row


def target_path(version: ModelVersion, variant: str, fmt: str) -> str:
    return f"models/{version.model_name}/{version.version}/{variant}.{fmt}"


def variants_of(session: Session, version: ModelVersion) -> list[Variant]:
    """The source first, then derived variants from the largest (most faithful) down."""
    rows = session.scalars(select(Variant).where(Variant.version_id == version.id))
    return sorted(rows, key=lambda v: (v.derived_from is not None, -v.size, v.name))


def referenced_blobs(session: Session) -> set[str]:
    """Blobs the registry uses: variants' files and versions' sample inputs."""
    samples = session.scalars(select(ModelVersion.samples_sha256)
                              .where(ModelVersion.samples_sha256.is_not(None)))
    tests = session.scalars(select(Variant.smoke_sha256)
                            .where(Variant.smoke_sha256.is_not(None)))
    return set(session.scalars(select(Variant.sha256))) | {s for s in [*samples, *tests] if s}


@dataclass(frozen=True)
class VersionView:
    name: str
    version: str
    created_at: datetime
    created_by: str
    labels: dict[str, str]
    status: str  # processing | ready | failed
    deployable: bool
    job: dict[str, Any] | None
    smoke_test: dict[str, Any] | None
    variants: list[dict[str, Any]]
    refused: list[dict[str, Any]]


def describe(session: Session, version: ModelVersion, signed: Collection[str]) -> VersionView:
    """A version with its variants; ``signed`` is the set of signed target paths
    (``trust.targets()``, read once by the caller however many versions it shows)."""
    status, job = version_status(session, version)
    test = version.smoke_test
    return VersionView(
        name=version.model_name, version=version.version, created_at=version.created_at,
        created_by=version.created_by, labels=version.labels, status=status,
        deployable=_deployable(session, version, status),
        job=None if job is None else {"id": job.id, "state": job.state,
                                      "progress": job.progress, "message": job.message},
        smoke_test=None if test is None else {
            "inputs": test["inputs"] if isinstance(test.get("inputs"), int)
            else len(test.get("inputs") or []), "tolerance": test.get("tolerance"),
            "latency_budget_ms": test.get("latency_budget_ms"),
            "generated_inputs": test.get("generated_inputs", False)},
        variants=[{"name": v.name, "format": v.format, "quantization": v.quantization,
                   "size": v.size, "sha256": v.sha256, "requirements": v.requirements,
                   "ram_estimate_bytes": v.ram_estimate_bytes, "ram_measured": v.ram_measured,
                   "target": v.target_path, "smoke_test_bytes": v.smoke_size,
                   "derived_from": v.derived_from,
                   "comparison": v.comparison, "signed": v.target_path in signed}
                  for v in variants_of(session, version)],
        refused=list(version.refused or []))


def version_status(session: Session, version: ModelVersion) -> tuple[str, Job | None]:
    """``processing``, ``ready`` or ``failed``, and the version's latest job.

    ``processing`` while the job runs; ``ready`` once it has finished, or once the
    source ran even if the job then died; ``failed`` only if the source itself could not
    be run (a derived variant that fails is refused on its own, see ``refused``). A
    version can be deployed before it is ready: see ``deployable``."""
    job = latest_job(session, version.id)
    if job is None or job.state == "succeeded":
        return "ready", job
    if job.state != "failed":
        return "processing", job
    return ("ready" if _source_ran(session, version) else "failed"), job


def deployable(session: Session, version: ModelVersion) -> bool:
    """Whether devices can be given the version: its source is validated, signed and
    has run on the sample inputs (its smoke test is complete), whatever becomes of the
    derived variants still being built."""
    return _deployable(session, version, version_status(session, version)[0])


def _deployable(session: Session, version: ModelVersion, status: str) -> bool:
    return status == "ready" or (status == "processing" and _source_ran(session, version))


def _source_ran(session: Session, version: ModelVersion) -> bool:
    test = session.scalar(select(Variant.smoke_sha256).where(Variant.version_id == version.id,
                                                             Variant.name == "source"))
    return test is not None


def latest_job(session: Session, version_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.version_id == version_id)
                          .order_by(Job.created_at.desc()).limit(1))


def users_of(session: Session, version: ModelVersion) -> list[str]:
    """Devices that report running ``version`` (``active_model`` is ``name@version``)."""
    ref = f"{version.model_name}@{version.version}"
    return list(session.scalars(select(Device.id).where(
        Device.last_health["active_model"].as_string() == ref).order_by(Device.id).limit(11)))


def delete_version(session: Session, version: ModelVersion) -> None:
    """Delete a version (and its variants and jobs) unless a device runs it."""
    users = users_of(session, version)
    if users:
        shown = ", ".join(users[:10]) + (" and more" if len(users) > 10 else "")
        raise RegistryError(409, "version_in_use",
                            f"{version.model_name}@{version.version} runs on {shown}; roll "
                            "those devices to another version first")
    session.delete(version)
    session.flush()


def list_versions(session: Session, *, name: str | None = None) -> list[ModelVersion]:
    query = select(ModelVersion).order_by(ModelVersion.model_name, ModelVersion.created_at)
    if name is not None:
        query = query.where(ModelVersion.model_name == name)
    return list(session.scalars(query))


def publish_targets(session: Session, trust: TrustRepository, *, now: datetime) -> int:
    """Make the signed targets exactly the variants (and their smoke tests) in the
    database; return their count."""
    rows = session.execute(select(Variant, ModelVersion).join(
        ModelVersion, Variant.version_id == ModelVersion.id)).all()
    targets = {}
    for v, mv in rows:
        ref = None
        if v.smoke_sha256 is not None and v.smoke_size is not None:
            path = smoke_target_path(v)
            ref = smoke.SmokeRef(target=path, sha256=v.smoke_sha256, length=v.smoke_size)
            test = SmokeTargetInfo(model=mv.model_name, version=mv.version, variant=v.name)
            targets[path] = TargetFile(v.smoke_size, {"sha256": v.smoke_sha256}, path,
                                       unrecognized_fields={"custom": _json(test)})
        info = TargetInfo(model=mv.model_name, version=mv.version, variant=v.name,
                          format=v.format, quantization=v.quantization,
                          requirements=v.requirements, ram_estimate_bytes=v.ram_estimate_bytes,
                          smoke_test=ref)
        targets[v.target_path] = TargetFile(v.size, {"sha256": v.sha256}, v.target_path,
                                            unrecognized_fields={"custom": _json(info)})
    if targets != trust.targets():
        trust.set_targets(targets, now=now)
    return len(targets)


def smoke_target_path(variant: Variant) -> str:
    return f"{variant.target_path}.smoke.json"


def _json(info: TargetInfo | SmokeTargetInfo) -> dict[str, Any]:
    """A target's ``custom`` as signed: the fields set, none left as null (a smoke test
    absent is absent, as older agents expect)."""
    return info.model_dump(mode="json", exclude_none=True, exclude={"v"})
