"""Staged rollouts on real agents (the daemon's own code), judged on what they measured."""

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cli.realfleet import RealAgent, RealFleet, Traffic
from cli.samples import mlp_onnx
from tests.conftest import Backend, wait_for
from tests.integration.test_delivery import push
from tests.support.fleet import fetch_spy

MiB = 1 << 20
#: three RAM tiers, so three device classes: ram<2G, ram<8G, ram8G+ (the host's 24 GiB)
TIERS = {"small": 1536 * MiB, "mid": 4096 * MiB, "big": None}
PER_TIER = 4
GATES = {"min_requests": 10}
X = np.random.default_rng(7).standard_normal((1, 128)).astype(np.float32)
BODY = json.dumps({"inputs": {"x": X.tolist()}}).encode()


def infer_body(agent: RealAgent) -> tuple[str, bytes] | None:
    return ("/v1/models/mlp/infer", BODY) if agent.serves() else None


@contextmanager
def real_fleet(controller: Any, root: Path) -> Iterator[RealFleet]:
    fleet = RealFleet(controller.admin, root)
    try:
        for tier, limit in TIERS.items():
            for i in range(PER_TIER):
                fleet.start(fleet.add(f"{tier}-{i}", memory_limit=limit))
        fleet.wait_online()
        yield fleet
    finally:
        fleet.close()


def rollout(controller: Any, version: str, stages: str) -> dict[str, Any]:
    api = controller.admin
    r = api.call("POST", "/rollouts", {"model": "mlp", "version": version, "stages": stages,
                                       "gates": GATES})
    return wait_for(lambda: (o := api.call("GET", f"/rollouts/{r['id']}"))["state"] in (
        "completed", "rolled_back", "paused") and o, 240, f"the rollout of {version} to end")


def test_a_staged_rollout_on_real_agents_completes_and_a_memory_regression_rolls_back(
        backend: Backend, start_controller, tmp_path: Path) -> None:
    controller = start_controller("--rollout-tick", "0.5")
    good = mlp_onnx()
    push(controller, tmp_path, "mlp", "1.0.0", good, "v1.onnx", derive=False)
    # the same answers, and 100 MB more memory on every run (real, in the file); a
    # latency budget loose enough that only the memory gate judges it on a busy host
    hungry = push(controller, tmp_path, "mlp", "2.0.0", mlp_onnx(scratch_bytes=100 * MiB),
                  "v2.onnx", derive=False, smoke_test={"latency_budget_ms": 20000})
    want = ort.InferenceSession(good).run(None, {"x": X})[0]
    with ExitStack() as stack:
        fleet = stack.enter_context(real_fleet(controller, tmp_path))
        traffic = stack.enter_context(Traffic(fleet.agents, infer_body, rate=10))
        spy = stack.enter_context(fetch_spy(str(backend.mqtt_url), backend.topic_root)) \
            if backend.mqtt_url else None

        first = rollout(controller, "1.0.0", "25%:2s,100%:2s")
        assert first["state"] == "completed", [e["reason"] for e in first["timeline"]]
        assert len(first["by_class"]) == 3, first["by_class"]
        for agent in fleet.agents:
            assert agent.serves() == "mlp@1.0.0", agent.name
            answer = _infer(agent)
            np.testing.assert_allclose(answer, want, rtol=1e-5)
        if spy is not None:
            spy.clear()

        bad = rollout(controller, "2.0.0", "25%:3s,100%")
        assert bad["state"] == "rolled_back", [e["reason"] for e in bad["timeline"]]
        failed = next(e for e in bad["timeline"] if e["reason"].startswith("rollback"))
        assert "memory in class" in failed["reason"]
        ratios = [s["comparison"]["memory_ratio"] for name, s in failed["figures"]["scopes"].items()
                  if name != "all" and s.get("comparison")]
        # the worker's own memory: on one host, every agent's host-wide figure is the same
        assert ratios, failed["figures"]
        assert max(ratios) >= 2.5, failed["figures"]
        wait_for(lambda: all(a.serves() == "mlp@1.0.0" for a in fleet.agents), 60,
                 "every agent back on mlp@1.0.0")
        devices = wait_for(lambda: (ds := {d["id"]: d for d in controller.devices()}) and all(
            d["last_health"]["active_model"] == "mlp@1.0.0" for d in ds.values()) and ds, 30,
            "health reports from mlp@1.0.0 everywhere")
        touched = [a for a in fleet.agents if devices[a.device_id]["desired"]["rollback"]]
        assert len(touched) == bad["counts"]["reverted"] >= 3  # a canary in every class
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
            assert hungry["variants"][0]["sha256"] in blobs  # the canaries fetched v2
            assert _sha(controller, "1.0.0") not in blobs, "a rollback fetched its kept copy"
        assert traffic.answers.get(200, 0) > 0


def _infer(agent: RealAgent) -> np.ndarray:
    import urllib.request

    request = urllib.request.Request(f"{agent.local}/v1/models/mlp/infer", data=BODY,  # noqa: S310
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
        return np.asarray(json.loads(resp.read())["outputs"]["y"], dtype=np.float32)


def _sha(controller: Any, version: str) -> str:
    shown = controller.admin.call("GET", f"/models/mlp/versions/{version}")
    return str(shown["variants"][0]["sha256"])


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
