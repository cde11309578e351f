"""Rollouts end to end: a real controller (database, broker, signed desired states) and a
simulated fleet on the real device session code, on both backends. Ticks are called
directly; the simulated devices install on a timer and report like agents."""

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent.config import Identity
from agent.sim import Simulator
from agent.simdevice import parse_faults
from controller.api.app import create_app
from controller.runtime import Runtime
from tests.conftest import Backend, wait_for
from tests.models import tiny_onnx

DEVICES = 8  # two of each of the four simulated profiles
FAST = {"min_requests": 10}


@dataclass
class World:
    client: TestClient
    rt: Runtime
    sims: list[tuple[Simulator, threading.Event, threading.Thread]]
    faults: list[str]

    def call(self, method: str, path: str, body: Any = None, *, status: int = 200) -> Any:
        r = self.client.request(method, f"/api/v1{path}", json=body)
        assert r.status_code == status, r.text
        return r.json()

    def enroll(self, n: int) -> list[Identity]:
        token = self.call("POST", "/enroll-tokens", {"uses": n}, status=201)["token"]
        return [Identity.from_enrolment(self.call("POST", "/enroll", {
            "token": token, "name": f"d{i}"}, status=201)) for i in range(n)]

    def simulate(self, identities: list[Identity]) -> Simulator:
        """Run ``identities`` as simulated devices until ``stop_sim``."""
        sim = Simulator(identities, faults=parse_faults(self.faults), step_s=0.05,
                        seed=random.randrange(1000))
        stop = threading.Event()
        thread = threading.Thread(target=sim.run, args=(stop,), daemon=True)
        thread.start()
        self.sims.append((sim, stop, thread))
        return sim

    def stop_sim(self, sim: Simulator) -> None:
        for s, stop, thread in self.sims:
            if s is sim:
                stop.set()
                thread.join(10)

    def reported(self) -> dict[str, Any]:
        return {d["id"]: d["reported"] for d in self.call("GET", "/devices")}

    def all_run(self, version: str) -> bool:
        return all(r and r.get("version") == version and r["state"] == "committed"
                   for r in self.reported().values())

    def tick_until(self, rollout_id: str, states: tuple[str, ...], timeout: float) -> Any:
        def done() -> Any:
            self.rt.tick_rollouts()
            out = self.call("GET", f"/rollouts/{rollout_id}")
            return out if out["state"] in states else None
        return wait_for(done, timeout, f"rollout {rollout_id} to reach {states}", interval=0.2)


def push(c: TestClient, version: str, hidden: int) -> None:
    up = c.post("/api/v1/uploads", params={"filename": "m.onnx"},
                content=tiny_onnx(hidden=hidden)).json()
    r = c.post(f"/api/v1/models/m/versions/{version}", json={"upload": up["sha256"]})
    assert r.status_code == 201, r.text


@contextmanager
def world(backend: Backend, tmp_path: Path, *, faults: list[str] = ()) -> Iterator[World]:
    """A controller with m@1.0.0, 2.0.0 and 3.0.0 and a simulated fleet, all on 1.0.0."""
    settings = backend.settings(tmp_path / "data", health_interval_s=0.5, rollout_tick_s=0)
    rt = Runtime(settings)
    with TestClient(create_app(settings, runtime=rt)) as c:
        c.headers["Authorization"] = "Bearer " + (settings.data_dir / "admin-token").read_text()
        for version, hidden in (("1.0.0", 64), ("2.0.0", 96), ("3.0.0", 128)):
            push(c, version, hidden)
        for version in ("1.0.0", "2.0.0", "3.0.0"):
            wait_for(lambda v=version: c.get(f"/api/v1/models/m/versions/{v}").json()
                     ["status"] == "ready", 120, f"m@{version} built")
        w = World(c, rt, [], list(faults))
        try:
            w.simulate(w.enroll(DEVICES))
            wait_for(lambda: all(d["status"] == "online" and d["capabilities"]
                                 for d in w.call("GET", "/devices")), 30, "the fleet online")
            for d in w.call("GET", "/devices"):
                w.call("PUT", f"/devices/{d['id']}/pin", {"model": "m@1.0.0"})
            wait_for(lambda: w.all_run("1.0.0"), 30, "every device on m@1.0.0")
            yield w
        finally:
            for _, stop, thread in w.sims:
                stop.set()
                thread.join(10)


def test_a_canary_rollout_passes_its_stages_and_a_bad_class_is_rolled_back(
        backend: Backend, tmp_path: Path) -> None:
    with world(backend, tmp_path, faults=["m@3.0.0/gateway-1g:latency=2"]) as w:
        r = w.call("POST", "/rollouts", {"model": "m", "version": "2.0.0",
                                         "stages": "25%,50%,100%", "gates": FAST}, status=201)
        assert r["counts"]["members"] == DEVICES
        assert r["active"]
        done = w.tick_until(r["id"], ("completed", "rolled_back", "paused"), 60)
        assert done["state"] == "completed", [e["reason"] for e in done["timeline"]]
        assert not done["active"]
        wait_for(lambda: w.all_run("2.0.0"), 10, "every device on m@2.0.0")
        reasons = [e["reason"] for e in done["timeline"]]
        assert [x.split(":")[0] for x in reasons if x.startswith(("promote", "finish"))] == [
            "promote", "promote", "finish"]
        first = next(e for e in done["timeline"] if e["reason"].startswith("deployed"))
        assert "4 of 8 devices" in first["reason"]  # 25% is 2, but every class goes first

        bad = w.call("POST", "/rollouts", {"model": "m", "version": "3.0.0",
                                           "stages": "50%,100%", "gates": FAST}, status=201)
        out = w.tick_until(bad["id"], ("rolled_back", "completed", "paused"), 60)
        assert out["state"] == "rolled_back", out["timeline"]
        assert not out["active"]
        # what `edgefleet status` and the dashboard show as active comes from the controller
        assert [x["id"] for x in w.call("GET", "/rollouts") if x["active"]] == []
        failed = next(e for e in out["timeline"] if e["reason"].startswith("rollback"))
        assert "latency p95 in class x86_64/ram<2G/onnxruntime/" in failed["reason"]
        assert out["stage"] == 0  # caught in the canary stage
        wait_for(lambda: w.all_run("2.0.0"), 15, "every device back on m@2.0.0")
        w.simulate(w.enroll(1))  # a new device gets what the last completed rollout shipped

        def newcomer_on_v2() -> bool:
            w.rt.tick_rollouts()
            return len(w.reported()) == DEVICES + 1 and w.all_run("2.0.0")
        wait_for(newcomer_on_v2, 60, "the new device on m@2.0.0")


def test_a_plan_with_probes_judges_the_probes_and_the_baseline_installs_nothing(
        backend: Backend, tmp_path: Path) -> None:
    with world(backend, tmp_path, faults=["m@3.0.0/gateway-1g:latency=2"]) as w:
        before = {d["id"]: d["desired_generation"] for d in w.call("GET", "/devices")}
        r = w.call("POST", "/rollouts", {
            "model": "m", "version": "3.0.0", "stages": "50%,100%", "gates": FAST,
            "probes": {"interval_s": 0.05, "max_cpu_share": 0.05}}, status=201)
        assert r["probes"] == {"interval_s": 0.05, "max_cpu_share": 0.05}
        out = w.tick_until(r["id"], ("rolled_back", "completed", "paused"), 60)
        assert out["state"] == "rolled_back", [e["reason"] for e in out["timeline"]]
        failed = next(e for e in out["timeline"] if e["reason"].startswith("rollback"))
        assert "latency p95 in class x86_64/ram<2G/onnxruntime/" in failed["reason"]
        devices = w.call("GET", "/devices")
        baseline = [d for d in devices if d["desired"]["probe"] and d["desired"]["version"]
                    == "1.0.0" and not d["desired"]["rollback"]]
        assert len(baseline) == DEVICES // 2, "the devices not in the canary stage probe v1"
        for d in baseline:
            kinds = [e["kind"] for e in w.call("GET", f"/devices/{d['id']}/events")
                     if e["generation"] > before[d["id"]]]
            assert kinds, d["id"]
            assert set(kinds) <= {"kept", "committed"}, kinds  # nothing installed
            assert d["desired"]["probe"]["rollout"] == r["id"]


def test_a_smoke_test_failure_rolls_back_and_operator_commands_work(
        backend: Backend, tmp_path: Path) -> None:
    with world(backend, tmp_path, faults=["m@3.0.0/pi4-2g:smoke=1"]) as w:
        r = w.call("POST", "/rollouts", {"model": "m", "version": "2.0.0",
                                         "stages": "1:1h,100%", "gates": FAST}, status=201)
        rid = r["id"]
        w.tick_until(rid, ("baking",), 30)
        paused = w.call("POST", f"/rollouts/{rid}/pause", {"reason": "lunch"})
        assert paused["state"] == "paused"
        assert "lunch" in paused["reason"]
        conflict = w.client.post(f"/api/v1/rollouts/{rid}/pause")
        assert conflict.status_code == 409
        assert conflict.json()["code"] == "illegal_transition"
        other = w.client.post("/api/v1/rollouts", json={"model": "m", "version": "2.0.0"})
        assert other.status_code == 422  # the devices are in an active rollout of m
        assert other.json()["field"] == "selector"
        assert w.call("POST", f"/rollouts/{rid}/resume")["state"] == "baking"  # bakes again
        out = w.call("POST", f"/rollouts/{rid}/abort")
        assert out["state"] == "aborted"
        assert w.client.post(f"/api/v1/rollouts/{rid}/rollback").status_code == 409
        arm = w.call("POST", "/rollouts", {"model": "m", "version": "2.0.0",
                                           "classes": ["arm64/*"]}, status=201)
        assert arm["counts"]["members"] == DEVICES // 2  # two of the four profiles are arm64
        w.call("POST", f"/rollouts/{arm['id']}/abort")

        bad = w.call("POST", "/rollouts", {"model": "m", "version": "3.0.0",
                                           "stages": "100%", "gates": FAST}, status=201)
        out = w.tick_until(bad["id"], ("rolled_back", "completed"), 60)
        assert out["state"] == "rolled_back"
        assert any("smoke test failed on" in e["reason"] for e in out["timeline"])
        wait_for(lambda: not any(r["version"] == "3.0.0" and r["state"] == "committed"
                                 for r in w.reported().values()), 15, "no device left on 3.0.0")


def test_invalid_plans_say_which_field_is_wrong(backend: Backend, tmp_path: Path) -> None:
    settings = backend.settings(tmp_path / "data", rollout_tick_s=0)
    with TestClient(create_app(settings, runtime=Runtime(settings))) as c:
        c.headers["Authorization"] = "Bearer " + (settings.data_dir / "admin-token").read_text()
        push(c, "1.0.0", 64)
        wait_for(lambda: c.get("/api/v1/models/m/versions/1.0.0").json()["status"] == "ready",
                 120, "built")
        for body, field in [
            ({"model": "nope", "version": "1.0.0"}, "version"),
            ({"model": "m", "version": "1.0.0", "stages": "50%,10%,100%"}, "stages[1]"),
            ({"model": "m", "version": "1.0.0", "gates": {"bogus": 1}}, "gates.bogus"),
            ({"model": "m", "version": "1.0.0"}, "selector"),  # no device enrolled
            ({"model": "m", "version": "1.0.0", "on_failure": "pray"}, "on_failure"),
            ({"model": "m", "version": "1.0.0", "probes": {"interval_s": 0}},
             "probes.interval_s"),
            ({"model": "m", "version": "1.0.0", "probes": {"max_cpu_share": 2}},
             "probes.max_cpu_share"),
            ({"model": "m", "version": "1.0.0", "probes": {"every": 1}}, "probes.every"),
        ]:
            r = c.post("/api/v1/rollouts", json=body)
            assert r.status_code == 422, r.text
            assert r.json()["field"] == field, r.json()
        viewer = c.post("/api/v1/tokens", json={"name": "v", "role": "viewer"}).json()["token"]
        r = c.post("/api/v1/rollouts", json={"model": "m", "version": "1.0.0"},
                   headers={"Authorization": f"Bearer {viewer}"})
        assert r.status_code == 403


def test_devices_away_or_enrolled_late_get_the_target_once_the_rollout_completes(
        backend: Backend, tmp_path: Path) -> None:
    with world(backend, tmp_path) as w:
        late = w.enroll(2)
        away = w.simulate(late[:1])  # on 1.0.0 like the rest, then goes away
        wait_for(lambda: w.call("GET", f"/devices/{late[0].device_id}")["status"] == "online",
                 30, "the extra device online")
        w.call("PUT", f"/devices/{late[0].device_id}/pin", {"model": "m@1.0.0"})
        wait_for(lambda: (w.reported()[late[0].device_id] or {}).get("version") == "1.0.0", 30,
                 "the extra device on m@1.0.0")
        w.stop_sim(away)  # a clean shutdown says offline
        wait_for(lambda: w.call("GET", f"/devices/{late[0].device_id}")["status"] == "offline",
                 30, "the device offline")
        r = w.call("POST", "/rollouts", {"model": "m", "version": "2.0.0",
                                         "stages": "50%,100%", "gates": FAST}, status=201)
        assert r["counts"]["members"] == DEVICES + 1  # the away device is in the target set
        done = w.tick_until(r["id"], ("completed",), 60)
        assert done["counts"]["waiting"] == 1  # not waited for, not judged
        assert w.reported()[late[0].device_id]["version"] == "1.0.0"
        w.simulate(late)  # it comes back, and a device enrolled after the rollout appears
        wait_for(lambda: all(d["status"] == "online" and d["capabilities"]
                             for d in w.call("GET", "/devices")), 30, "both online")

        def converged() -> bool:
            w.rt.tick_rollouts()
            return w.all_run("2.0.0")
        wait_for(converged, 30, "both on m@2.0.0 from the completed rollout")
        w.rt.tick_rollouts()  # reads their outcomes
        out = w.call("GET", f"/rollouts/{r['id']}")
        assert out["counts"]["members"] == DEVICES + 2
        assert out["counts"]["committed"] == DEVICES + 2


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
