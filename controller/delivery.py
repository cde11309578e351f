"""Desired state: which model each device should run, signed for that device.

``assign`` records a device's new desired state (a new generation, the variant the
registry's choice picks for the device's capabilities) and returns the signed
envelope to publish, retained, on the device's ``desired`` topic. The caller publishes
it after the transaction commits; ``envelope`` rebuilds the same bytes from the row,
so a controller (or an embedded broker) that restarted publishes them again. The row
holds the ``DesiredState`` itself (its JSON dump): what is stored is what is signed.
Functions over a session; they never commit and never touch MQTT.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.models import Device, ModelVersion, Variant
from controller.registry import service
from controller.registry.choice import VariantSpec, choose_variant
from shared.envelope import Signer, seal_desired
from shared.messages import Capabilities, DesiredState, Probe


class DeliveryError(Exception):
    """A desired state that cannot be set; ``status`` and ``code`` go to the API."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


@dataclass(frozen=True)
class Assignment:
    device_id: str
    envelope: bytes


def assign(session: Session, device: Device, version: ModelVersion | None, *, now: datetime,
           signer: Signer, rollback: bool = False,
           variants: list[Variant] | None = None, probe: Probe | None = None) -> Assignment:
    """Make ``version`` (None: no model) the device's desired state, as a new generation.

    ``variants`` are the version's (``ready_variants``), to save looking them up again
    when assigning one version to many devices; ``rollback`` marks a return to what the
    device ran before (it skips probation); ``probe`` asks for probes once it serves.
    """
    fields: dict[str, Any] = {}
    if version is not None:
        fields = pick(device, version,
                      variants if variants is not None else ready_variants(session, version))
    return reissue(session, device, {**fields, "rollback": rollback, "probe": probe},
                   now=now, signer=signer)


def reissue(session: Session, device: Device, fields: dict[str, Any], *, now: datetime,
            signer: Signer) -> Assignment:
    """``fields`` (``DesiredState``'s, but device, generation and time) as the device's
    next generation; for a rollout's probes, the desired state it has with a probe."""
    fields = {k: v for k, v in fields.items() if k not in ("device_id", "generation",
                                                             "issued_at", "v")}
    desired = DesiredState(device_id=device.id, generation=device.desired_generation + 1,
                           issued_at=now, **fields)
    device.desired_generation = desired.generation
    device.desired = desired.model_dump(mode="json")
    session.flush()
    return Assignment(device.id, envelope(device, signer))


def desired_state(device: Device) -> DesiredState | None:
    """The device's desired state as stored (None: never given one)."""
    return DesiredState.model_validate(device.desired) if device.desired else None


def envelope(device: Device, signer: Signer) -> bytes:
    """The signed desired state of ``device`` as stored (same row, same bytes)."""
    desired = desired_state(device)
    if desired is None:
        raise ValueError(f"{device.id} has no desired state to sign")
    return seal_desired(signer, desired)


def published(session: Session) -> list[Device]:
    """Devices that have a desired state (to publish again after a restart)."""
    return list(session.scalars(select(Device).where(Device.desired_generation > 0)))


def ready_variants(session: Session, version: ModelVersion) -> list[Variant]:
    """The version's variants; raise ``DeliveryError`` unless it can be deployed."""
    if not service.deployable(session, version):
        status, job = service.version_status(session, version)
        raise DeliveryError(409, "version_not_ready", f"{version.model_name}@{version.version} "
                            f"is {status}: {job.message if job else ''}")
    return service.variants_of(session, version)


def choose(device: Device, variants: list[Variant]) -> Variant | str:
    """The variant that fits ``device`` best, or why none does."""
    if device.capabilities is None:
        return "it has not reported its capabilities yet (it has never connected)"
    choice = choose_variant(
        [VariantSpec(v.name, v.format, v.quantization, v.size, v.ram_estimate_bytes,
                     v.requirements) for v in variants],
        Capabilities.model_validate(device.capabilities))
    if choice.variant is None:
        return "; ".join(f"{name}: {reason}" for name, reason in choice.reasons.items())
    name = choice.variant.name
    return next(v for v in variants if v.name == name)


def pick(device: Device, version: ModelVersion, variants: list[Variant]) -> dict[str, Any]:
    """The desired-state fields for ``version`` on ``device``."""
    ref = f"{version.model_name}@{version.version}"
    chosen = choose(device, variants)
    if isinstance(chosen, str):
        if device.capabilities is None:
            raise DeliveryError(409, "capabilities_unknown",
                                f"{device.id} has not reported its capabilities yet (it has "
                                "never connected); pin it once it is online")
        raise DeliveryError(409, "no_fitting_variant",
                            f"no variant of {ref} fits {device.id}: {chosen}")
    return {"model": version.model_name, "version": version.version, "variant": chosen.name,
            "target": chosen.target_path, "sha256": chosen.sha256, "size": chosen.size}
