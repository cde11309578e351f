"""The install machine's table, and the installer against real TUF metadata (local fetcher)."""

import hashlib
import json
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from tuf.ngclient import Updater

from agent.update.installer import Install, Installer, Room, run_smoke_test
from agent.update.machine import RESUME, TERMINAL, Event, IllegalTransition, State, next_state
from controller.registry.blobs import BlobStore
from controller.registry.trust import TrustRepository
from shared.messages import DesiredState, Probe
from shared.targets import TargetInfo
from tests.conftest import wait_for
from tests.controller.registry.test_trust import META, TARGETS, LocalFetcher, publish

HAPPY = [(State.DOWNLOADING, Event.DOWNLOADED, State.VERIFYING),
         (State.VERIFYING, Event.VERIFIED, State.STAGING),
         (State.STAGING, Event.STAGED, State.ACTIVATING),
         (State.ACTIVATING, Event.ACTIVATED, State.SMOKE_TEST),
         (State.SMOKE_TEST, Event.PASSED, State.PROBATION),
         (State.SMOKE_TEST, Event.PROVEN, State.COMMITTED),
         (State.PROBATION, Event.PASSED, State.COMMITTED),
         (State.SMOKE_TEST, Event.FAILED, State.ROLLED_BACK),
         (State.PROBATION, Event.FAILED, State.ROLLED_BACK),
         (State.DOWNLOADING, Event.FAILED, State.FAILED),
         (State.ACTIVATING, Event.FAILED, State.FAILED)]


@pytest.mark.parametrize(("state", "event", "after"), HAPPY)
def test_the_transition_table(state, event, after) -> None:
    assert next_state(state, event) == after


@pytest.mark.parametrize("state", list(State))
def test_start_begins_a_download_from_any_state_and_terminal_states_take_nothing_else(
        state) -> None:
    assert next_state(state, Event.START) == State.DOWNLOADING
    if state in TERMINAL:
        for event in set(Event) - {Event.START}:
            with pytest.raises(IllegalTransition):
                next_state(state, event)


def test_every_state_an_agent_can_die_in_has_a_resume_point_before_it() -> None:
    assert set(RESUME) == set(State) - TERMINAL
    order = list(State)
    assert all(order.index(RESUME[s]) <= order.index(s) for s in RESUME)


@pytest.mark.parametrize(("costs", "verdict"), [
    ([0.1], None),
    ([3.0, 0.1], None),  # a slow first run (one-off costs), then within budget: passes
    ([3.0, 2.0], "input 0: took 2000 ms, budget 1000 ms (the first run: 3000 ms)"),
])
def test_a_smoke_input_over_its_latency_budget_is_judged_on_a_second_run(
        costs: list[float], verdict: str | None) -> None:
    now = [0.0]

    def call(op: str, inputs: dict[str, object]) -> dict[str, list[list[float]]]:
        now[0] += costs.pop(0)
        return {"y": [[1.0]]}

    test = {"inputs": [{"x": [[0.0]]}], "expected": [{"y": [[1.0]]}], "tolerance": 1e-4,
            "latency_budget_ms": 1000}
    assert run_smoke_test(call, "onnx", test, lambda: now[0]) == verdict
    assert costs == []  # run twice only when over budget


class FakeServing:
    def __init__(self) -> None:
        self.active: list[Path | None] = []
        self.replaced: list[bool] = []
        self.probations = 0

    def activate(self, model_dir: Path | None, *, replace: bool = False) -> None:
        self.active.append(model_dir)
        self.replaced.append(replace)

    def smoke_test(self, model_dir: Path) -> str | None:
        return None

    def probation(self, seconds: float, stop: threading.Event) -> str | None:
        self.probations += 1
        return None


class FakeReporter:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.done: list[Install] = []

    def event(self, kind: str, generation: int, detail: str) -> None:
        self.events.append(kind)

    def reported(self, install: Install) -> None:
        self.done.append(install)


@pytest.fixture
def repo(tmp_path: Path) -> tuple[TrustRepository, BlobStore]:
    repo, blobs = TrustRepository(tmp_path / "tuf"), BlobStore(tmp_path / "blobs")
    repo.initialize(now=datetime.now(UTC))
    publish(repo, blobs, {"models/m/1.0.0/source.onnx": b"x" * 1000})
    targets = repo.targets()
    targets["models/m/1.0.0/source.onnx"].unrecognized_fields["custom"] = TargetInfo(
        model="m", version="1.0.0", variant="source", format="onnx", quantization="fp32",
        ram_estimate_bytes=5000).model_dump(mode="json", exclude_none=True)
    repo.set_targets(targets, now=datetime.now(UTC))
    return repo, blobs


def installer(tmp_path: Path, repo, serving, reporter, free: int, ram: int = 1 << 30,
              beside: int | None = None) -> Installer:
    """``ram``: memory for a model with the running one stopped; ``beside``: with it
    running (default: the same)."""
    trust, blobs = repo
    state = tmp_path / "agent"
    (state / "tuf" / "metadata").mkdir(parents=True)
    (state / "tuf" / "download").mkdir()

    def updater() -> Updater:
        return Updater(str(state / "tuf" / "metadata"), META, str(state / "tuf" / "download"),
                       TARGETS, fetcher=LocalFetcher(trust, blobs),
                       bootstrap=trust.trusted_root())

    def counted() -> Updater:
        updaters.append(1)
        return updater()

    updaters: list[int] = []
    inst = Installer(state, updater=counted, reporter=reporter, serving=serving,
                     probation_s=0, disk_free=lambda _path: free,
                     ram_free=lambda: Room(ram if beside is None else beside, ram))
    inst.updaters = updaters  # type: ignore[attr-defined] - how often metadata was asked for
    return inst


SHA = hashlib.sha256(b"x" * 1000).hexdigest()


def desired(generation: int, **fields: object) -> DesiredState:
    given: dict[str, object] = {"sha256": SHA, "size": 1000} | fields
    return DesiredState(device_id="d", generation=generation, model="m", version="1.0.0",
                        variant="source", target="models/m/1.0.0/source.onnx",
                        issued_at=datetime.now(UTC), **given)


def test_a_full_disk_fails_the_install_before_downloading_and_keeps_the_model(
        tmp_path, repo) -> None:
    serving, reporter = FakeServing(), FakeReporter()
    inst = installer(tmp_path, repo, serving, reporter, free=1500)  # needs 2 x 1000
    inst.start()
    inst.want(desired(1))
    (done,) = wait_for(lambda: reporter.done, 30, "the install to end")
    inst.stop()
    assert (done.state, done.reason.split(":")[0]) == (State.FAILED, "insufficient_disk")
    assert serving.active == [None]  # only the start-up activation: nothing new was loaded
    assert not list((tmp_path / "agent" / "models").iterdir())
    assert json.loads((tmp_path / "agent" / "install.json").read_text())["state"] == "failed"


def test_an_install_with_room_commits_and_a_replayed_generation_is_ignored(
        tmp_path, repo) -> None:
    serving, reporter = FakeServing(), FakeReporter()
    inst = installer(tmp_path, repo, serving, reporter, free=10_000)
    inst.start()
    inst.want(desired(1))
    wait_for(lambda: reporter.done, 30, "the install to end")
    inst.want(desired(1))  # the retained copy again
    inst.stop()
    assert [d.state for d in reporter.done] == [State.COMMITTED]
    assert reporter.events == ["downloading", "verifying", "staging", "activating",
                               "smoke_test", "probation", "committed"]
    assert inst.active_dir() == serving.active[-1]


def test_a_rollback_to_a_kept_model_needs_no_download_and_skips_probation(
        tmp_path, repo) -> None:
    serving, reporter = FakeServing(), FakeReporter()
    inst = installer(tmp_path, repo, serving, reporter, free=10_000)
    inst.start()
    inst.want(desired(1))
    wait_for(lambda: reporter.done, 30, "the first install")
    for blob in (tmp_path / "blobs").rglob("*"):  # nothing left to download from
        if blob.is_file():
            blob.unlink()
    first = len(reporter.events)
    inst.want(desired(2, rollback=True))
    wait_for(lambda: len(reporter.done) == 2, 30, "the rollback")
    health = inst.health()
    inst.stop()
    assert [d.state for d in reporter.done] == [State.COMMITTED, State.COMMITTED]
    assert serving.probations == 1  # the first install's only
    assert inst.updaters == [1]  # the rollback asked for no metadata at all
    assert reporter.events[first:] == ["downloading", "rollback", "verifying", "staging",
                                       "activating", "smoke_test", "committed"]
    assert health == {"install_generation": 2, "install_state": "committed",
                      "install_reason": None}


def test_a_desired_state_naming_the_serving_model_only_sets_its_probes(
        tmp_path, repo) -> None:
    serving, reporter = FakeServing(), FakeReporter()
    inst = installer(tmp_path, repo, serving, reporter, free=10_000)
    inst.start()
    inst.want(desired(1))
    wait_for(lambda: reporter.done, 30, "the first install")
    first, activations = len(reporter.events), len(serving.active)
    assert inst.probe() is None
    probe = Probe(rollout="r", interval_s=0.5, max_cpu_share=0.1,
                  until=datetime(2030, 1, 1, tzinfo=UTC))
    inst.want(desired(2, probe=probe))  # a baseline device asked to probe what it runs
    wait_for(lambda: len(reporter.done) == 2, 30, "the probe-only desired state")
    inst.stop()
    assert reporter.events[first:] == ["kept"]  # no download, no activation, no probation
    assert (len(serving.active), serving.probations, inst.updaters) == (activations, 1, [1])
    assert (reporter.done[-1].generation, reporter.done[-1].state) == (2, State.COMMITTED)
    assert inst.probe() == probe
    again = Installer(tmp_path / "agent", updater=lambda: None, reporter=reporter,
                      serving=serving)  # the probe outlives a restart of the agent
    assert again.probe() == probe


def test_a_desired_hash_the_signed_target_does_not_have_fails_the_install(
        tmp_path, repo) -> None:
    serving, reporter = FakeServing(), FakeReporter()
    inst = installer(tmp_path, repo, serving, reporter, free=10_000)
    inst.start()
    inst.want(desired(1, sha256="0" * 64))
    (done,) = wait_for(lambda: reporter.done, 30, "the install to end")
    inst.stop()
    assert (done.state, done.reason.split(":")[0]) == (State.FAILED, "not_signed")
    assert serving.active == [None]


def test_a_target_whose_signed_description_is_unreadable_fails_the_install(
        tmp_path, repo) -> None:
    trust, _ = repo
    targets = trust.targets()
    targets["models/m/1.0.0/source.onnx"].unrecognized_fields["custom"] = {"model": "m"}
    trust.set_targets(targets, now=datetime.now(UTC))
    serving, reporter = FakeServing(), FakeReporter()
    inst = installer(tmp_path, repo, serving, reporter, free=10_000)
    inst.start()
    inst.want(desired(1))
    (done,) = wait_for(lambda: reporter.done, 30, "the install to end")
    inst.stop()
    assert (done.state, done.reason.split(":")[0]) == (State.FAILED, "not_signed")
    assert "version: Field required" in done.reason


def test_download_progress_is_reported_at_each_tenth_while_downloading(tmp_path, repo) -> None:
    serving, reporter = FakeServing(), FakeReporter()
    inst = installer(tmp_path, repo, serving, reporter, free=10_000)
    inst.install = Install(generation=3, state=State.DOWNLOADING)
    for done in range(0, 1001, 25):
        inst.progress("models/m.onnx", done, 1000)
    assert reporter.events == ["download_progress"] * 10
    inst.install = Install(generation=3, state=State.STAGING)
    inst.progress("models/m.onnx", 1000, 1000)
    assert len(reporter.events) == 10  # only while downloading


def test_too_little_memory_fails_the_install_before_downloading(tmp_path, repo) -> None:
    serving, reporter = FakeServing(), FakeReporter()
    inst = installer(tmp_path, repo, serving, reporter, free=10_000, ram=4000)  # needs 5000
    inst.start()
    inst.want(desired(1))
    (done,) = wait_for(lambda: reporter.done, 30, "the install to end")
    inst.stop()
    assert (done.state, done.reason.split(":")[0]) == (State.FAILED, "insufficient_memory")
    assert serving.active == [None]


def test_a_model_that_fits_only_alone_replaces_the_running_one(tmp_path, repo) -> None:
    """A box whose model takes most of its memory can still update: the running model
    is stopped before the new one loads, instead of the install being refused."""
    serving, reporter = FakeServing(), FakeReporter()
    # needs 5000: 6000 with the running model stopped, 3000 beside it
    inst = installer(tmp_path, repo, serving, reporter, free=10_000, ram=6000, beside=3000)
    inst.start()
    inst.want(desired(1))
    (done,) = wait_for(lambda: reporter.done, 30, "the install to end")
    inst.stop()
    assert done.state == State.COMMITTED, done.reason
    assert serving.replaced == [False, True]  # the start-up load, then the install


def test_an_unexpected_error_in_a_step_rolls_back_and_the_installer_keeps_working(
        tmp_path, repo) -> None:
    class Broken(FakeServing):
        def smoke_test(self, model_dir: Path) -> str | None:
            raise RuntimeError("a bug")

    serving, reporter = Broken(), FakeReporter()
    inst = installer(tmp_path, repo, serving, reporter, free=10_000)
    inst.start()
    inst.want(desired(1))
    wait_for(lambda: reporter.done, 30, "the first install to end")
    inst.want(desired(2))  # the installer thread survived
    wait_for(lambda: len(reporter.done) == 2, 30, "the second install to end")
    inst.stop()
    assert [(d.state, d.reason) for d in reporter.done] == [
        (State.ROLLED_BACK, "internal_error: RuntimeError: a bug")] * 2
    assert serving.active[-1] is None  # back on "no model", as before the installs
    # the failed model is stopped before the previous one loads: a box with room for
    # one model at a time could not load it beside
    assert serving.replaced[-1] is True
