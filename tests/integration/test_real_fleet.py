"""Staged rollouts on real agents (the daemon's own code), judged on what they measured."""

import hashlib
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cli.realfleet import Call, RealAgent, RealFleet, Traffic
from cli.samples import mlp_onnx
from tests.conftest import Backend, wait_for
from tests.integration.test_delivery import push
from tests.support.fleet import fetch_spy

MiB = 1 << 20
#: three RAM tiers, so three device classes: ram<2G, ram<8G, ram8G+ (the host's 24 GiB).
#: The small boxes' 110 MiB is less than the fp32 variant needs (about 138 MiB measured at
#: push) and more than the int8 one (about 90), so they get int8 and the others fp32; it
#: is also their model workers' real memory limit (a cgroup, agent.limits).
TIERS = {"small": 110 * MiB, "mid": 4096 * MiB, "big": None}
PER_TIER = 4
ROWS, INPUTS, HIDDEN = 384, 4096, 2048  # the application sends batches of 384 rows
X = np.random.default_rng(7).standard_normal((ROWS, INPUTS)).astype(np.float32)
#: push-time smoke inputs and fidelity are measured on one row, as pushers often do
ONE_ROW = {"x": f"float32[1,{INPUTS}]"}
#: v2 materialises a broadcast of 192 KiB per row: on the one-row push sample that is
#: nothing; on the application's 384-row batches 72 MiB, which onnxruntime's arena
#: holds about twice. The bigger boxes have room (their plan lets a version use 3x the
#: memory; 2.3x measured) and it costs them little time (+13%); the small boxes'
#: workers run out of their 110 MiB on every batch.
SCRATCH_PER_ROW = 192 * 1024


def infer_call(agent: RealAgent) -> Call | None:
    return Call.kserve("mlp", {"x": X}) if agent.serves() else None


def model(seed: int = 0, scratch: int = 0) -> bytes:
    return mlp_onnx(hidden=HIDDEN, inputs=INPUTS, seed=seed, batch="N", scratch_bytes=scratch)


@contextmanager
def real_fleet(controller: Any, root: Path, tiers: dict[str, int | None],
               per_tier: int) -> Iterator[RealFleet]:
    fleet = RealFleet(controller.admin, root)
    try:
        for tier, limit in tiers.items():
            for i in range(per_tier):
                fleet.start(fleet.add(f"{tier}-{i}", memory_limit=limit))
        fleet.wait_online()
        yield fleet
    finally:
        fleet.close()


def rollout(controller: Any, version: str, stages: str, gates: dict[str, Any]
            ) -> dict[str, Any]:
    api = controller.admin
    r = api.call("POST", "/rollouts", {"model": "mlp", "version": version, "stages": stages,
                                       "gates": gates})
    return wait_for(lambda: (o := api.call("GET", f"/rollouts/{r['id']}"))["state"] in (
        "completed", "rolled_back", "paused") and o, 300, f"the rollout of {version} to end")


def test_a_rollout_to_three_classes_of_real_agents_completes_and_a_regression_only_the_small_boxes_cannot_afford_rolls_back(  # noqa: E501
        backend: Backend, start_controller, tmp_path: Path) -> None:
    controller = start_controller("--rollout-tick", "0.5")
    v1 = push(controller, tmp_path, "mlp", "1.0.0", model(), "v1.onnx", inputs=ONE_ROW)
    v2 = push(controller, tmp_path, "mlp", "2.0.0", model(scratch=SCRATCH_PER_ROW),
              "v2.onnx", inputs=ONE_ROW)
    for version in (v1, v2):
        ram = {v["quantization"]: v["ram_estimate_bytes"] for v in version["variants"]}
        assert ram["int8"] < TIERS["small"] < ram["fp32"], ram  # pinned by the push
    # twelve real agents on two cores: comparing one device's p95 with another's
    # measures the scheduler (1.9x seen between two copies of the same load), and a
    # canary's p95 covers only its bake, while the small boxes' workers restart (load
    # onnxruntime and the model) on the same cores, against a baseline that covers the
    # calmer minutes before (3.4-3.8x, +0.7-0.9 s seen in CI in the big class; real
    # boxes do not take each other's CPU). So latency fails a stage here only when it
    # also grows by seconds; memory as the plan's owner chose (see SCRATCH_PER_ROW)
    gates = {"min_requests": 10, "max_memory_ratio": 3.0, "max_latency_p95_ratio": 3.0,
             "min_latency_increase_ms": 5000}
    with ExitStack() as stack:
        fleet = stack.enter_context(real_fleet(controller, tmp_path, TIERS, PER_TIER))
        traffic = stack.enter_context(Traffic(fleet.agents, infer_call, rate=2))
        spy = stack.enter_context(fetch_spy(str(backend.mqtt_url), backend.topic_root)) \
            if backend.mqtt_url else None

        first = rollout(controller, "1.0.0", "25%:2s,100%:2s", gates)
        assert first["state"] == "completed", [e["reason"] for e in first["timeline"]]
        assert len(first["by_class"]) == 3, first["by_class"]
        shas = {v["sha256"]: v["quantization"] for v in v1["variants"]}
        for agent in fleet.agents:
            assert agent.serves() == "mlp@1.0.0", agent.name
            # the file it runs is a signed variant's, the one for its class; its answer
            # is that file's answer (onnxruntime run here)
            (path,) = (agent.state / "current").glob("model.*")
            runs = shas[hashlib.sha256(path.read_bytes()).hexdigest()]
            assert runs == ("int8" if agent.name.startswith("small") else "fp32"), agent.name
            want = ort.InferenceSession(str(path)).run(None, {"x": X})[0]
            np.testing.assert_allclose(_infer(agent, X), want, rtol=1e-5, atol=1e-3)
        if spy is not None:
            spy.clear()

        bad = rollout(controller, "2.0.0", "25%:3s,100%", gates)
        assert bad["state"] == "rolled_back", [e["reason"] for e in bad["timeline"]]
        failed = next(e for e in bad["timeline"] if e["reason"].startswith("rollback"))
        scopes = {name: s for name, s in failed["figures"]["scopes"].items() if name != "all"}
        small = next(name for name in scopes if "ram<2G" in name)
        assert small in failed["reason"], failed["reason"]
        assert not [name for name in scopes if name != small and name in failed["reason"]]
        _assert_rolled_back(controller, fleet, spy, v1, v2)
        assert traffic.answers.get(200, 0) > 0


def _assert_rolled_back(controller: Any, fleet: RealFleet, spy: Any, good: dict[str, Any],
                        bad: dict[str, Any]) -> None:
    """Every agent serves ``good`` again; the reverted ones say rollback, ran no
    probation and fetched nothing of ``good``."""
    wait_for(lambda: all(a.serves() == "mlp@1.0.0" for a in fleet.agents), 60,
             "every agent back on mlp@1.0.0")
    devices = wait_for(lambda: (ds := {d["id"]: d for d in controller.devices()}) and all(
        d["last_health"]["active_model"] == "mlp@1.0.0" for d in ds.values()) and ds, 30,
        "health reports from mlp@1.0.0 everywhere")
    touched = [a for a in fleet.agents if devices[a.device_id]["desired"]["rollback"]]
    assert touched
    for agent in touched:
        device = devices[agent.device_id]
        kinds = [e["kind"] for e in controller.admin.call(
            "GET", f"/devices/{agent.device_id}/events")
            if e["generation"] == device["desired_generation"]]
        assert "rollback" in kinds, (agent.name, kinds)
        assert "probation" not in kinds, (agent.name, kinds)
        assert device["reported"]["state"] == "committed"
    if spy is not None:
        blobs = {a.blob for a in spy.asked()}
        assert {v["sha256"] for v in bad["variants"]} & blobs  # the canaries fetched it
        assert not {v["sha256"] for v in good["variants"]} & blobs, \
            "a rollback fetched its kept copy"


def test_a_version_whose_worker_uses_3x_the_memory_fails_the_memory_gate_on_real_agents(
        backend: Backend, start_controller, tmp_path: Path) -> None:
    """The same answers and 100 MB more memory on every run (real, in the file): the
    gate compares the model workers' own memory (on one host every agent's host-wide
    figure is the same)."""
    controller = start_controller("--rollout-tick", "0.5")
    good = push(controller, tmp_path, "mlp", "1.0.0", mlp_onnx(), "v1.onnx", derive=False)
    # a latency budget loose enough that only the memory gate judges it on a busy host
    hungry = push(controller, tmp_path, "mlp", "2.0.0", mlp_onnx(scratch_bytes=100 * MiB),
                  "v2.onnx", derive=False, smoke_test={"latency_budget_ms": 20000})
    x = X[:1, :128]
    with ExitStack() as stack:
        fleet = stack.enter_context(real_fleet(controller, tmp_path, {"any": None}, 4))
        stack.enter_context(Traffic(fleet.agents, lambda a: Call.kserve("mlp", {"x": x})
                                    if a.serves() else None, rate=10))
        spy = stack.enter_context(fetch_spy(str(backend.mqtt_url), backend.topic_root)) \
            if backend.mqtt_url else None
        first = rollout(controller, "1.0.0", "100%", {"min_requests": 10})
        assert first["state"] == "completed", [e["reason"] for e in first["timeline"]]
        if spy is not None:
            spy.clear()
        bad = rollout(controller, "2.0.0", "25%:3s,100%", {"min_requests": 10})
        assert bad["state"] == "rolled_back", [e["reason"] for e in bad["timeline"]]
        failed = next(e for e in bad["timeline"] if e["reason"].startswith("rollback"))
        assert "memory in class" in failed["reason"]
        ratios = [s["comparison"]["memory_ratio"] for name, s in failed["figures"]["scopes"].items()
                  if name != "all" and s.get("comparison")]
        assert ratios, failed["figures"]
        assert max(ratios) >= 2.5, failed["figures"]
        _assert_rolled_back(controller, fleet, spy, good, hungry)


def _infer(agent: RealAgent, x: np.ndarray) -> np.ndarray:
    import urllib.request

    call = Call.kserve("mlp", {"x": x})
    request = urllib.request.Request(agent.local + call.path, data=call.body,  # noqa: S310
                                     headers=call.headers)
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
        (y,) = json.loads(resp.read())["outputs"]
    return np.asarray(y["data"], dtype=np.float32).reshape(y["shape"])


def test_idle_real_agents_wait_without_probes_and_are_judged_on_probes_with_them(
        backend: Backend, start_controller, tmp_path: Path) -> None:
    """No application traffic at all, as boxes between jobs: a plan without probes says
    what it waits for; one with probes completes on what the probes measured, and the
    baseline devices probe the model they run without installing anything."""
    controller = start_controller("--rollout-tick", "0.5")
    api = controller.admin
    push(controller, tmp_path, "mlp", "1.0.0", mlp_onnx(), "v1.onnx", derive=False)
    push(controller, tmp_path, "mlp", "2.0.0", mlp_onnx(seed=2), "v2.onnx", derive=False)
    probes = {"interval_s": 0.1, "max_cpu_share": 0.2}
    # v1 and v2 cost the same; four agents installing and probing on two cores make
    # sub-millisecond p95s jitter by 1.5x (seen 1.52x), which is not what this is about
    gates = {"max_latency_p95_ratio": 3.0}
    fleet = RealFleet(api, tmp_path)
    try:
        for i in range(4):
            fleet.start(fleet.add(f"idle-{i}"))
        fleet.wait_online()
        first = api.call("POST", "/rollouts", {"model": "mlp", "version": "1.0.0",
                                               "stages": "100%", "probes": probes,
                                               "gates": gates})
        done = _ended(api, first["id"])
        assert done["state"] == "completed", [e["reason"] for e in done["timeline"]]

        waiting = api.call("POST", "/rollouts", {"model": "mlp", "version": "2.0.0",
                                                 "stages": "1,100%"})
        status = wait_for(lambda: (r := api.call("GET", f"/rollouts/{waiting['id']}"))[
            "reason"].startswith("stage 1 of 2 (1 devices): waiting for traffic") and r, 120,
            "the rollout without probes to say it waits for traffic")
        assert "0 of 1 canaries served 20 requests" in status["reason"], status["reason"]
        assert "idle devices need a plan with probes" in status["reason"]
        api.call("POST", f"/rollouts/{waiting['id']}/abort", {"reason": "no traffic"})

        before = {d["id"]: d for d in controller.devices()}
        probed = api.call("POST", "/rollouts", {"model": "mlp", "version": "2.0.0",
                                                "stages": "1,100%", "probes": probes,
                                                "gates": gates})
        done = _ended(api, probed["id"])
        assert done["state"] == "completed", "\n".join(e["reason"] for e in done["timeline"])
        assert all(a.serves() == "mlp@2.0.0" for a in fleet.agents)
        # stage 1 was judged on probes: the canary's and the baseline's
        judged = next(e for e in done["timeline"] if e["reason"].startswith("promote"))
        (scope,) = [s for name, s in judged["figures"]["scopes"].items() if name != "all"]
        assert scope["canary"]["devices"] == 1, scope
        assert scope["canary"]["requests"] >= 20, scope  # probes: the agents served nothing
        assert scope["baseline"]["devices"] >= 1, scope
        assert scope["baseline"]["requests"] >= 20, scope
        assert "latency_p95_ratio" in scope["comparison"], scope
        devices = wait_for(lambda: (ds := {d["id"]: d for d in controller.devices()}) and all(
            d["last_health"]["active_model"] == "mlp@2.0.0" and d["last_health"]["probe_count"]
            for d in ds.values()) and ds, 60, "every agent probing mlp@2.0.0")
        kept = 0
        for agent in fleet.agents:
            health = devices[agent.device_id]["last_health"]
            # the application traffic was the smoke test alone: the gates saw probes
            assert health["inference_count"] < 20, health
            kinds = [e["kind"] for e in api.call("GET", f"/devices/{agent.device_id}/events")
                     if e["generation"] > before[agent.device_id]["desired_generation"]]
            # probes of the model a device runs install nothing: v2 came once at most
            assert kinds.count("downloading") <= 1, (agent.name, kinds)
            kept += kinds[:1] == ["kept"]
        # the devices not in stage 1 probed what they ran (v1; or v2, for the one the
        # aborted rollout had given it), as the stage's baseline
        assert kept >= 3, kept
    finally:
        fleet.close()


def _ended(api: Any, rollout_id: str) -> dict[str, Any]:
    return wait_for(lambda: (o := api.call("GET", f"/rollouts/{rollout_id}"))["state"] in (
        "completed", "rolled_back", "paused", "aborted") and o, 240, "the rollout to end")
