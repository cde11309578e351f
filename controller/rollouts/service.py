"""Rollouts in the database: create a plan, enact ticks, record operator commands.

Functions over a session; they never commit (the request or the scheduler tick owns
the transaction) and never touch MQTT: they return the desired-state assignments to
publish once the transaction has committed. Each tick reads what devices reported,
asks ``tick.decide`` what follows, and stores the result with its timeline entries,
so a controller killed between ticks carries on from the database.
"""

import fnmatch
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session, aliased

from controller import delivery
from controller.db.models import Device, ModelVersion, Rollout, RolloutEvent, RolloutMember
from controller.registry import service as registry
from controller.rollouts import gates as g
from controller.rollouts import observe
from controller.rollouts.machine import ACTIVE, Event, State
from controller.rollouts.plan import (
    POLICIES,
    Gates,
    PlanError,
    Probes,
    Stage,
    check_stages,
    device_class,
    gates_to_json,
    parse_stages,
    stage_gates,
    stages_from_json,
    stages_to_json,
)
from controller.rollouts.tick import Decision, Plan, Target, act, decide
from shared.envelope import Signer
from shared.messages import DesiredState, InstallState, Probe

PENDING = "pending"  # a member's outcome before its device reports one
#: the states in which a plan's probes run (each device's probe expires by itself)
PROBING = frozenset({State.DEPLOYING, State.BAKING, State.EVALUATING})


class RolloutNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Spec:
    """A plan as an operator writes it (API body, CLI flags)."""

    model: str
    version: str
    selector: Mapping[str, str]
    stages: str | list[dict[str, Any]]
    classes: tuple[str, ...] = ()  # device-class patterns (fnmatch); empty: every class
    gates: Mapping[str, float] | None = None
    on_failure: str = "rollback"
    max_concurrent: int | None = None
    probes: Mapping[str, float] | None = None  # ``Probes`` fields; {} for the defaults


def create(session: Session, spec: Spec, *, now: datetime, actor: str) -> Rollout:
    """Check ``spec`` and store the rollout (pending: the next tick starts it)."""
    version = registry.find_version(session, name=spec.model, version=spec.version)
    if version is None:
        raise PlanError("version", f"no version {spec.model}@{spec.version} in the registry")
    try:
        variants = delivery.ready_variants(session, version)
    except delivery.DeliveryError as exc:
        raise PlanError("version", exc.detail) from None
    gates = Gates.of(spec.gates or {})
    stages = parse_stages(spec.stages) if isinstance(spec.stages, str) else [
        _stage(raw, i) for i, raw in enumerate(spec.stages)]
    check_stages(stages, gates)
    probes = Probes.of(spec.probes) if spec.probes is not None else None
    if spec.on_failure not in POLICIES:
        raise PlanError("on_failure", f"{spec.on_failure!r} is not one of {', '.join(POLICIES)}")
    if spec.max_concurrent is not None and spec.max_concurrent < 1:
        raise PlanError("max_concurrent", "must be at least 1")
    rollout = Rollout(
        id=str(uuid.uuid4()), model_name=version.model_name, version=version.version,
        version_id=version.id, selector=dict(spec.selector), classes=list(spec.classes),
        stages=stages_to_json(stages), gates=gates_to_json(gates), on_failure=spec.on_failure,
        max_concurrent=spec.max_concurrent, probes=asdict(probes) if probes else None,
        state=State.PENDING.value, stage=0, entered_at=now,
        baseline={}, created_at=now, created_by=actor, reason="")
    matched, unfit = _matching(session, rollout, variants)
    if not matched:
        why = f"; {len(unfit)} matching devices fit no variant: {unfit[0]}" if unfit else ""
        raise PlanError("selector", f"no enrolled device matches {_describe(rollout)}{why}")
    busy = _busy(session, version.model_name, [d.id for d, _ in matched])
    if busy:
        device_id, other, state = busy[0]
        raise PlanError("selector", f"{len(busy)} of the matched devices are already in "
                        f"rollout {other} of {version.model_name} ({state}), e.g. {device_id}; "
                        "finish, abort or roll that back first")
    session.add(rollout)
    session.flush()
    target = f"{version.model_name}@{version.version}"
    base = []
    for device, variant in matched:
        member = _join(session, rollout, device, variant, now)
        if (figures := _baseline_figures(device, target, probes is not None)) is not None:
            base.append((member.cls, figures))
    rollout.baseline = {cls: asdict(agg) for cls, agg in
                        g.baseline(base, gates).items() if agg.devices}
    note = f"; {len(unfit)} matching devices fit no variant and are left out" if unfit else ""
    _record(session, rollout, now=now, kind="action", actor=actor,
            reason=f"created: {target} to {len(matched)} devices ({_describe(rollout)}), "
            f"stages {', '.join(s.label() for s in stages)}{note}")
    return rollout


def tick(session: Session, *, now: datetime, signer: Signer) -> list[delivery.Assignment]:
    """Advance every active rollout, and each model's latest completed rollout while no
    other of that model is active (it keeps bringing devices that return or join to the
    target); the assignments to publish."""
    active = [s.value for s in ACTIVE]
    newest = select(Rollout.model_name, func.max(Rollout.created_at).label("at")) \
        .where(Rollout.state == State.COMPLETED.value).group_by(Rollout.model_name).subquery()
    other = aliased(Rollout)
    current = exists().where(newest.c.model_name == Rollout.model_name,
                             newest.c.at == Rollout.created_at) & ~exists().where(
        other.model_name == Rollout.model_name, other.state.in_(active))
    rows = list(session.scalars(select(Rollout).where(
        Rollout.state.in_(active) | ((Rollout.state == State.COMPLETED.value) & current))
        .order_by(Rollout.created_at).with_for_update()))
    out: list[delivery.Assignment] = []
    for rollout in rows:
        out += _tick_one(session, rollout, now=now, signer=signer)
    return out


def command(session: Session, rollout_id: str, event: Event, *, now: datetime, actor: str,
            signer: Signer, reason: str = "") -> tuple[Rollout, list[delivery.Assignment]]:
    """An operator's pause/resume/abort/rollback, then a tick so it takes effect at once.
    Raises ``RolloutNotFound`` or ``IllegalTransition``."""
    rollout = session.get(Rollout, rollout_id, with_for_update=True)
    if rollout is None:
        raise RolloutNotFound(rollout_id)
    decision = act(_plan(rollout), event, reason or f"{event.value} by {actor}", now=now)
    _store(session, rollout, decision, now=now, actor=actor)
    return rollout, _tick_one(session, rollout, now=now, signer=signer)


def get(session: Session, rollout_id: str) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise RolloutNotFound(rollout_id)
    return rollout


def members(session: Session, rollout_id: str) -> list[RolloutMember]:
    return list(session.scalars(select(RolloutMember)
                                .where(RolloutMember.rollout_id == rollout_id)))


def timeline(session: Session, rollout_id: str) -> list[RolloutEvent]:
    return list(session.scalars(select(RolloutEvent).where(RolloutEvent.rollout_id == rollout_id)
                                .order_by(RolloutEvent.id)))


# -- one tick of one rollout ---------------------------------------------------------------

def _tick_one(session: Session, rollout: Rollout, *, now: datetime,
              signer: Signer) -> list[delivery.Assignment]:
    version = session.get(ModelVersion, rollout.version_id)
    assert version is not None  # noqa: S101 - the foreign key restricts deletion
    rows = {m.device_id: m for m in members(session, rollout.id)}
    devices = {d.id: d for d in session.scalars(select(Device))}
    variants = registry.variants_of(session, version)
    if rollout.state != State.PAUSED.value and State(rollout.state) in ACTIVE | {State.COMPLETED}:
        _refresh_members(session, rollout, rows, devices, variants, now=now)
    target_ref = f"{rollout.model_name}@{rollout.version}"
    plan = _plan(rollout)
    probing = plan.probes is not None
    targets = [_target(m, devices.get(m.device_id), target_ref, now=now, probes=probing)
               for m in rows.values()]
    decision = decide(plan, targets, _baseline(rollout, targets, devices, target_ref, probing),
                      now=now)
    _store(session, rollout, decision, now=now, actor="scheduler")
    probe = _probe(rollout, decision.plan, now)
    out = []
    for device_id in decision.assign:
        device, member = devices[device_id], rows[device_id]
        desired = delivery.desired_state(device)
        member.previous = ({"model": desired.model, "version": desired.version}
                           if desired and desired.model else None)
        try:
            out.append(delivery.assign(session, device, version, now=now, signer=signer,
                                       variants=variants, probe=probe))
        except delivery.DeliveryError as exc:  # its capabilities changed since it joined
            member.left_at, member.reason = now, exc.detail
            continue
        member.assigned_stage, member.assigned_at = rollout.stage, now
        member.generation = device.desired_generation
    for device_id in decision.revert:
        gone, member = devices.get(device_id), rows[device_id]
        if gone is None:  # deleted meanwhile: nothing to give back
            member.revert_generation, member.reverted_at = 0, now
            continue
        out.append(delivery.assign(session, gone, _previous(session, member), now=now,
                                   signer=signer, rollback=True))
        member.revert_generation = gone.desired_generation
    if probe is not None:
        out += _probe_baseline(session, rollout, targets, devices, probe, now=now, signer=signer)
    return out


def _probe(rollout: Rollout, plan: Plan, now: datetime) -> Probe | None:
    """The probe a canary gets with the target, and the baseline with its own model: it
    lasts the longest a stage can wait (its bake, then the inconclusive timeout)."""
    if plan.probes is None or plan.state not in PROBING:
        return None
    stage = plan.stages[plan.stage]
    window = stage.bake_s + stage_gates(plan.gates, stage).inconclusive_timeout_s
    return Probe(rollout=rollout.id, interval_s=plan.probes.interval_s,
                 max_cpu_share=plan.probes.max_cpu_share, until=now + timedelta(seconds=window))


def _probe_baseline(session: Session, rollout: Rollout, targets: list[Target],
                    devices: dict[str, Device], probe: Probe, *, now: datetime,
                    signer: Signer) -> list[delivery.Assignment]:
    """Probes for the baseline: the online members not given the target keep their
    desired state (the model they run: the agent installs nothing) with this rollout's
    probe, renewed once half of it is spent."""
    out = []
    renew_before = now + (probe.until - now) / 2
    for t in targets:
        device = devices.get(t.member.device_id)
        if t.member.assigned_at is not None or t.left or not t.online or device is None:
            continue
        desired = delivery.desired_state(device)
        if desired is None or desired.model is None:
            continue  # it runs no model: nothing to probe
        seen = observe.latest_outcome(device.reported, device.last_health)
        if (seen.generation, seen.state) != (desired.generation, InstallState.COMMITTED):
            continue  # still installing what it was given: probes would supersede it
        held = desired.probe
        if held is not None and held.rollout == rollout.id and held.until > renew_before:
            continue
        out.append(delivery.reissue(session, device, _probed(desired, probe), now=now,
                                    signer=signer))
    return out


def _probed(desired: DesiredState, probe: Probe) -> dict[str, Any]:
    return desired.model_dump() | {"probe": probe, "rollback": False}


def _target(m: RolloutMember, device: Device | None, target_ref: str, *,
            now: datetime, probes: bool) -> Target:
    """The member as the tick sees it, after reading what its device reported (the row
    takes what ``observe`` found)."""
    seen, target = observe.observe(_tracked(m), _view(device), target_ref, now=now,
                                   probes=probes)
    m.outcome = seen.outcome.value if seen.outcome else PENDING
    m.reason, m.left_at = seen.reason, seen.left_at
    m.revert_generation, m.reverted_at = seen.revert_generation, seen.reverted_at
    return target


def _tracked(m: RolloutMember) -> observe.Tracked:
    return observe.Tracked(m.device_id, m.cls, m.assigned_at, m.generation,
                           None if m.outcome == PENDING else InstallState(m.outcome), m.reason,
                           m.left_at, m.revert_generation, m.reverted_at)


def _view(device: Device | None) -> observe.Device | None:
    if device is None:
        return None
    return observe.Device(device.id, device.status == "online", device.desired_generation,
                          device.reported, device.last_health)


def _baseline(rollout: Rollout, targets: list[Target], devices: dict[str, Device],
              target_ref: str, probes: bool) -> dict[str, g.Aggregate]:
    """Per class: the devices not given the target, live; else the figures at creation."""
    live = []
    for t in targets:
        if t.member.assigned_at is None and not t.left and (figures := _baseline_figures(
                devices.get(t.member.device_id), target_ref, probes)):
            live.append((t.member.cls, figures))
    gates = Gates.of(rollout.gates)
    out = {cls: g.Aggregate(**agg) for cls, agg in rollout.baseline.items()}
    out.update({cls: agg for cls, agg in g.baseline(live, gates).items()
                if agg.devices >= gates.min_devices})
    return out


def _baseline_figures(device: Device | None, target_ref: str,
                      probes: bool) -> g.Figures | None:
    return observe.baseline_figures(device.last_health if device else None, target_ref,
                                    probes=probes)


def _busy(session: Session, model: str, device_ids: list[str], *,
          besides: str | None = None) -> list[Any]:
    """(device id, rollout id, state) of those devices in an active rollout of ``model``
    (other than ``besides``): a device is in one active rollout of a model at a time."""
    query = (select(RolloutMember.device_id, Rollout.id, Rollout.state)
             .join(Rollout, Rollout.id == RolloutMember.rollout_id)
             .where(Rollout.model_name == model, Rollout.state.in_([s.value for s in ACTIVE]),
                    RolloutMember.left_at.is_(None), RolloutMember.device_id.in_(device_ids)))
    if besides is not None:
        query = query.where(Rollout.id != besides)
    return list(session.execute(query).all())


def _refresh_members(session: Session, rollout: Rollout, rows: dict[str, RolloutMember],
                     devices: dict[str, Device], variants: list[Any], *,
                     now: datetime) -> None:
    """Devices that joined the target set join the rollout; those that left are let go."""
    matched = {d.id: v for d, v in _matching(session, rollout, variants,
                                             devices=list(devices.values()))[0]}
    for device_id, member in rows.items():
        if member.left_at is None and device_id not in matched:
            member.left_at, member.reason = now, "no longer matches the plan"
    if not (new := [d for d in matched if d not in rows]):
        return
    busy = {row[0] for row in _busy(session, rollout.model_name, new, besides=rollout.id)}
    for device_id in new:
        if device_id not in busy:
            rows[device_id] = _join(session, rollout, devices[device_id], matched[device_id], now)


def _matching(session: Session, rollout: Rollout, variants: list[Any], *,
              devices: list[Device] | None = None) -> tuple[list[tuple[Device, str]], list[str]]:
    """Devices the plan targets with the variant each would get; and why others cannot."""
    if devices is None:
        devices = list(session.scalars(select(Device)))
    matched, unfit = [], []
    for device in devices:
        if any(device.labels.get(k) != v for k, v in rollout.selector.items()):
            continue
        chosen = delivery.choose(device, variants)
        if isinstance(chosen, str):
            unfit.append(f"{device.id}: {chosen}")
            continue
        cls = device_class(device.capabilities, chosen.name)
        if rollout.classes and not any(fnmatch.fnmatchcase(cls, p) for p in rollout.classes):
            continue
        matched.append((device, chosen.name))
    return matched, unfit


def _join(session: Session, rollout: Rollout, device: Device, variant: str,
          now: datetime) -> RolloutMember:
    member = RolloutMember(rollout_id=rollout.id, device_id=device.id, variant=variant,
                           cls=device_class(device.capabilities, variant), joined_at=now,
                           outcome=PENDING, reason="")
    session.add(member)
    return member


def _previous(session: Session, member: RolloutMember) -> ModelVersion | None:
    prev = member.previous
    if not prev:
        return None
    return registry.find_version(session, name=prev["model"], version=prev["version"])


def _plan(rollout: Rollout) -> Plan:
    return Plan(rollout.id, State(rollout.state), rollout.stage, rollout.entered_at,
                tuple(stages_from_json(rollout.stages)), Gates.of(rollout.gates),
                rollout.on_failure, rollout.max_concurrent,
                State(rollout.paused_from) if rollout.paused_from else None,
                rollout.inconclusive_since, Probes(**rollout.probes) if rollout.probes else None)


def _store(session: Session, rollout: Rollout, decision: Decision, *, now: datetime,
           actor: str) -> None:
    p = decision.plan
    rollout.state, rollout.stage, rollout.entered_at = p.state.value, p.stage, p.entered_at
    rollout.paused_from = p.paused_from.value if p.paused_from else None
    rollout.inconclusive_since = p.inconclusive_since
    for ev in decision.notes:
        _record(session, rollout, now=now, kind="gate", actor=actor,
                reason=f"{ev.verdict}: " + "; ".join(ev.reasons),
                figures={"verdict": ev.verdict, "scopes": ev.figures})
    for step in decision.steps:
        rollout.reason = step.reason
        judged = step.evaluation
        _record(session, rollout, now=now, kind="gate" if judged else
                "action" if actor != "scheduler" else "transition", actor=actor,
                reason=f"{step.event.value}: {step.reason}", state=step.state, stage=step.stage,
                figures={"verdict": judged.verdict, "scopes": judged.figures} if judged
                else None)
    if decision.waiting:
        rollout.reason = decision.waiting


def _record(session: Session, rollout: Rollout, *, now: datetime, kind: str, actor: str,
            reason: str, state: State | None = None, stage: int | None = None,
            figures: dict[str, Any] | None = None) -> None:
    session.add(RolloutEvent(rollout_id=rollout.id, at=now, kind=kind,
                             state=(state or State(rollout.state)).value,
                             stage=rollout.stage if stage is None else stage, actor=actor,
                             reason=reason, figures=figures))


def _stage(raw: Mapping[str, Any], index: int) -> Stage:
    try:
        return Stage(percent=raw.get("percent"), count=raw.get("count"),
                     bake_s=float(raw.get("bake_s", 0)), gates=dict(raw.get("gates") or {}))
    except (TypeError, ValueError) as exc:
        raise PlanError(f"stages[{index}]", str(exc)) from None


def _describe(rollout: Rollout) -> str:
    parts = [f"{k}={v}" for k, v in sorted(rollout.selector.items())]
    parts += [f"class {c}" for c in rollout.classes]
    return ", ".join(parts) or "the whole fleet"
