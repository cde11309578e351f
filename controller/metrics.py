"""Prometheus metrics of the controller, served at ``/metrics``.

Fleet figures (devices by state, class and model version; active rollouts) are read
from the database when Prometheus scrapes, from the same census the fleet summary
uses, so the two always agree. Counters of this process (ingestion, the MQTT bridge)
are read from the objects that keep them. Latencies are histograms observed where
they happen: each database statement of the API and scheduler, and each QoS 1
publish from hand-over to the broker's acknowledgement.

Each Runtime has its own registry: nothing here is global, so several controllers
in one test process do not collide.
"""

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import event, func, select
from sqlalchemy.engine import Engine

from controller import fleet
from controller.db.models import Rollout, RolloutMember
from controller.rollouts.machine import ACTIVE

if TYPE_CHECKING:
    from controller.runtime import Runtime

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0)


class Metrics:
    """The registry of one controller and the histograms it observes into."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.db_seconds = Histogram(
            "edgefleet_db_statement_seconds", "Database statements of the API and scheduler.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.mqtt_publish_seconds = Histogram(
            "edgefleet_mqtt_publish_seconds",
            "QoS 1 publishes from hand-over to the broker's acknowledgement.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)

    def watch_engine(self, engine: Engine) -> None:
        """Time every statement run on ``engine``."""
        starts: dict[int, float] = {}

        def before(_conn: Any, cursor: Any, *_args: Any) -> None:
            starts[id(cursor)] = time.perf_counter()

        def after(_conn: Any, cursor: Any, *_args: Any) -> None:
            started = starts.pop(id(cursor), None)
            if started is not None:
                self.db_seconds.observe(time.perf_counter() - started)

        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)

    def collect_from(self, runtime: "Runtime") -> None:
        self.registry.register(FleetCollector(runtime))


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class FleetCollector(Collector):
    """Reads the fleet and the process counters at scrape time."""

    def __init__(self, runtime: "Runtime") -> None:
        self._rt = runtime

    def describe(self) -> list[Any]:
        return []  # else registering would run collect(), before the database exists

    def collect(self) -> Iterator[Any]:
        rt = self._rt
        with rt.session_factory() as session:
            census = fleet.census(session)
            rollouts = session.execute(
                select(Rollout.id, Rollout.model_name, Rollout.version, Rollout.state,
                       Rollout.stage, Rollout.stages)
                .where(Rollout.state.in_([s.value for s in ACTIVE]))).all()
            members = session.execute(
                select(RolloutMember.rollout_id, RolloutMember.outcome,
                       RolloutMember.assigned_at.is_not(None), func.count())
                .where(RolloutMember.left_at.is_(None),
                       RolloutMember.rollout_id.in_([r[0] for r in rollouts]))
                .group_by(RolloutMember.rollout_id, RolloutMember.outcome,
                          RolloutMember.assigned_at.is_not(None))).all()
        devices = _gauge("edgefleet_devices", "Devices by status, class and the model version "
                         "they report running (model 'none': no model).",
                         ["status", "device_class", "model", "version"])
        for (status, cls, ref), n in sorted(census.items()):
            model, _, version = ref.partition("@")
            devices.add_metric([status, cls, model, version or "none"], n)
        yield devices
        yield from _rollout_metrics(rollouts, members)
        yield from _counters(rt)


def _rollout_metrics(rollouts: Sequence[Any], members: Sequence[Any]) -> Iterator[Any]:
    info = _gauge("edgefleet_rollout_info", "Active rollouts (1 each), with their state.",
                  ["rollout", "model", "version", "state"])
    stage = _gauge("edgefleet_rollout_stage", "Current stage of an active rollout (1-based).",
                   ["rollout"])
    stages = _gauge("edgefleet_rollout_stages", "Number of stages of an active rollout.",
                    ["rollout"])
    devices = _gauge("edgefleet_rollout_devices",
                     "Devices of an active rollout by outcome ('waiting': not yet assigned).",
                     ["rollout", "outcome"])
    for rid, model, version, state, index, plan in rollouts:
        info.add_metric([rid, model, version, state], 1)
        stage.add_metric([rid], index + 1)
        stages.add_metric([rid], len(plan))
    for rid, outcome, assigned, n in members:
        devices.add_metric([rid, outcome if assigned else "waiting"], n)
    yield from (info, stage, stages, devices)


def _counters(rt: "Runtime") -> Iterator[Any]:
    ingest = rt.ingestor.stats
    counters: list[tuple[str, str, Callable[[], int]]] = [
        ("edgefleet_ingest_received", "Device messages handed to ingestion.",
         lambda: ingest.received),
        ("edgefleet_ingest_persisted", "Device messages committed to the database.",
         lambda: ingest.persisted),
        ("edgefleet_ingest_batches", "Ingestion transactions committed.", lambda: ingest.batches),
        ("edgefleet_ingest_write_failures", "Ingestion transactions that failed (retried).",
         lambda: ingest.write_failures),
        ("edgefleet_ingest_malformed", "Device messages dropped as malformed.",
         lambda: ingest.malformed),
        ("edgefleet_ingest_dropped_backlog", "Device messages dropped: ingestion too far "
         "behind.", lambda: ingest.dropped_backlog),
        ("edgefleet_ingest_worker_restarts", "Ingest worker processes replaced after dying.",
         lambda: rt.ingestor.restarts),
    ]
    bridge = rt.bridge
    if bridge is not None:
        counters += [
            ("edgefleet_mqtt_dropped_unknown", "Messages from devices not enrolled.",
             lambda: bridge.dropped_unknown),
            ("edgefleet_mqtt_dropped_malformed", "Messages on unexpected topics.",
             lambda: bridge.dropped_malformed),
        ]
    fetch = rt.fetch
    if fetch is not None:
        counters += [
            ("edgefleet_fetch_published_bytes", "Bytes of metadata and models this controller "
             "sent to devices (answers and broadcasts).", lambda: fetch.published_bytes),
            ("edgefleet_fetch_broadcast_bytes", "Of those, bytes broadcast on blob topics "
             "(one publish for every device fetching the same model).",
             lambda: fetch.broadcast_bytes),
        ]
    for name, doc, value in counters:
        family = CounterMetricFamily(name, doc)
        family.add_metric([], value())
        yield family
    up = GaugeMetricFamily("edgefleet_mqtt_connected", "1 while connected to the broker.")
    up.add_metric([], 1 if rt.mqtt_connected() else 0)
    yield up
