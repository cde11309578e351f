"""What a rollout's devices reported, read from their raw reports. Pure: no session.

A device's install outcome comes to the controller twice: as its retained reported
state, and repeated in every health report (so one dropped reported-state message
delays an outcome, never loses it). ``latest_outcome`` picks the newer of the two;
``observe`` takes one member of a rollout as stored and the device as the database
shows it, and returns the member as it now stands (its outcome for the target, whether
its revert arrived, whether it left) with what the gates judge it by. The rollout
service and ingestion both read outcomes here.
"""

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from controller.rollouts.gates import Figures, Member
from controller.rollouts.tick import Target
from shared.messages import OUTCOMES, InstallState, ReportedState

_STATES = frozenset(s.value for s in InstallState)


@dataclass(frozen=True)
class Outcome:
    """The last install a device finished (or is in): generation, state, detail."""

    generation: int = 0
    state: InstallState | None = None
    detail: str = ""

    @property
    def final(self) -> bool:
        return self.state in OUTCOMES


def latest_outcome(reported: Mapping[str, Any] | None,
                   health: Mapping[str, Any] | None) -> Outcome:
    """The newer of the reported state and the outcome repeated in health reports."""
    from_health = health_outcome(health)
    if reported:
        state = ReportedState.model_validate(reported)
        if from_health is None or from_health.generation <= state.generation:
            return Outcome(state.generation, state.state, state.detail)
    return from_health or Outcome()


def health_outcome(health: Mapping[str, Any] | None) -> Outcome | None:
    """The install outcome a health report repeats, if it has one."""
    if not health or not health.get("install_generation"):
        return None
    # stored as received and validated then (``Health``); only these fields are read
    state = health.get("install_state")
    return Outcome(int(health["install_generation"]),
                   InstallState(state) if state in _STATES else None,
                   str(health.get("install_reason") or ""))


@dataclass(frozen=True)
class Device:
    """A device as the database shows it (None where it was deleted)."""

    id: str
    online: bool
    desired_generation: int
    reported: Mapping[str, Any] | None
    health: Mapping[str, Any] | None


@dataclass(frozen=True)
class Tracked:
    """A rollout member as stored."""

    device_id: str
    cls: str
    assigned_at: datetime | None
    generation: int | None  # of the target's desired state
    outcome: InstallState | None  # None: pending
    reason: str
    left_at: datetime | None
    revert_generation: int | None
    reverted_at: datetime | None


def observe(m: Tracked, device: Device | None, target_ref: str, *,
            now: datetime, probes: bool = False) -> tuple[Tracked, Target]:
    """``m`` after reading what its device reported, and the member as the tick sees it
    (judged on its probes' figures with ``probes``)."""
    seen = latest_outcome(device.reported, device.health) if device is not None else Outcome()
    if device is None and m.left_at is None:
        m = replace(m, left_at=now, reason="the device was deleted")
    generation = m.generation
    if generation is not None and m.outcome is None and device is not None:
        if seen.generation == generation and seen.final:
            m = replace(m, outcome=seen.state, reason=seen.detail)
        elif device.desired_generation > generation and m.revert_generation is None \
                and m.left_at is None:
            # an operator pinned it meanwhile: not judged, and a rollback leaves it alone
            m = replace(m, left_at=now, reason="given another desired state outside this "
                        "rollout", revert_generation=0, reverted_at=now)
    if m.revert_generation and m.reverted_at is None and device is not None \
            and seen.generation >= m.revert_generation and seen.final:
        m = replace(m, reverted_at=now)
    health = None
    if device is not None and (device.health or {}).get("active_model") == target_ref:
        health = Figures.of(device.health, probes=probes)
    member = Member(m.device_id, m.cls, m.assigned_at, m.outcome, m.reason, health)
    return m, Target(member, online=device is not None and device.online,
                     left=m.left_at is not None, revert_issued=m.revert_generation is not None,
                     reverted=m.reverted_at is not None)


def baseline_figures(health: Mapping[str, Any] | None, target_ref: str, *,
                     probes: bool = False) -> Figures | None:
    """A device's health figures if it serves a model other than the target."""
    active = (health or {}).get("active_model")
    return Figures.of(health, probes=probes) if active and active != target_ref else None
