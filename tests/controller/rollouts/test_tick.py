"""The tick as a pure function: scenarios, and invariants under random operation."""

import contextlib
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from controller.rollouts.gates import Aggregate, Figures, Member, baseline
from controller.rollouts.machine import TERMINAL, Event, IllegalTransition, State
from controller.rollouts.plan import Gates, parse_stages
from controller.rollouts.tick import Decision, Plan, Target, act, decide
from shared.messages import InstallState

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
HEALTHY = Figures(requests=100, errors=0, latency_p95_ms=10.0, mem_used_bytes=1 << 30)


def as_outcome(outcome: str) -> InstallState | None:
    """The fakes keep outcomes as words; the gates take "pending" as None."""
    return None if outcome == "pending" else InstallState(outcome)


@dataclass
class Dev:
    id: str
    cls: str
    online: bool = True
    left: bool = False
    assigned_at: datetime | None = None
    outcome: str = "pending"
    reason: str = ""
    reverts: int = 0
    reverted: bool = False
    health: Figures = HEALTHY


class Fleet:
    """Devices and a plan, stepped through ``decide`` the way the service does."""

    def __init__(self, n: int, *, stages: str = "10%,50%,100%", classes: int = 2,
                 max_concurrent: int | None = None, gates: Gates | None = None,
                 on_failure: str = "rollback") -> None:
        self.devices = {f"d{i:03d}": Dev(f"d{i:03d}", f"c{i % classes}") for i in range(n)}
        self.plan = Plan("r1", State.PENDING, 0, T0, tuple(parse_stages(stages)),
                         gates or Gates(min_requests=0), on_failure, max_concurrent)
        self.now = T0
        self.base: dict[str, Aggregate] = {}
        self.assigned_twice: list[str] = []
        self.log: list[Decision] = []

    def targets(self) -> list[Target]:
        return [Target(Member(d.id, d.cls, d.assigned_at, as_outcome(d.outcome), d.reason,
                              d.health if d.outcome == "committed" else None),
                       online=d.online, left=d.left, revert_issued=d.reverts > 0,
                       reverted=d.reverted) for d in self.devices.values()]

    def tick(self, seconds: float = 1.0) -> Decision:
        self.now += timedelta(seconds=seconds)
        d = decide(self.plan, self.targets(), self.base, now=self.now)
        self.apply(d)
        return d

    def apply(self, d: Decision) -> None:
        self.plan = d.plan
        self.log.append(d)
        for i in d.assign:
            dev = self.devices[i]
            if dev.assigned_at is not None:
                self.assigned_twice.append(i)
            dev.assigned_at = self.now
        for i in d.revert:
            self.devices[i].reverts += 1

    def command(self, event: Event) -> Decision:
        d = act(self.plan, event, "test", now=self.now)
        self.apply(d)
        return d

    def finish_installs(self, outcome: str = "committed", reason: str = "") -> None:
        for d in self.devices.values():
            if d.assigned_at is not None and d.outcome == "pending" and d.online:
                d.outcome, d.reason = outcome, reason
            if d.reverts and d.online:
                d.reverted = True

    def run(self, ticks: int = 20) -> None:
        for _ in range(ticks):
            self.tick()
            self.finish_installs()


def test_a_healthy_rollout_goes_through_every_stage_and_completes() -> None:
    fleet = Fleet(20)
    fleet.run()
    assert fleet.plan.state == State.COMPLETED
    events = [s.event for d in fleet.log for s in d.steps]
    assert events == [Event.START, *[Event.DEPLOYED, Event.BAKED, Event.PROMOTE] * 2,
                      Event.DEPLOYED, Event.BAKED, Event.FINISH]
    assert all(d.outcome == "committed" for d in fleet.devices.values())
    first = fleet.log[0].assign
    assert {fleet.devices[i].cls for i in first} == {"c0", "c1"}  # both classes canaried
    assert len(first) == 2  # 10% of 20


def test_bake_time_holds_a_stage_until_it_has_passed() -> None:
    fleet = Fleet(10, stages="50%:60s,100%")
    fleet.run(5)
    assert (fleet.plan.state, fleet.plan.stage) == (State.BAKING, 0)
    fleet.tick(60)
    assert (fleet.plan.state, fleet.plan.stage) == (State.DEPLOYING, 1)


def test_a_failed_gate_rolls_back_every_touched_device() -> None:
    fleet = Fleet(20)
    fleet.tick()
    canaries = [d for d in fleet.devices.values() if d.assigned_at]
    fleet.finish_installs("rolled_back", "smoke_test_failed: differs")
    d = fleet.tick()
    assert fleet.plan.state == State.ROLLING_BACK
    assert d.steps[-1].evaluation is not None
    assert "smoke test failed" in d.steps[-1].reason
    assert sorted(d.revert) == sorted(c.id for c in canaries)
    fleet.finish_installs()
    fleet.tick()
    assert fleet.plan.state == State.ROLLED_BACK


@pytest.mark.parametrize(("outcome", "reason", "health", "late", "says"), [
    ("failed", "download_refused: x", HEALTHY, 0, "install failures"),
    ("rolled_back", "smoke_test_failed: y", HEALTHY, 0, "smoke test failed"),
    ("pending", "", HEALTHY, 700, "no report from"),
    ("committed", "", Figures(400, 200, 10.0, 1 << 30), 0, "error rate"),
    ("committed", "", Figures(400, 0, 30.0, 1 << 30), 0, "latency p95"),
    ("committed", "", Figures(400, 0, 10.0, 2 << 30), 0, "memory"),
])
def test_each_gate_rolls_back_a_failing_canary_stage(
        outcome: str, reason: str, health: Figures, late: float, says: str) -> None:
    fleet = Fleet(20, stages="10%:60s,100%", gates=Gates(min_requests=20))
    fleet.base = baseline([(f"c{i % 2}", HEALTHY) for i in range(10)], fleet.plan.gates)
    fleet.tick()
    for d in fleet.devices.values():
        if d.assigned_at:
            d.outcome, d.reason, d.health = outcome, reason, health
    fleet.tick()  # deployed: baking
    fleet.tick(61 + late)  # past the bake time (and the report timeout for "missing")
    assert fleet.plan.state in (State.ROLLING_BACK, State.ROLLED_BACK)
    failed = next(s for d in fleet.log for s in d.steps if s.event == Event.ROLLBACK)
    assert failed.evaluation is not None
    assert says in failed.reason


def test_pause_policy_pauses_instead() -> None:
    fleet = Fleet(20, on_failure="pause")
    fleet.tick()
    fleet.finish_installs("failed", "download_refused: x")
    d = fleet.tick()
    assert fleet.plan.state == State.PAUSED
    assert not d.revert


def test_inconclusive_waits_then_pauses_for_a_human() -> None:
    fleet = Fleet(10, gates=Gates(min_requests=1000, inconclusive_timeout_s=300))
    fleet.run(3)
    assert fleet.plan.state == State.EVALUATING
    assert fleet.plan.inconclusive_since is not None
    notes = [n for d in fleet.log for n in d.notes]
    assert [n.verdict for n in notes] == ["inconclusive"]  # recorded once
    fleet.tick(301)
    assert fleet.plan.state == State.PAUSED
    assert fleet.log[-1].steps[-1].reason.startswith("inconclusive for 300s")


def test_offline_devices_are_not_waited_for_and_get_the_target_when_back() -> None:
    fleet = Fleet(10)
    away = fleet.devices["d003"]
    away.online = False
    fleet.run()
    assert fleet.plan.state == State.COMPLETED
    assert away.assigned_at is None
    away.online = True
    d = fleet.tick()
    assert d.assign == ["d003"]


def test_devices_that_left_are_not_assigned_or_judged() -> None:
    fleet = Fleet(10)
    fleet.tick()
    for d in fleet.devices.values():
        if d.assigned_at:  # the canaries fail, then leave the target set
            d.outcome, d.left = "failed", True
    fleet.run()
    assert fleet.plan.state == State.COMPLETED


def test_rollback_from_paused_and_resume_continues() -> None:
    fleet = Fleet(10, stages="50%:60s,100%")
    fleet.run(3)
    fleet.command(Event.PAUSE)
    assert fleet.plan.paused_from == State.BAKING
    assert not fleet.tick(120).assign
    fleet.command(Event.RESUME)
    fleet.run(3)
    assert fleet.plan.state == State.BAKING  # bakes again from the start after a pause
    fleet.command(Event.ROLLBACK)
    d = fleet.tick()
    assert len(d.revert) == 5


# -- invariants under random operation -------------------------------------------------

class RolloutUnderLoad(RuleBasedStateMachine):
    @initialize(n=st.integers(1, 30), classes=st.integers(1, 4),
                stages=st.sampled_from(["100%", "10%,100%", "1%:30s,20%,50%:10s,100%", "2,5,100%"]),
                limit=st.one_of(st.none(), st.integers(1, 5)),
                policy=st.sampled_from(["rollback", "pause"]))
    def setup(self, n: int, classes: int, stages: str, limit: int | None, policy: str) -> None:
        self.fleet = Fleet(n, stages=stages, classes=classes, max_concurrent=limit,
                           gates=Gates(min_requests=0, report_timeout_s=100),
                           on_failure=policy)
        self.terminal_at: State | None = None

    @rule(seconds=st.sampled_from([0.5, 5, 40, 200]))
    def tick(self, seconds: float) -> None:
        before = self.fleet.plan
        d = self.fleet.tick(seconds)
        if before.state == State.PAUSED or before.state in (State.ROLLED_BACK, State.ABORTED):
            assert not d.assign, "a paused or ended rollout assigned devices"
            assert not d.steps, "a paused or ended rollout moved"
        for i in d.assign:
            assert self.fleet.devices[i].online
            assert not self.fleet.devices[i].left

    @rule(data=st.data(), outcome=st.sampled_from(["committed", "committed", "failed",
                                                   "rolled_back"]))
    def finish_one(self, data: st.DataObject, outcome: str) -> None:
        pending = [d for d in self.fleet.devices.values()
                   if d.assigned_at and d.outcome == "pending"]
        if pending:
            d = data.draw(st.sampled_from(pending))
            d.outcome = outcome
        for d in self.fleet.devices.values():
            if d.reverts:
                d.reverted = True

    @rule(data=st.data())
    def flip_online(self, data: st.DataObject) -> None:
        d = data.draw(st.sampled_from(sorted(self.fleet.devices)))
        self.fleet.devices[d].online = not self.fleet.devices[d].online

    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        d = data.draw(st.sampled_from(sorted(self.fleet.devices)))
        self.fleet.devices[d].left = True

    @rule(event=st.sampled_from([Event.PAUSE, Event.RESUME, Event.ABORT, Event.ROLLBACK]))
    def operator(self, event: Event) -> None:
        with contextlib.suppress(IllegalTransition):
            self.fleet.command(event)

    @invariant()
    def never_assigned_twice(self) -> None:
        assert not self.fleet.assigned_twice

    @invariant()
    def in_flight_within_the_limit(self) -> None:
        limit = self.fleet.plan.max_concurrent
        if limit is None:
            return
        now = self.fleet.now
        in_flight = [d for d in self.fleet.devices.values() if d.assigned_at and
                     d.outcome == "pending" and (now - d.assigned_at).total_seconds() <= 100]
        assert len(in_flight) <= limit

    @invariant()
    def terminal_states_absorb(self) -> None:
        state = self.fleet.plan.state
        if self.terminal_at is not None:
            assert state == self.terminal_at
        elif state in TERMINAL:
            self.terminal_at = state

    @invariant()
    @precondition(lambda self: hasattr(self, "fleet"))
    def rollback_reverts_only_touched_devices(self) -> None:
        for d in self.fleet.devices.values():
            assert d.reverts <= 1
            if d.reverts:
                assert d.assigned_at is not None


RolloutUnderLoad.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                              deadline=None)
test_rollout_under_load = RolloutUnderLoad.TestCase


def test_replace_keeps_plan_frozen() -> None:
    plan = Fleet(1).plan
    assert replace(plan, stage=1) is not plan


def test_an_idle_fleet_s_stage_says_what_it_waits_for() -> None:
    fleet = Fleet(3, stages="100%", classes=1, gates=Gates(min_requests=20))
    waiting = fleet.tick().waiting
    assert waiting == "stage 1 of 1 (100%): waiting for 3 install(s) to report an outcome"
    fleet.finish_installs()
    for d in fleet.devices.values():
        d.health = Figures(0, 0, None, 1 << 30)  # installed, and no application traffic
    decision = fleet.tick()
    assert decision.plan.state == State.EVALUATING
    assert decision.waiting == ("stage 1 of 1 (100%): waiting for traffic in class c0: 0 of 3 "
                                "canaries served 20 requests on the target (the gate needs 1; "
                                "idle devices need a plan with probes)")
