"""Health-report ingestion: the controller vs a bare paho subscriber, same broker, same run.

A publisher process plays N devices, each sending health reports (the agent's real
payloads) on its own topic, at a rising rate in steps. Each step waits until the
receiver has everything (or the receiver falls behind: saturation). The receiver is
either a bare paho subscriber that only counts, or the real controller runtime, which
decodes, batches and commits every report to the database (counted as committed).

For each broker (Mosquitto from --mqtt, and the embedded broker) it prints the highest
rate each receiver sustained with nothing lost, the ratio controller/bare, and the
reports lost at sustained rates; and writes JSON to bench/results/ingest.json.

    python bench/ingest.py --devices 2000 [--mqtt mqtt://127.0.0.1:1883] [--db URL] [--trials 3]
"""

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BENCH_USER = ("bench", secrets.token_urlsafe(16))


def device_ids(n: int) -> list[str]:
    return [f"dev-bench{i:06d}" for i in range(n)]


# -- publisher (a subprocess) -------------------------------------------------------------

def publisher(args: argparse.Namespace) -> None:
    """Publish steps of health reports, one step per 'go' line on stdin."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from shared.messages import Health, encode
    from shared.topics import Kind, Topics

    topics = Topics(args.topic_root)
    ids = device_ids(args.devices)
    targets = [topics.device(d, Kind.HEALTH) for d in ids]
    host, _, port = args.broker.removeprefix("mqtt://").rpartition(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}")
    if args.username:
        client.username_pw_set(args.username, args.password)
    client.max_queued_messages_set(0)
    client.connect(host, int(port), keepalive=60)
    client.loop_start()
    now = datetime.now(UTC)
    payloads = [encode(Health(seq=seq, sent_at=now, cpu_percent=12.5, mem_used_bytes=1 << 29,
                              mem_total_bytes=1 << 31, disk_free_bytes=1 << 34,
                              temperature_c=48.5)) for seq in range(1000)]
    seq = 0
    for line in sys.stdin:
        rate = float(line.split()[1]) if line.startswith("go") else 0
        if not rate:
            break
        count = int(rate * args.step)
        started = time.monotonic()
        for i in range(count):
            seq += 1
            client.publish(targets[seq % len(targets)], payloads[seq % 1000], qos=0)
            if i % 50 == 0:  # pace in small bursts
                ahead = started + i / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        print(json.dumps({"sent": count, "started": started, "ended": time.monotonic()}),
              flush=True)
    client.disconnect()
    client.loop_stop()


# -- receivers ----------------------------------------------------------------------------

class BareReceiver:
    """A paho subscriber that only counts: the baseline."""

    name = "bare paho"

    def __init__(self, broker: str, topic_root: str, creds: tuple[str, str] | None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.count = 0
        self._ready = threading.Event()
        host, _, port = broker.removeprefix("mqtt://").rpartition(":")
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-bare-{os.getpid()}")
        if creds:
            c.username_pw_set(*creds)

        def on_connect(client: Any, *_: Any) -> None:
            client.subscribe(f"{topic_root}/dev/+/health", qos=1)

        def on_message(*_: Any) -> None:
            self.count += 1

        c.on_connect = on_connect
        c.on_subscribe = lambda *_: self._ready.set()
        c.on_message = on_message
        c.connect(host, int(port), keepalive=60)
        c.loop_start()
        self._client = c
        if not self._ready.wait(15):
            raise RuntimeError("bare subscriber did not subscribe")

    def received(self) -> int:
        return self.count

    def pids(self) -> list[int]:
        return [os.getpid()]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class ControllerReceiver:
    """The real controller runtime; counts reports committed to the database."""

    name = "controller"

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def received(self) -> int:
        return int(self.runtime.ingestor.stats.persisted)

    def pids(self) -> list[int]:
        return [os.getpid(), self.runtime.ingestor.pid]

    def rows(self) -> int:
        from sqlalchemy import func, select

        from controller.db.models import HealthBatch

        with self.runtime.session_factory() as s:
            return int(s.scalar(select(func.sum(HealthBatch.count))) or 0)

    def close(self) -> None:
        self.runtime.stop()


def start_controller(*, mqtt_url: str | None, db_url: str | None, topic_root: str,
                     devices: int, data_dir: Path, broker_port: int) -> Any:
    from controller.db.engine import transaction
    from controller.db.models import Device, utcnow
    from controller.runtime import Runtime
    from controller.settings import HostPort, MqttUrl, Settings

    settings = Settings(data_dir=data_dir, database_url=db_url,
                        mqtt_url=MqttUrl.parse(mqtt_url) if mqtt_url else None,
                        broker_listen=HostPort("127.0.0.1", broker_port), topic_root=topic_root,
                        keepalive_s=60, health_interval_s=3600)
    runtime = Runtime(settings)
    runtime.start()
    now = utcnow()
    with transaction(runtime.session_factory) as s:
        s.add_all(Device(id=d, name=d, labels={}, mqtt_secret_hash="-",  # noqa: S106 - no login
 enrolled_at=now,
                         status="online", health_count=0) for d in device_ids(devices))
    for d in device_ids(devices):
        runtime.known.add(d)
    runtime.policy.add_service_user(*BENCH_USER)
    return runtime


# -- the measurement ----------------------------------------------------------------------

@dataclass
class Step:
    offered: float
    sent: int
    delivered: int
    seconds: float  # from the step's first publish to its last delivery

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0


@dataclass
class Result:
    broker: str
    receiver: str
    sustained_rate: float = 0.0  # highest rate delivered completely and on time
    peak_rate: float = 0.0  # highest delivered rate in any step
    lost_at_sustained: int = 0
    cpu_us_per_report: float = 0.0  # receiver processes' CPU (user+system) per report
    cpu_us_by_process: list[float] = field(default_factory=list)  # receiving, then worker
    steps: list[dict[str, float]] = field(default_factory=list)


def measure(receiver: Any, *, broker_label: str, broker: str, topic_root: str, devices: int,
            creds: tuple[str, str] | None, start_rate: float, factor: float, step_s: float,
            max_steps: int) -> Result:
    cmd = [sys.executable, __file__, "--role", "publisher", "--broker", broker,
           "--topic-root", topic_root, "--devices", str(devices), "--step", str(step_s)]
    if creds:
        cmd += ["--username", creds[0], "--password", creds[1]]
    pub = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    result = Result(broker_label, receiver.name)
    base = receiver.received()
    cpu_before = [cpu_seconds(pid) for pid in receiver.pids()]
    total_sent = 0
    rate = start_rate
    try:
        for _ in range(max_steps):
            if pub.stdin is None or pub.stdout is None:
                raise RuntimeError("publisher pipes are not open")
            pub.stdin.write(f"go {rate}\n")
            pub.stdin.flush()
            info = json.loads(pub.stdout.readline())
            total_sent += info["sent"]
            target = base + total_sent
            deadline = info["ended"] + max(1.0, step_s * 0.25)
            while receiver.received() < target and time.monotonic() < deadline:
                time.sleep(0.005)
            done_at = time.monotonic()
            got = receiver.received()
            complete = got >= target
            delivered = info["sent"] - (target - got) if not complete else info["sent"]
            step = Step(rate, info["sent"], delivered, done_at - info["started"])
            on_time = complete and step.rate >= 0.9 * rate  # kept up, not just caught up
            result.steps.append({"offered": rate, "sent": step.sent, "delivered": step.delivered,
                                 "rate": round(step.rate, 1), "complete": complete,
                                 "kept_up": on_time})
            result.peak_rate = max(result.peak_rate, step.rate)
            print(f"  {broker_label:9} {receiver.name:10} offered {rate:8.0f}/s  "
                  f"delivered {step.rate:8.0f}/s  {'ok' if on_time else 'SATURATED'}",
                  flush=True)
            if not on_time:
                break
            result.sustained_rate = max(result.sustained_rate, step.rate)
            rate *= factor
        else:
            print(f"  {receiver.name} kept up with every step: not saturated, the ratio is "
                  "a bound only (raise --max-steps)", flush=True)
        if pub.stdin is not None:
            pub.stdin.write("stop\n")
            pub.stdin.flush()
        pub.wait(30)
    finally:
        if pub.poll() is None:
            pub.kill()
    reports = max(1, receiver.received() - base)
    cpu = [cpu_seconds(pid) - before for pid, before in zip(receiver.pids(), cpu_before,
                                                             strict=True)]
    result.cpu_us_per_report = round(sum(cpu) / reports * 1e6, 1)
    result.cpu_us_by_process = [round(c / reports * 1e6, 1) for c in cpu]
    sustained_sent = sum(s["sent"] for s in result.steps if s["kept_up"])
    sustained_got = sum(s["delivered"] for s in result.steps if s["kept_up"])
    result.lost_at_sustained = sustained_sent - sustained_got
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_trial(url: str | None, common: dict[str, Any]) -> Result:
    from cli.ports import free_port
    from controller.broker import BrokerPolicy, EmbeddedBroker
    from controller.settings import HostPort
    from shared.topics import Topics

    root = f"bench/{secrets.token_hex(4)}/ef/v1"
    embedded = None
    creds: tuple[str, str] | None = None
    broker = url or ""
    if url is None:
        policy = BrokerPolicy(Topics(root))
        policy.add_service_user(*BENCH_USER)
        embedded = EmbeddedBroker(HostPort("127.0.0.1", free_port()), policy)
        embedded.start()
        broker, creds = f"mqtt://127.0.0.1:{embedded.listen.port}", BENCH_USER
    bare = BareReceiver(broker, root, creds)
    try:
        return measure(bare, broker=broker, topic_root=root, creds=creds, **common)
    finally:
        bare.close()
        if embedded:
            embedded.stop()


def controller_trial(url: str | None, db: str | None, common: dict[str, Any]) -> Result:
    from cli.ports import free_port

    root = f"bench/{secrets.token_hex(4)}/ef/v1"
    port = free_port()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        if db:  # each trial starts on an empty schema of its own
            from controller.db.engine import scratch_schema

            db = stack.enter_context(scratch_schema(db, "bench"))
        runtime = start_controller(mqtt_url=url, db_url=db, topic_root=root,
                                   devices=common["devices"], data_dir=Path(tmp),
                                   broker_port=port)
        receiver = ControllerReceiver(runtime)
        try:
            res = measure(receiver, broker=url or f"mqtt://127.0.0.1:{port}", topic_root=root,
                          creds=None if url else BENCH_USER, **common)
            rows = receiver.rows()
            if rows != receiver.received():
                raise SystemExit(f"row count {rows} != committed count {receiver.received()}")
            return res
        finally:
            receiver.close()


def run(args: argparse.Namespace) -> list[Result]:
    """Bare and controller trials, interleaved, so drift on the machine hits both alike."""
    brokers = []
    if args.mqtt:
        brokers.append(("mosquitto", args.mqtt, args.start_rate))
    if not args.no_embedded:
        brokers.append(("embedded", None, args.embedded_start_rate))
    results = []
    for label, url, start_rate in brokers:
        common = {"devices": args.devices, "factor": args.factor, "step_s": args.step,
                  "max_steps": args.max_steps, "start_rate": start_rate, "broker_label": label}
        for _ in range(args.trials):
            results.append(bare_trial(url, common))
            results.append(controller_trial(url, args.db, common))
    return results


def report(results: list[Result], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    db = "PostgreSQL" if args.db and "postgres" in args.db else "SQLite"
    table = Table(title=f"health ingestion, {args.devices} devices, db {db}, "
                        f"median of {args.trials} interleaved trials")
    for col in ("broker", "receiver", "sustained/s", "trials", "vs bare", "paired",
                "lost", "CPU µs/report"):
        table.add_column(col, justify="right")
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.broker, r.receiver), []).append(r)
    summary = []
    for (broker, receiver), rs in groups.items():
        rate = statistics.median(r.sustained_rate for r in rs)
        bares = groups[(broker, "bare paho")]
        bare = statistics.median(r.sustained_rate for r in bares)
        # Each trial against the bare trial run just before it: drift on the machine
        # between pairs cancels out of these ratios.
        paired = statistics.median(r.sustained_rate / b.sustained_rate
                                   for r, b in zip(rs, bares, strict=True))
        cpu = statistics.median(r.cpu_us_per_report for r in rs)
        lost = sum(r.lost_at_sustained for r in rs)
        table.add_row(broker, receiver, f"{rate:,.0f}",
                      " ".join(f"{r.sustained_rate / 1000:.1f}k" for r in rs),
                      f"{rate / bare:.0%}", f"{paired:.0%}", str(lost), f"{cpu:.0f}")
        summary.append({"broker": broker, "receiver": receiver, "median_sustained": rate,
                        "ratio_vs_bare": round(rate / bare, 3),
                        "median_paired_ratio": round(paired, 3), "lost_at_sustained": lost,
                        "median_cpu_us_per_report": cpu})
    Console().print(table)
    print("sustained: highest offered rate delivered completely at >= 90% of the offer; "
          "vs bare: ratio of the medians; paired: median of each trial's ratio to the bare "
          "trial run just before it; lost: reports missing at sustained rates; CPU: the "
          "receiving processes "
          "(with the embedded broker, the broker too)")
    path = ROOT / "bench" / "results" / "ingest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"devices": args.devices, "db": db, "summary": summary,
                                "trials": [asdict(r) for r in results]}, indent=2))
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--role", default="harness", choices=["harness", "publisher"])
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--mqtt", default=os.environ.get("EDGEFLEET_TEST_MQTT_URL",
                                                    "mqtt://127.0.0.1:1883"),
                   help="external broker to measure ('' to skip)")
    p.add_argument("--db", default=None, help="controller database URL (default: SQLite)")
    p.add_argument("--no-embedded", action="store_true")
    p.add_argument("--trials", type=int, default=3, help="interleaved trials per receiver")
    p.add_argument("--start-rate", type=float, default=8000, help="first offered rate")
    p.add_argument("--embedded-start-rate", type=float, default=500,
                   help="first offered rate through the embedded broker")
    p.add_argument("--factor", type=float, default=1.1, help="rate growth per step")
    p.add_argument("--step", type=float, default=3.0, help="seconds per rate step")
    p.add_argument("--max-steps", type=int, default=40,
                   help="a receiver that keeps up with every step was not saturated: raise it")
    # publisher role
    p.add_argument("--broker")
    p.add_argument("--topic-root")
    p.add_argument("--username")
    p.add_argument("--password")
    args = p.parse_args()
    if args.role == "publisher":
        publisher(args)
        return
    report(run(args), args)


if __name__ == "__main__":
    main()
