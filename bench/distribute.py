"""Model distribution and local inference, each beside its bare baseline, in one run.

(a) one device downloading a model over MQTT (chunked fetch, spooled to disk, TUF
    hash and length check) vs a bare paho publisher/subscriber moving the same bytes in
    the same chunks through the same broker; the receiving side of each in a process of
    its own, as in production (the metadata refresh before it is timed apart);
(b) N devices, running the agent's code in one process, given the same ONNX model at
    once (a one-stage rollout): time from creating the rollout until the controller has
    every device's report of it committed (downloaded, verified, staged, activated in
    onnxruntime, smoke-tested, through probation), and the controller's published
    bytes / (devices x model size);
(c) the agent's local inference API (HTTP -> model worker process) vs a bare
    onnxruntime ``InferenceSession.run`` on the same model and input, p50: a small MLP
    through the JSON API, and a 3x320x320 float32 image through the KServe v2 binary API
    and through the JSON API.

    python bench/distribute.py [--mqtt mqtt://127.0.0.1:1883] [--size-mib 50]
        [--fleet 200 --fleet-size-mib 20] [--trials 3]

Prints a table and writes bench/results/distribute.json.
"""

import argparse
import hashlib
import http.client
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.ports import free_port, wait_until  # noqa: E402

MIB = 1 << 20


def start_controller(tmp: Path, mqtt: str) -> Any:
    from fastapi.testclient import TestClient

    from controller.api.app import create_app
    from controller.runtime import Runtime
    from controller.settings import MqttUrl, Settings

    settings = Settings(data_dir=tmp / "controller", mqtt_url=MqttUrl.parse(mqtt),
                        topic_root=f"bench{secrets.token_hex(3)}/v1",
                        rollout_tick_s=0)  # the fleet bench ticks when it starts a rollout
    client = TestClient(create_app(settings, runtime=Runtime(settings)))
    client.__enter__()
    client.headers["Authorization"] = "Bearer " + (settings.data_dir / "admin-token").read_text()
    return client


def publish_blob(rt: Any, size: int) -> tuple[str, str]:
    """A random blob as a signed target (the registry's validation is not measured here)."""
    from tuf.api.metadata import TargetFile

    blob = rt.blobs.put_bytes(os.urandom(size))
    path = f"bench/{blob.sha256[:8]}.bin"
    target = TargetFile(blob.size, {"sha256": blob.sha256}, path,
                        unrecognized_fields={"custom": {"format": "bin"}})
    rt.trust.set_targets({**rt.trust.targets(), path: target}, now=datetime.now(UTC))
    return path, blob.sha256


def connect(links: list[Any]) -> bool:
    """Connect every link; True once all are connected (within a minute)."""
    for link in links:
        link.connect()
    return wait_until(lambda: all(link.client.is_connected() for link in links), 60, 0.05)


# -- (a) one device vs bare paho ----------------------------------------------------------
#
# As in production, the receiving side runs in a process of its own: the device (its
# MQTT link, TUF updater and spool) in one, the bare subscriber in another, each beside
# the sender (the controller, the bare publisher) in this process.

def bare_paho(mqtt: str, size: int, chunk: int) -> float:
    """Seconds for a bare paho publisher (here) to move ``size`` bytes in ``chunk``s
    (QoS 1) to a bare subscriber in another process, through the broker."""
    import paho.mqtt.client as mqtt_client
    from paho.mqtt.enums import CallbackAPIVersion

    host, _, port = mqtt.removeprefix("mqtt://").rpartition(":")
    topic = f"bench/bare/{secrets.token_hex(4)}"
    sub = subprocess.Popen([sys.executable, __file__, "--role", "bare-sub", "--mqtt", mqtt,
                            "--topic", topic, "--bytes", str(size)],
                           stdout=subprocess.PIPE, text=True)
    if sub.stdout is None or sub.stdout.readline().strip() != "subscribed":
        raise SystemExit("the bare subscriber did not subscribe")
    pub = mqtt_client.Client(CallbackAPIVersion.VERSION2)
    pub.max_inflight_messages_set(20)
    pub.connect(host, int(port))
    pub.loop_start()
    data = os.urandom(chunk)
    started = time.perf_counter()
    for _ in range(0, size, chunk):
        pub.publish(topic, data, qos=1)
    if sub.stdout.readline().strip() != "done":
        raise SystemExit("bare paho transfer did not finish")
    took = time.perf_counter() - started
    sub.wait(30)
    pub.disconnect()
    pub.loop_stop()
    return took


def bare_subscriber(mqtt: str, topic: str, size: int) -> None:
    """The bare subscriber's process: 'subscribed', then 'done' once ``size`` bytes came."""
    import paho.mqtt.client as mqtt_client
    from paho.mqtt.enums import CallbackAPIVersion

    host, _, port = mqtt.removeprefix("mqtt://").rpartition(":")
    got, done, subscribed = [0], threading.Event(), threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        got[0] += len(msg.payload)
        if got[0] >= size:
            done.set()

    sub = mqtt_client.Client(CallbackAPIVersion.VERSION2)
    sub.on_message = on_message
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    sub.connect(host, int(port))
    sub.loop_start()
    if subscribed.wait(30):
        print("subscribed", flush=True)
        if done.wait(300):
            print("done", flush=True)
    sub.disconnect()
    sub.loop_stop()


def device_process(enrolment: Path, state_dir: Path, chunk: int) -> None:
    """The device's process: for each 'TARGET SHA' line, refresh the TUF metadata and
    download the target; print the seconds each took (the hash is checked afterwards)."""
    from agent.config import Identity
    from agent.link import DeviceLink
    from agent.sim import PROFILES, sim_session

    identity = Identity.from_enrolment(json.loads(enrolment.read_text()))
    session = sim_session(identity, PROFILES["mixed"][2], random.Random(0))
    link = DeviceLink(identity, state_dir, session, chunk_size=chunk)
    print("connected" if connect([link]) else "not connected", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        target, sha = line.split()
        updater = link.updater()
        started = time.perf_counter()
        updater.refresh()
        refreshed = time.perf_counter()
        path = link.download(updater.get_targetinfo(target))  # as the installer does
        downloaded = time.perf_counter()
        ok = hashlib.sha256(path.read_bytes()).hexdigest() == sha
        path.unlink()
        print(json.dumps({"refresh_s": refreshed - started, "download_s": downloaded - refreshed,
                          "verified": ok}), flush=True)
    link.close()


def single(client: Any, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    rt = client.app.state.runtime
    size, chunk = args.size_mib * MIB, args.chunk_kib * 1024
    token = client.post("/api/v1/enroll-tokens", json={}).json()["token"]
    enrolment = tmp / "single-enrolment.json"
    enrolment.write_text(json.dumps(client.post("/api/v1/enroll",
                                                json={"token": token, "name": "single"}).json()))
    device = subprocess.Popen([sys.executable, __file__, "--role", "device", "--enrolment",
                               str(enrolment), "--state-dir", str(tmp / "single"),
                               "--chunk-kib", str(args.chunk_kib)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if device.stdin is None or device.stdout is None:
        raise SystemExit("the device's pipes are not open")
    if device.stdout.readline().strip() != "connected":
        raise SystemExit("the device did not connect")
    ours, bare, refresh = [], [], []
    try:
        for _ in range(args.trials):
            # a fresh blob per trial: a blob broadcast seconds ago is sent again only after
            # a short hold that gathers other late joiners (controller/fetch.py)
            target, sha = publish_blob(rt, size)
            device.stdin.write(f"{target} {sha}\n")
            device.stdin.flush()
            took = json.loads(device.stdout.readline())
            if not took["verified"]:
                raise SystemExit("a download did not verify")
            ours.append(size / MIB / took["download_s"])
            refresh.append(took["refresh_s"])
            bare.append(size / MIB / bare_paho(args.mqtt, size, chunk))
    finally:
        device.stdin.close()
        device.wait(30)
    ours_m, bare_m = statistics.median(ours), statistics.median(bare)
    return {"size_mib": args.size_mib, "chunk_kib": args.chunk_kib,
            "agent_mib_s": round(ours_m, 1), "bare_paho_mib_s": round(bare_m, 1),
            "ratio": round(ours_m / bare_m, 3),
            "metadata_refresh_s": round(statistics.median(refresh), 3),
            "trials": {"agent": ours, "bare": bare, "refresh_s": refresh}}


# -- (b) a fleet installing one model -------------------------------------------------------
#
# The devices run the agent's own code (MQTT link, TUF updater, installer, serving), a
# share of them in each of a few processes beside the controller's; each loads its model
# with onnxruntime in its process (``InProcessWorker``): 200 worker processes would
# measure process start-up on 2 cores.

def fleet_devices(enrolments: Path, state_dir: Path, chunk: int, probation_s: float) -> None:
    """The fleet's process: 'connected' once every device is, then install what the
    controller assigns until stdin closes."""
    from agent.config import Identity
    from agent.daemon import SessionReporter
    from agent.link import DeviceLink
    from agent.runtime import InProcessWorker
    from agent.serving import Serving
    from agent.sim import PROFILES, sim_session
    from agent.update.installer import Installer

    links, installers = [], []
    for i, raw in enumerate(json.loads(enrolments.read_text())):
        identity = Identity.from_enrolment(raw)
        session = sim_session(identity, PROFILES["mixed"][2], random.Random(i))
        link = DeviceLink(identity, state_dir / f"dev{i}", session, chunk_size=chunk)
        serving = Serving(worker=InProcessWorker)
        installer = Installer(link.state_dir, updater=link.updater, serving=serving,
                              download=link.download,
                              reporter=SessionReporter(session, link.client, serving.metrics),
                              probation_s=probation_s)
        link.progress = installer.progress
        session.generation = installer.install.generation
        session.on_desired = installer.want
        links.append(link)
        installers.append(installer)
    print("connected" if connect(links) else "not connected", flush=True)
    for installer in installers:
        installer.start()
    sys.stdin.read()
    for installer in installers:
        installer.stop()
    for link in links:
        link.close()


def until(check: Any, seconds: float, what: str) -> None:
    if not wait_until(check, seconds):
        raise SystemExit(f"{what} did not happen within {seconds:.0f} s")


def committed_times(client: Any, ids: list[str], started: float) -> list[float]:
    """Seconds from ``started`` until the controller had each device's report of
    fleet@1.0.0 committed (polled every 0.2 s)."""
    committed: dict[str, float] = {}

    def all_committed() -> bool:
        for d in client.get("/api/v1/devices", params={"limit": 10000}).json():
            r = d.get("reported") or {}
            if r.get("version") != "1.0.0":
                continue
            if r.get("state") in ("failed", "rolled_back"):
                raise SystemExit(f"device {d['name']}: {r['state']}: {r.get('detail')}")
            if r.get("state") == "committed":
                committed.setdefault(d["id"], time.perf_counter() - started)
        return len(committed) == len(ids)

    until(all_committed, 900, "every device committing fleet@1.0.0")
    return sorted(committed.values())


def phase_times(client: Any, ids: list[str], started_at: datetime) -> dict[str, float]:
    """From the devices' install events: when half and all had begun downloading and had
    downloaded (seconds after ``started_at``)."""
    began, downloaded = [], []
    for device_id in ids:
        first: dict[str, datetime] = {}
        for e in client.get(f"/api/v1/devices/{device_id}/events").json():
            first.setdefault(e["kind"], datetime.fromisoformat(e["at"]))
        began.append((first["downloading"] - started_at).total_seconds())
        downloaded.append((first["verifying"] - started_at).total_seconds())
    out = {}
    for name, times in (("downloading", sorted(began)), ("downloaded", sorted(downloaded))):
        out[f"seconds_until_half_{name}"] = round(times[len(times) // 2], 1)
        out[f"seconds_until_all_{name}"] = round(times[-1], 1)
    return out


def fleet(client: Any, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from cli.samples import mlp_onnx

    rt = client.app.state.runtime
    size = args.fleet_size_mib * MIB
    up = client.post("/api/v1/uploads", params={"filename": "fleet.onnx"},
                     content=mlp_onnx(hidden=size // (4 * (128 + 10)), seed=7)).json()
    # every device's smoke test runs on the same 2 cores here: a budget for the simulation
    client.post("/api/v1/models/fleet/versions/1.0.0", json={
        "upload": up["sha256"], "smoke_test": {"latency_budget_ms": 60_000}})
    until(lambda: client.get("/api/v1/models/fleet/versions/1.0.0").json()["status"]
          == "ready", 600, "building fleet@1.0.0")

    token = client.post("/api/v1/enroll-tokens", json={"uses": args.fleet}).json()["token"]
    enrolments = [client.post("/api/v1/enroll", json={"token": token, "name": f"b{i}",
                                                       "labels": {"bench": "fleet"}}).json()
                  for i in range(args.fleet)]
    procs = []
    for n in range(args.fleet_procs):  # several, so that one GIL is not the bottleneck
        part = tmp / f"fleet-enrolments-{n}.json"
        part.write_text(json.dumps(enrolments[n::args.fleet_procs]))
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--role", "fleet", "--enrolment", str(part),
             "--state-dir", str(tmp / f"fleet{n}"), "--chunk-kib", str(args.chunk_kib),
             "--probation", str(args.probation)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    try:
        for proc in procs:
            if proc.stdout is None or proc.stdout.readline().strip() != "connected":
                raise SystemExit("the fleet did not connect")
        until(lambda: sum(d["status"] == "online" and bool(d["capabilities"]) for d in
                          client.get("/api/v1/devices", params={"limit": 10000}).json()
                          if d["labels"].get("bench") == "fleet") == args.fleet, 120,
              "the fleet coming online")
        before, broadcast_before = rt.fetch.published_bytes, rt.fetch.broadcast_bytes
        started, started_at = time.perf_counter(), datetime.now(UTC)
        created = client.post("/api/v1/rollouts", json={
            "model": "fleet", "version": "1.0.0", "stages": "100%",
            "selector": {"bench": "fleet"}})
        if created.status_code != 201 or rt.tick_rollouts() != args.fleet:
            raise SystemExit(f"the rollout did not assign every device: {created.text}")
        assigned = time.perf_counter() - started
        times = committed_times(client, [e["device_id"] for e in enrolments], started)
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs:
            proc.wait(120)
    published = rt.fetch.published_bytes - before
    broadcast = rt.fetch.broadcast_bytes - broadcast_before
    phases = phase_times(client, [e["device_id"] for e in enrolments], started_at)
    return {"devices": args.fleet, "size_mib": round(up["size"] / MIB, 1),
            "processes": args.fleet_procs, "probation_s": args.probation,
            "seconds_to_assign_all": round(assigned, 2),
            **phases,
            "seconds_until_half_committed": round(times[len(times) // 2], 1),
            "seconds_until_all_committed": round(times[-1], 1),
            "published_mib": round(published / MIB, 1),
            "of_which_broadcast_mib": round(broadcast / MIB, 1),
            "published_over_devices_x_size": round(published / (args.fleet * up["size"]), 4)}


# -- (c) local inference vs bare onnxruntime -----------------------------------------------

def inference(tmp: Path, n: int) -> dict[str, Any]:
    """The small MLP through the JSON API, and a 3x320x320 float32 image through the
    KServe v2 binary API and the JSON API, each beside bare onnxruntime, interleaved."""
    import numpy as np

    from tests.models import image_onnx, tiny_onnx

    x = np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)
    small = _served(tmp / "small", tiny_onnx(), "mlp", {"x": x}, n, {
        "json": ("/v1/models/mlp/infer", json.dumps({"inputs": {"x": x.tolist()}}).encode(),
                 {"Content-Type": "application/json"})})
    img = np.random.default_rng(1).uniform(0, 1, (1, 3, 320, 320)).astype(np.float32)
    head = json.dumps({"inputs": [{"name": "image", "shape": list(img.shape),
                                   "datatype": "FP32",
                                   "parameters": {"binary_data_size": img.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    image = _served(tmp / "image", image_onnx(), "conv", {"image": img}, max(50, n // 20), {
        "binary": ("/v2/models/conv/infer", head + img.tobytes(),
                   {"Content-Type": "application/octet-stream",
                    "Inference-Header-Content-Length": str(len(head))}),
        "json": ("/v1/models/conv/infer", json.dumps({"inputs": {"image": img.tolist()}})
                 .encode(), {"Content-Type": "application/json"})})
    return {"requests": n, "agent_p50_ms": small["json_p50_ms"],
            "bare_ort_p50_ms": small["bare_ort_p50_ms"],
            "overhead_p50_ms": small["json_overhead_p50_ms"], "image_3x320x320": image}


def _served(model_dir: Path, model: bytes, name: str, feed: dict[str, Any], n: int,
            paths: dict[str, tuple[str, bytes, dict[str, str]]]) -> dict[str, Any]:
    """p50 of bare onnxruntime and of each API path on ``model``, in blocks of turns.

    Bare onnxruntime runs in a process of its own, as the model worker does: a session
    in the process that times the API (even one with idle threads) slowed the worker
    by several milliseconds on 2 cores, which no device has. Blocks alternate (bare,
    then each path, three times) so drifts in the machine fall on all alike."""
    from agent.serving import LocalApi, Serving
    from controller.registry.inputs import write_samples
    from tests.models import staged

    staged(model_dir, model, model=name)
    (model_dir / "feed.npz").write_bytes(write_samples([feed]))
    serving = Serving()
    serving.activate(model_dir)
    api = LocalApi(serving, "127.0.0.1", 0)
    api.start()
    conn = http.client.HTTPConnection("127.0.0.1", api.port)
    times: dict[str, list[float]] = {"bare_ort": [], **{k: [] for k in paths}}
    for _ in range(3):
        bare = subprocess.run([sys.executable, __file__, "--role", "bare-ort", "--model",
                               str(model_dir / "model.onnx"), "--feed",
                               str(model_dir / "feed.npz"), "--requests", str(n // 3)],
                              capture_output=True, text=True, check=True, timeout=600)
        times["bare_ort"] += json.loads(bare.stdout.splitlines()[-1])
        for kind, (path, body, headers) in paths.items():
            for _ in range(n // 3):
                started = time.perf_counter()
                conn.request("POST", path, body, headers)
                resp = conn.getresponse()
                resp.read()
                times[kind].append((time.perf_counter() - started) * 1000)
                if resp.status != 200:
                    raise RuntimeError(f"{path} answered {resp.status}")
    api.stop()
    serving.activate(None)
    p50 = {k: statistics.median(v) for k, v in times.items()}
    out: dict[str, Any] = {"requests": n, "bare_ort_p50_ms": round(p50["bare_ort"], 3)}
    for kind in paths:
        over = p50[kind] - p50["bare_ort"]
        out |= {f"{kind}_p50_ms": round(p50[kind], 3), f"{kind}_overhead_p50_ms": round(over, 3),
                f"{kind}_overhead_over_inference": round(over / p50["bare_ort"], 3)}
    return out


def bare_ort(model: Path, feed: Path, n: int) -> None:
    """Time ``n`` runs of a bare onnxruntime session and print the milliseconds of each
    as JSON."""
    import onnxruntime as ort

    from controller.registry.inputs import read_samples

    (given,) = read_samples(feed.read_bytes())
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    session.run(None, given)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        session.run(None, given)
        times.append((time.perf_counter() - started) * 1000)
    print(json.dumps(times))


def private_broker(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A Mosquitto on a free port with the recommended settings, anonymous (local only)."""
    import socket

    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                    "max_queued_messages 100000\n")
    binary = shutil.which("mosquitto")
    if binary is None:
        raise SystemExit("--private-broker needs the mosquitto binary")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    if not wait_until(listening, 10):
        raise SystemExit("the private mosquitto did not start")
    return proc, f"mqtt://127.0.0.1:{port}"


def peak_rss_mib(pid: int) -> float:
    """A process's peak resident memory (Linux), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mqtt", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--size-mib", type=int, default=50)
    parser.add_argument("--chunk-kib", type=int, default=256)
    parser.add_argument("--fleet", type=int, default=200)
    parser.add_argument("--fleet-size-mib", type=int, default=20)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--only", choices=["single", "fleet", "inference"])
    parser.add_argument("--private-broker", action="store_true",
                        help="measure through a Mosquitto of our own, started with the "
                        "settings the README recommends (set_tcp_nodelay, max_queued_messages)"
                        " instead of --mqtt")
    parser.add_argument("--fleet-procs", type=int, default=4,
                        help="processes the fleet's devices are spread over")
    parser.add_argument("--probation", type=float, default=1.0,
                        help="each fleet device's probation, seconds")
    parser.add_argument("--role", choices=["harness", "device", "fleet", "bare-sub",
                                           "bare-ort"],
                        default="harness")
    parser.add_argument("--enrolment", type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--feed", type=Path)
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--topic")
    parser.add_argument("--bytes", type=int)
    args = parser.parse_args()
    if args.role == "device":
        device_process(args.enrolment, args.state_dir, args.chunk_kib * 1024)
        return
    if args.role == "fleet":
        fleet_devices(args.enrolment, args.state_dir, args.chunk_kib * 1024, args.probation)
        return
    if args.role == "bare-ort":
        bare_ort(args.model, args.feed, args.requests)
        return
    if args.role == "bare-sub":
        bare_subscriber(args.mqtt, args.topic, args.bytes)
        return
    with tempfile.TemporaryDirectory(prefix="ef-bench-") as tmp_name:
        tmp = Path(tmp_name)
        broker = private_broker(tmp) if args.private_broker else None
        if broker is not None:
            args.mqtt = broker[1]
        results: dict[str, Any] = {"at": datetime.now(UTC).isoformat(), "mqtt": args.mqtt,
                                   "private_broker": args.private_broker,
                                   "chunk_kib": args.chunk_kib}
        if args.only in (None, "inference"):
            results["inference"] = inference(tmp, args.requests)
        if args.only in (None, "single", "fleet"):
            client = start_controller(tmp, args.mqtt)
            try:
                if args.only in (None, "single"):
                    results["single"] = single(client, tmp, args)
                if args.only in (None, "fleet"):
                    results["fleet"] = fleet(client, tmp, args)
            finally:
                client.__exit__(None, None, None)
        if broker is not None:
            results["broker_peak_rss_mib"] = peak_rss_mib(broker[0].pid)
            broker[0].terminate()
            broker[0].wait(10)
    report(results)


def report(results: dict[str, Any]) -> None:
    for part, figures in results.items():
        if not isinstance(figures, dict):
            print(f"{part:34} {figures}")
        else:
            print(f"\n{part}")
            for key, value in figures.items():
                if key != "trials":
                    print(f"  {key:32} {value}")
    out = ROOT / "bench" / "results" / "distribute.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
