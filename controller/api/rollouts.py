"""Routes of staged rollouts: create, list, show (with progress and timeline), and the
operator commands pause, resume, abort and rollback. Commands only record intent and
run one tick; the scheduler's tick enacts the rest (``controller.rollouts``)."""

from collections import Counter
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import select

from controller import audit
from controller.api.deps import Db, Operator, Principal, Rt, Viewer
from controller.api.errors import ApiError
from controller.db.models import Rollout, RolloutEvent, RolloutMember
from controller.rollouts import service
from controller.rollouts.machine import ACTIVE, Event, IllegalTransition, State
from controller.rollouts.plan import PlanError, stage_size, stages_from_json
from shared.messages import OUTCOMES, InstallState

router = APIRouter(prefix="/api/v1/rollouts")

Label = Annotated[str, Field(max_length=256)]


class RolloutIn(BaseModel):
    model: Annotated[str, Field(max_length=128)]
    version: Annotated[str, Field(max_length=64)]
    selector: dict[Annotated[str, Field(max_length=64)], Label] = Field(default_factory=dict)
    classes: list[Label] = Field(default_factory=list, max_length=64,
                                 description="device-class patterns, e.g. arm64/*")
    stages: str | list[dict[str, Any]] = Field(
        default="1%:10m,10%:30m,50%:1h,100%",
        description="'1%:10m,10%:30m,100%' or [{percent|count, bake_s, gates}]")
    gates: dict[str, float] = Field(default_factory=dict)
    on_failure: str = "rollback"
    max_concurrent: Annotated[int, Field(ge=1)] | None = None
    probes: dict[str, float] | None = Field(
        default=None, description="idle devices exercise their model while a stage bakes, "
        "and the gates judge the probes: {interval_s, max_cpu_share}; {} for the defaults")


class StageOut(BaseModel):
    label: str
    bake_s: float
    devices: int  # the stage's size (all stages so far together)
    assigned: int
    committed: int
    failed: int


class ClassOut(BaseModel):
    devices: int
    assigned: int
    committed: int
    failed: int
    figures: dict[str, Any] | None  # from the latest gate evaluation


class EventOut(BaseModel):
    at: datetime
    kind: str
    state: str
    stage: int
    actor: str
    reason: str
    figures: dict[str, Any] | None


class RolloutOut(BaseModel):
    id: str
    model: str
    version: str
    state: str
    active: bool  # not yet completed, rolled back or aborted (paused is active)
    stage: int  # 0-based index of the current stage
    reason: str
    selector: dict[str, str]
    classes: list[str]
    on_failure: str
    max_concurrent: int | None
    probes: dict[str, float] | None = None
    created_at: datetime
    created_by: str
    counts: dict[str, int]
    stages: list[StageOut]
    by_class: dict[str, ClassOut] = Field(default_factory=dict)
    timeline: list[EventOut] = Field(default_factory=list)


COMMITTED = InstallState.COMMITTED.value
BAD = frozenset(s.value for s in OUTCOMES if s.bad)


class CommandIn(BaseModel):
    reason: Annotated[str, Field(max_length=1024)] = ""


def describe(rollout: Rollout, members: list[RolloutMember],
             events: list[RolloutEvent] | None = None) -> RolloutOut:
    active = [m for m in members if m.left_at is None]
    counts = Counter(m.outcome if m.assigned_at else "waiting" for m in active)
    counts.update(members=len(active), left=len(members) - len(active),
                  assigned=sum(m.assigned_at is not None for m in active),
                  reverted=sum(m.reverted_at is not None for m in members))
    classes = {m.cls for m in active}
    stages = []
    for i, stage in enumerate(stages_from_json(rollout.stages)):
        got = [m for m in active if m.assigned_stage is not None and m.assigned_stage <= i]
        stages.append(StageOut(
            label=stage.label(), bake_s=stage.bake_s,
            devices=stage_size(stage, total=len(active), classes=len(classes), first=i == 0),
            assigned=len(got), committed=sum(m.outcome == COMMITTED for m in got),
            failed=sum(m.outcome in BAD for m in got)))
    out = RolloutOut(
        id=rollout.id, model=rollout.model_name, version=rollout.version, state=rollout.state,
        active=State(rollout.state) in ACTIVE, stage=rollout.stage, reason=rollout.reason,
        selector=rollout.selector, classes=rollout.classes, on_failure=rollout.on_failure,
        max_concurrent=rollout.max_concurrent, probes=rollout.probes,
        created_at=rollout.created_at,
        created_by=rollout.created_by, counts=dict(counts), stages=stages)
    if events is None:
        return out
    last_gate = next((e.figures for e in reversed(events) if e.figures), None) or {}
    scopes = last_gate.get("scopes", {})
    for cls in sorted(classes):
        group = [m for m in active if m.cls == cls]
        out.by_class[cls] = ClassOut(
            devices=len(group), assigned=sum(m.assigned_at is not None for m in group),
            committed=sum(m.outcome == COMMITTED for m in group),
            failed=sum(m.outcome in BAD for m in group),
            figures=scopes.get(cls))
    out.timeline = [EventOut(at=e.at, kind=e.kind, state=e.state, stage=e.stage, actor=e.actor,
                             reason=e.reason, figures=e.figures) for e in events]
    return out


@router.post("", status_code=201, response_model=RolloutOut)
def create(body: RolloutIn, session: Db, rt: Rt, who: Operator) -> RolloutOut:
    """Plan a staged rollout; the scheduler starts it at its next tick."""
    spec = service.Spec(model=body.model, version=body.version, selector=body.selector,
                        stages=body.stages, classes=tuple(body.classes), gates=body.gates,
                        on_failure=body.on_failure, max_concurrent=body.max_concurrent,
                        probes=body.probes)
    try:
        rollout = service.create(session, spec, now=rt.clock(), actor=who.name)
    except PlanError as exc:
        raise ApiError(422, "invalid_plan", str(exc), field=exc.field) from None
    audit.record(session, actor=who.name, action="rollout.create", target=rollout.id,
                 remote=who.remote, now=rt.clock(), detail=body.model_dump(mode="json"))
    return describe(rollout, service.members(session, rollout.id))


@router.get("", response_model=list[RolloutOut])
def list_rollouts(session: Db, _who: Viewer,
                  state: Annotated[str | None, Query(max_length=16)] = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[RolloutOut]:
    """Rollouts, newest first."""
    query = select(Rollout).order_by(Rollout.created_at.desc()).limit(limit)
    if state:
        query = query.where(Rollout.state == state)
    return [describe(r, service.members(session, r.id)) for r in session.scalars(query)]


@router.get("/{rollout_id}", response_model=RolloutOut)
def show(rollout_id: str, session: Db, _who: Viewer) -> RolloutOut:
    """One rollout: stages with progress, per-class figures and the timeline."""
    rollout = _get(session, rollout_id)
    return describe(rollout, service.members(session, rollout.id),
                    service.timeline(session, rollout.id))


def _command(event: Event, rollout_id: str, body: CommandIn | None, session: Db, rt: Rt,
             who: Principal) -> RolloutOut:
    _get(session, rollout_id)
    reason = body.reason if body else ""
    try:
        rollout, assignments = service.command(
            session, rollout_id, event, now=rt.clock(), actor=who.name, signer=rt.signer,
            reason=f"{event.value} by {who.name}" + (f": {reason}" if reason else ""))
    except IllegalTransition as exc:
        raise ApiError(409, "illegal_transition", str(exc)) from None
    audit.record(session, actor=who.name, action=f"rollout.{event.value}", target=rollout_id,
                 remote=who.remote, now=rt.clock(), detail={"reason": reason})
    out = describe(rollout, service.members(session, rollout.id))
    session.commit()
    for assignment in assignments:
        rt.publish_desired(assignment)
    return out


@router.post("/{rollout_id}/pause", response_model=RolloutOut)
def pause(rollout_id: str, session: Db, rt: Rt, who: Operator,
          body: CommandIn | None = None) -> RolloutOut:
    """Stop giving devices the target; installs under way finish."""
    return _command(Event.PAUSE, rollout_id, body, session, rt, who)


@router.post("/{rollout_id}/resume", response_model=RolloutOut)
def resume(rollout_id: str, session: Db, rt: Rt, who: Operator,
           body: CommandIn | None = None) -> RolloutOut:
    """Carry on where the rollout was paused."""
    return _command(Event.RESUME, rollout_id, body, session, rt, who)


@router.post("/{rollout_id}/abort", response_model=RolloutOut)
def abort(rollout_id: str, session: Db, rt: Rt, who: Operator,
          body: CommandIn | None = None) -> RolloutOut:
    """Stop for good; devices keep what they have installed."""
    return _command(Event.ABORT, rollout_id, body, session, rt, who)


@router.post("/{rollout_id}/rollback", response_model=RolloutOut)
def rollback(rollout_id: str, session: Db, rt: Rt, who: Operator,
             body: CommandIn | None = None) -> RolloutOut:
    """Give every device the rollout touched its previous model back."""
    return _command(Event.ROLLBACK, rollout_id, body, session, rt, who)


def _get(session: Db, rollout_id: str) -> Rollout:
    try:
        return service.get(session, rollout_id)
    except service.RolloutNotFound:
        raise ApiError(404, "rollout_not_found", f"no rollout {rollout_id}") from None
