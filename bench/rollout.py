"""Staged rollouts at fleet scale, beside the bare MQTT round trip they are built on.

A real controller (``controller serve``, on Mosquitto) and ``edgefleet sim`` with N
simulated devices, all driven through the API:

(a) m@2.0.0 in three stages with no bake time (1%, 10%, 100%): time from create to
    completed, and each stage's share (deploy, installs, health reports, gates);
(b) m@3.0.0, which the simulator makes fail on every device (error rate 50%), in stages
    10%, 100%: time from the failed gate evaluation to every canary reporting its
    previous model again (the rollout's ``reverted`` entry);
baseline: a bare paho client publishing one retained message to each of as many
    device topics as there were canaries, and a bare subscriber answering each: the
    transport floor under (b).

    python bench/rollout.py [--devices 1000] [--mqtt mqtt://127.0.0.1:1883] [--db URL]

Prints a table and writes bench/results/rollout.json. Timeline entries are stamped by
the controller's tick, so figures are good to about one tick (--rollout-tick, 0.5 s).
"""

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.api import Api  # noqa: E402
from cli.ports import free_port, wait_until  # noqa: E402
from cli.samples import mlp_onnx  # noqa: E402
from controller.db.engine import scratch_schema  # noqa: E402

CLI = [sys.executable, "-m", "cli"]


def start(args: argparse.Namespace, tmp: Path,
          procs: list[subprocess.Popen[bytes]]) -> tuple[list[subprocess.Popen[bytes]], Api]:
    http = f"127.0.0.1:{free_port()}"
    cmd = [*CLI, "controller", "serve", "--data-dir", str(tmp / "controller"), "--http", http,
           "--mqtt", args.mqtt, "--topic-root", f"bench{secrets.token_hex(3)}/ef/v1",
           "--rollout-tick", "0.5", "--health-interval", "1", "--keepalive", "10"]
    if args.db:
        cmd += ["--db", args.db]
    env = {**os.environ, "EDGEFLEET_LOG_LEVEL": "warning"}
    log = (tmp / "controller.log").open("wb")
    procs = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)]
    url = f"http://{http}"
    token_file = tmp / "controller" / "admin-token"
    if not wait_until(lambda: token_file.exists() and Api(url, None).ready(), 60):
        sys.exit(f"the controller did not start; see {tmp / 'controller.log'}")
    api = Api(url, token_file.read_text().strip())
    for i, version in enumerate(("1.0.0", "2.0.0", "3.0.0")):
        path = tmp / f"m{i}.onnx"
        path.write_bytes(mlp_onnx(hidden=128, seed=i))
        up = api.upload("/uploads", path, params={"filename": path.name})
        api.call("POST", f"/models/m/versions/{version}", {"upload": up["sha256"]})
    wait_until(lambda: all(v["status"] == "ready" for v in api.call("GET", "/models")), 180)
    token = api.call("POST", "/enroll-tokens", {"uses": args.devices, "expires_in_s": 3600})
    print(f"enrolling and starting {args.devices} simulated devices", flush=True)
    sim_log = (tmp / "sim.log").open("wb")
    procs.append(subprocess.Popen(
        [*CLI, "sim", "--devices", str(args.devices), "--controller", url, "--token",
         token["token"], "--fault", "m@3.0.0:error_rate=0.5"], stdout=sim_log,
        stderr=subprocess.STDOUT, env=env))
    if not wait_until(lambda: api.call("GET", "/fleet/summary")["by_status"]["online"]
                      >= args.devices, 300, interval=1):
        sys.exit(f"the fleet did not come online; see {tmp / 'sim.log'}")
    return procs, api


def run_rollout(api: Api, version: str, stages: str, timeout: float = 600) -> dict[str, Any]:
    started = time.monotonic()
    rid = api.call("POST", "/rollouts", {"model": "m", "version": version,
                                         "stages": stages})["id"]
    out: dict[str, Any] = {}

    def ended() -> bool:
        nonlocal out
        out = api.call("GET", f"/rollouts/{rid}")
        return out["state"] in ("completed", "rolled_back", "aborted", "paused")

    if not wait_until(ended, timeout, interval=0.25):
        sys.exit(f"m@{version} did not end within {timeout:.0f} s: {out['state']}, "
                 f"{out['counts']}")
    out["wall_s"] = time.monotonic() - started
    return out


def at(timeline: list[dict[str, Any]], prefix: str) -> datetime:
    return datetime.fromisoformat(next(e["at"] for e in timeline
                                       if e["reason"].startswith(prefix)))


def bare_round_trip(mqtt: str, n: int) -> float:
    """Seconds for a bare paho client to publish n retained messages to n topics and get
    n answers from a bare subscriber (the transport floor of giving n devices a state)."""
    import paho.mqtt.client as mqtt_client
    from paho.mqtt.enums import CallbackAPIVersion

    host, _, port = mqtt.removeprefix("mqtt://").rpartition(":")
    root = f"bench{secrets.token_hex(3)}"
    got = threading.Semaphore(0)
    answered = 0
    lock = threading.Lock()

    def make(name: str) -> Any:
        c = mqtt_client.Client(CallbackAPIVersion.VERSION2, client_id=f"{root}-{name}")
        c.connect(host, int(port))
        c.loop_start()
        return c

    device, controller = make("device"), make("controller")

    def on_desired(c: Any, _u: Any, msg: Any) -> None:
        c.publish(msg.topic.replace("/desired", "/reported"), msg.payload, qos=1)

    def on_reported(_c: Any, _u: Any, _msg: Any) -> None:
        nonlocal answered
        with lock:
            answered += 1
            if answered == n:
                got.release()

    device.on_message, controller.on_message = on_desired, on_reported
    device.subscribe(f"{root}/+/desired", qos=1)
    controller.subscribe(f"{root}/+/reported", qos=1)
    time.sleep(0.5)  # let both subscriptions settle (a benchmark, not a test)
    started = time.monotonic()
    for i in range(n):
        controller.publish(f"{root}/d{i}/desired", b'{"generation": 1}', qos=1, retain=True)
    got.acquire(timeout=60)
    elapsed = time.monotonic() - started
    for i in range(n):
        controller.publish(f"{root}/d{i}/desired", b"", qos=1, retain=True)
    for c in (device, controller):
        c.disconnect()
        c.loop_stop()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--mqtt", default=os.environ.get("EDGEFLEET_TEST_MQTT_URL",
                                                         "mqtt://127.0.0.1:1883"))
    parser.add_argument("--db", default=os.environ.get("EDGEFLEET_TEST_DATABASE_URL"))
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.db:  # the controller starts on an empty database
            args.db = stack.enter_context(scratch_schema(args.db, "bench"))
        tmp_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="edgefleet-bench-"))
        procs: list[subprocess.Popen[bytes]] = []
        try:
            procs, api = start(args, Path(tmp_dir), procs)
            first = run_rollout(api, "1.0.0", "100%")
            good = run_rollout(api, "2.0.0", "1%,10%,100%")
            bad = run_rollout(api, "3.0.0", "10%,100%")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
    canaries = bad["counts"]["assigned"]
    floor = bare_round_trip(args.mqtt, canaries)
    tl = good["timeline"]
    stages = [(at(tl, "start") if i == 0 else at(tl, f"promote: stage {i} "),
               at(tl, f"finish: stage {i + 1}") if i == 2 else at(tl, f"promote: stage {i + 1} "))
              for i in range(3)]
    rollback_s = (at(bad["timeline"], "reverted") - at(bad["timeline"], "rollback")
                  ).total_seconds()
    result = {
        "devices": args.devices, "broker": args.mqtt, "database": "postgresql" if args.db
        else "sqlite",
        "first_rollout_one_stage_s": round(first["wall_s"], 1),
        "three_stages_create_to_completed_s": round(
            (at(tl, "finish") - at(tl, "created")).total_seconds(), 1),
        "stage_s": [round((b - a).total_seconds(), 1) for a, b in stages],
        "good_state": good["state"], "good_counts": good["counts"],
        "bad_state": bad["state"],
        "bad_reason": next(e["reason"] for e in bad["timeline"]
                           if e["reason"].startswith("rollback")),
        "canaries_rolled_back": canaries,
        "rollback_failed_gate_to_all_reverted_s": round(rollback_s, 2),
        "bare_paho_round_trip_s": round(floor, 3),
    }
    rows = [("devices", args.devices),
            ("v1, one stage 100%: create -> completed", f"{first['wall_s']:.1f} s"),
            ("v2, 1%/10%/100% no bake: create -> completed",
             f"{result['three_stages_create_to_completed_s']} s ({good['state']})"),
            ("  per stage", " / ".join(f"{s} s" for s in result["stage_s"])),
            ("v3, failed gate -> every canary back", f"{rollback_s:.2f} s for {canaries} "
             f"canaries ({bad['state']})"),
            (f"bare paho: {canaries} retained out + answers back", f"{floor:.3f} s")]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    out = ROOT / "bench" / "results" / "rollout.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
