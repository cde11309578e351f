"""Rollouts survive their controller: SIGKILL mid-rollout and restart, and two replicas on
one PostgreSQL where only the lock holder enacts ticks. Real processes throughout."""

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cli.samples import mlp_onnx
from tests.conftest import Backend, ControllerProcess, cli, wait_for

DEVICES = 8
FAST = {"min_requests": 10}


def setup_fleet(c: ControllerProcess, spawn: Callable[..., Any], tmp_path: Path) -> None:
    """Two versions pushed and built; a simulated fleet online, all on 1.0.0."""
    for i, version in enumerate(("1.0.0", "2.0.0")):
        path = tmp_path / f"m{i}.onnx"
        path.write_bytes(mlp_onnx(hidden=64, seed=i))
        up = c.admin.upload("/uploads", path, params={"filename": path.name})
        c.admin.call("POST", f"/models/m/versions/{version}", {"upload": up["sha256"]})
    wait_for(lambda: all(v["status"] == "ready" for v in c.admin.call("GET", "/models")), 120,
             "the versions built")
    spawn("sim", "--devices", str(DEVICES), "--controller", c.url, "--token",
          c.enroll_token(uses=DEVICES), log_name="sim")
    wait_for(lambda: len(on(c, None)) == DEVICES, 60, "the fleet online")
    for d in c.devices():
        c.admin.call("PUT", f"/devices/{d['id']}/pin", {"model": "m@1.0.0"})
    wait_for(lambda: len(on(c, "1.0.0")) == DEVICES, 60, "every device on 1.0.0")


def on(c: ControllerProcess, version: str | None) -> list[str]:
    """Online devices that report running ``version`` (None: any online device)."""
    def runs(d: dict[str, Any]) -> bool:
        reported = d["reported"] or {}
        return reported.get("version") == version and reported["state"] == "committed"

    return [d["id"] for d in c.devices() if d["status"] == "online" and d["capabilities"]
            and (version is None or runs(d))]


def rollout(c: ControllerProcess) -> str:
    out = c.admin.call("POST", "/rollouts", {"model": "m", "version": "2.0.0", "gates": FAST,
                                             "stages": "25%:3s,50%:3s,100%"})
    return str(out["id"])


def status(c: ControllerProcess, rid: str) -> Any:
    try:
        return c.admin.call("GET", f"/rollouts/{rid}")
    except Exception:  # noqa: BLE001 - a controller being killed or restarted
        return None


def assert_each_stage_once(timeline: list[dict[str, Any]]) -> None:
    moves = [e["reason"].split(":")[0] for e in timeline if e["kind"] in ("transition", "gate")]
    assert moves == ["start", *["deployed", "baked", "promote"] * 2, "deployed", "baked",
                     "finish"], moves
    deployed = [e["reason"] for e in timeline if e["reason"].startswith("deployed")]
    assert [r.split(" (")[0] for r in deployed] == [
        "deployed: stage 1 of 3", "deployed: stage 2 of 3", "deployed: stage 3 of 3"]


def test_a_controller_killed_mid_rollout_carries_on_from_the_database(
        start_controller: Callable[..., ControllerProcess], spawn: Callable[..., Any],
        backend: Backend, tmp_path: Path) -> None:
    c = start_controller("--rollout-tick", "0.5", health_interval=0.5)
    setup_fleet(c, spawn, tmp_path)
    rid = rollout(c)
    wait_for(lambda: (s := status(c, rid)) and s["stage"] == 1 and s["state"] == "baking", 60,
             "stage 2 baking")
    c.proc.send_signal(signal.SIGKILL)
    c.proc.wait(10)
    again = start_controller("--rollout-tick", "0.5", health_interval=0.5, like=c)
    done = wait_for(lambda: (s := status(again, rid)) and s["state"] in (
        "completed", "rolled_back", "paused") and s, 90, "the rollout to end")
    assert done["state"] == "completed", [e["reason"] for e in done["timeline"]]
    assert_each_stage_once(done["timeline"])
    wait_for(lambda: len(on(again, "2.0.0")) == DEVICES, 30, "every device on 2.0.0")


@pytest.mark.parametrize("backend", ["external"], indirect=True)  # the embedded broker
def test_two_replicas_only_the_lock_holder_ticks_and_the_other_takes_over(  # is one replica's
        start_controller: Callable[..., ControllerProcess], spawn: Callable[..., Any],
        tmp_path: Path) -> None:
    a = start_controller("--rollout-tick", "0.5", health_interval=0.5)
    b = start_controller("--rollout-tick", "0.5", health_interval=0.5, replica_of=a)
    setup_fleet(a, spawn, tmp_path)
    leads = "this controller now leads"
    leader, other = wait_for(lambda: (a, b) if leads in a.log() else (b, a) if leads in b.log()
                             else None, 30, "one replica to lead")
    assert leads not in other.log()
    rid = rollout(other)  # any replica takes commands; the leader enacts ticks
    wait_for(lambda: (s := status(other, rid)) and s["stage"] == 1, 60, "stage 2")
    assert leads not in other.log()
    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait(10)
    wait_for(lambda: leads in other.log(), 15, "the other replica to take over")
    done = wait_for(lambda: (s := status(other, rid)) and s["state"] in (
        "completed", "rolled_back", "paused") and s, 90, "the rollout to end")
    assert done["state"] == "completed", [e["reason"] for e in done["timeline"]]
    assert_each_stage_once(done["timeline"])


@pytest.mark.parametrize("backend", ["external"], indirect=True)
def test_two_replicas_share_health_reports_instead_of_each_writing_all_of_them(
        start_controller: Callable[..., ControllerProcess], spawn: Callable[..., Any]) -> None:
    a = start_controller(health_interval=0.2)
    b = start_controller(health_interval=0.2, replica_of=a)
    spawn("sim", "--devices", "4", "--controller", a.url, "--token", a.enroll_token(uses=4),
          log_name="sim")
    devices = wait_for(lambda: (ds := b.devices()) and len(ds) == 4 and all(
        (d["last_health"] or {}).get("seq", 0) >= 30 for d in ds) and ds, 60,
        "30 health reports from each device")
    for d in devices:  # each report counted once (both replicas writing each: about 2x)
        assert 0 < d["health_count"] <= d["last_health"]["seq"] + 5, d


def test_the_rollout_cli_creates_waits_and_says_what_went_wrong(
        start_controller: Callable[..., ControllerProcess], spawn: Callable[..., Any],
        tmp_path: Path) -> None:
    c = start_controller("--rollout-tick", "0.5", health_interval=0.5)
    setup_fleet(c, spawn, tmp_path)
    env = os.environ | {"EDGEFLEET_CONTROLLER": c.url, "EDGEFLEET_TOKEN": c.admin.token or "",
                        "COLUMNS": "200"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cli("rollout", *args), capture_output=True, text=True, env=env,
                              timeout=120, check=False)

    created = run("create", "--model", "m", "--version", "2.0.0", "--stages", "50%,100%",
                  "--gate", "min_requests=10", "--json")
    assert created.returncode == 0, created.stderr
    rid = json.loads(created.stdout)["id"]
    waited = run("status", rid, "--wait")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "completed" in waited.stdout
    assert "finish: stage 2 of 2 (100%) passed its gates" in waited.stdout
    assert rid in run("list").stdout
    refused = run("rollback", rid)
    assert refused.returncode == 1
    assert "illegal_transition: cannot rollback a rollout that is completed" in refused.stderr
    bad = run("create", "--model", "m", "--version", "9.9.9")
    assert bad.returncode == 1
    assert "invalid_plan: version: no version m@9.9.9" in bad.stderr
    audited = subprocess.run(cli("audit", "--action", "rollout", "--json"), capture_output=True,
                             text=True, env=env, timeout=60, check=True)
    assert [(e["actor"], e["action"], e["target"]) for e in json.loads(audited.stdout)] == [
        ("bootstrap-admin", "rollout.create", rid)]  # refused commands change nothing
