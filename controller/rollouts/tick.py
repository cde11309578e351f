"""What one scheduler tick does to one rollout: a pure function of plan, devices and now.

``decide`` takes the rollout as it is stored (``Plan``), the devices of its target set
as the database shows them (``Target``), the baseline figures and ``now``, and returns
a ``Decision``: the transitions to record (each with its reason and, for gates, the
evaluation behind it), the devices to give the target and the devices to give their
previous model back. It advances through as many states as the facts allow in one
call (a stage with no bake time is deployed, baked and evaluated in one tick) but
never past a state that waits for devices. ``act`` is an operator's command.

Rules it keeps (tested as invariants): a paused or terminal rollout assigns nothing
(except that a completed one gives the target to devices that were offline or joined
late); in-flight installs never exceed ``max_concurrent``; a device is never assigned
the target twice; only online devices are assigned, so a stage never waits on a
device that is away.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from controller.rollouts.gates import (
    FAILED,
    INCONCLUSIVE,
    Aggregate,
    Evaluation,
    Member,
    evaluate,
)
from controller.rollouts.machine import Event, State, next_state
from controller.rollouts.plan import Gates, Probes, Stage, canary_order, stage_gates, stage_size


@dataclass(frozen=True)
class Plan:
    """A rollout as the tick sees it."""

    id: str
    state: State
    stage: int
    entered_at: datetime
    stages: tuple[Stage, ...]
    gates: Gates
    on_failure: str = "rollback"
    max_concurrent: int | None = None
    paused_from: State | None = None
    inconclusive_since: datetime | None = None
    probes: Probes | None = None  # judged on probes' figures instead of traffic


@dataclass(frozen=True)
class Target:
    """One device of the target set."""

    member: Member
    online: bool
    left: bool = False  # no longer matches the plan: not assigned, not judged
    revert_issued: bool = False
    reverted: bool = False  # reported an outcome for its revert


@dataclass(frozen=True)
class Step:
    event: Event
    state: State  # after the step
    stage: int
    reason: str
    evaluation: Evaluation | None = None


@dataclass
class Decision:
    plan: Plan
    steps: list[Step] = field(default_factory=list)
    assign: list[str] = field(default_factory=list)
    revert: list[str] = field(default_factory=list)
    notes: list[Evaluation] = field(default_factory=list)  # recorded, no transition
    #: what the rollout waits for where it stopped this tick ("" if it moved or ended):
    #: the status an operator reads
    waiting: str = ""

    def move(self, event: Event, reason: str, *, now: datetime,
             evaluation: Evaluation | None = None) -> None:
        p = self.plan
        state = next_state(p.state, event, paused_from=p.paused_from)
        stage = p.stage + 1 if event == Event.PROMOTE else p.stage
        paused_from = p.state if event == Event.PAUSE else None
        self.plan = replace(p, state=state, stage=stage, entered_at=now,
                            paused_from=paused_from, inconclusive_since=None)
        self.steps.append(Step(event, state, stage, reason, evaluation))


def act(plan: Plan, event: Event, reason: str, *, now: datetime) -> Decision:
    """An operator's pause, resume, abort or rollback; raises ``IllegalTransition``."""
    decision = Decision(plan)
    decision.move(event, reason, now=now)
    return decision


def decide(plan: Plan, targets: Sequence[Target], base: Mapping[str, Aggregate], *,
           now: datetime) -> Decision:
    decision = Decision(plan)
    for _ in range(4 * len(plan.stages) + 4):  # each stage moves at most four times
        if not _advance(decision, targets, base, now):
            break
    return decision


def _advance(d: Decision, targets: Sequence[Target], base: Mapping[str, Aggregate],
             now: datetime) -> bool:
    """Take at most one step; True if the tick may go on to the next."""
    p = d.plan
    if p.state == State.PENDING:
        d.move(Event.START, "started", now=now)
        return True
    if p.state == State.ROLLING_BACK:
        return _rolling_back(d, targets, now)
    if p.state == State.COMPLETED:  # late joiners and devices that were away
        active = [t for t in targets if not t.left]
        d.assign = _next_devices(p, targets, active, size=len(active), gates=p.gates, now=now)
        return False
    if p.state in (State.PAUSED, State.ROLLED_BACK, State.ABORTED):
        return False
    return _running(d, targets, base, now)


def _rolling_back(d: Decision, targets: Sequence[Target], now: datetime) -> bool:
    touched = [t for t in targets if t.member.assigned_at is not None]
    d.revert = [t.member.device_id for t in touched if not t.revert_issued]
    if not any(t.online and not t.reverted for t in touched):
        d.move(Event.REVERTED, f"{len(touched)} devices are back on what they ran before"
               if touched else "no device had been given the target", now=now)
    return False


def _running(d: Decision, targets: Sequence[Target], base: Mapping[str, Aggregate],
             now: datetime) -> bool:
    """A stage: failing gates end it in any phase; otherwise deploy, bake, evaluate."""
    p = d.plan
    active = [t for t in targets if not t.left]
    stage = p.stages[p.stage]
    gates = stage_gates(p.gates, stage)
    ev = evaluate([t.member for t in active], base, gates, now=now,
                  health=p.state == State.EVALUATING, probes=p.probes is not None)
    if ev.verdict == FAILED:
        event = Event.ROLLBACK if p.on_failure == "rollback" else Event.PAUSE
        d.move(event, "; ".join(ev.reasons), now=now, evaluation=ev)
        return True
    label = f"stage {p.stage + 1} of {len(p.stages)} ({stage.label()})"
    if p.state == State.DEPLOYING:
        classes = len({t.member.cls for t in active})
        size = stage_size(stage, total=len(active), classes=classes, first=p.stage == 0)
        d.assign = _next_devices(p, targets, active, size=size, gates=gates, now=now)
        if flying := _in_flight(targets, gates, now) + len(d.assign):
            d.waiting = f"{label}: waiting for {flying} install(s) to report an outcome"
            return False
        assigned = sum(t.member.assigned_at is not None for t in active)
        d.move(Event.DEPLOYED, f"{label}: {assigned} of {len(active)} devices have the target",
               now=now)
        return True
    if p.state == State.BAKING:
        if (now - p.entered_at).total_seconds() < stage.bake_s:
            until = p.entered_at + timedelta(seconds=stage.bake_s)
            d.waiting = f"{label}: baking for {stage.bake_s:g}s, until {until:%H:%M:%S}"
            return False
        d.move(Event.BAKED, f"{label} baked for {stage.bake_s:g}s", now=now)
        return True
    return _evaluated(d, ev, gates, label, now)


def _evaluated(d: Decision, ev: Evaluation, gates: Gates, label: str, now: datetime) -> bool:
    """After baking: promote on success; wait on too few reports, then pause."""
    p = d.plan
    if ev.verdict == INCONCLUSIVE:
        since = p.inconclusive_since or now
        if p.inconclusive_since is None:
            d.plan = replace(p, inconclusive_since=now)
            d.notes.append(ev)
        d.waiting = f"{label}: " + "; ".join(ev.reasons)
        if (now - since).total_seconds() >= gates.inconclusive_timeout_s:
            d.move(Event.PAUSE, f"inconclusive for {gates.inconclusive_timeout_s:g}s: "
                   + "; ".join(ev.reasons), now=now, evaluation=ev)
        return False
    last = p.stage == len(p.stages) - 1
    d.move(Event.FINISH if last else Event.PROMOTE, f"{label} passed its gates", now=now,
           evaluation=ev)
    return True


def _missing(member: Member, gates: Gates, now: datetime) -> bool:
    return (member.outcome is None and member.assigned_at is not None
            and (now - member.assigned_at).total_seconds() > gates.report_timeout_s)


def _in_flight(targets: Sequence[Target], gates: Gates, now: datetime) -> int:
    """Installs under way: assigned, no outcome yet, not given up on as missing."""
    return sum(t.member.assigned_at is not None and t.member.outcome is None
               and not _missing(t.member, gates, now) for t in targets)


def _next_devices(p: Plan, targets: Sequence[Target], active: Sequence[Target], *, size: int,
                  gates: Gates, now: datetime) -> list[str]:
    """Online devices to give the target now, in canary order, within the limits."""
    room = size - sum(t.member.assigned_at is not None for t in active)
    if p.max_concurrent is not None:
        room = min(room, p.max_concurrent - _in_flight(targets, gates, now))
    if room <= 0:
        return []
    waiting = {t.member.device_id for t in active if t.member.assigned_at is None and t.online}
    order = canary_order(p.id, ((t.member.device_id, t.member.cls) for t in active))
    return [d for d in order if d in waiting][:room]
