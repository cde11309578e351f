"""Batched ingestion of device messages, on both databases."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from controller.db.engine import make_engine, session_factory, transaction, upgrade
from controller.db.models import Device, HealthBatch
from controller.ingest import (
    BatchWriter,
    Inbound,
    adopt_install_outcomes,
    apply_batch,
    mark_stale_offline,
)
from shared.messages import (
    Capabilities,
    DesiredState,
    Health,
    Hello,
    Presence,
    ReportedState,
    encode,
)
from shared.topics import Kind
from tests.conftest import wait_for

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.fixture
def factory(db_url: str):
    engine = make_engine(db_url)
    upgrade(engine)
    factory = session_factory(engine)
    with transaction(factory) as s:
        for i in range(3):
            s.add(Device(id=f"d{i}", name=f"d{i}", labels={"site": "a"}, mqtt_secret_hash="x",
                         enrolled_at=T0, status="enrolled", health_count=0))
    yield factory
    engine.dispose()


def health(seq: int, at: datetime = T0) -> Health:
    return Health(seq=seq, sent_at=at, cpu_percent=1.5, mem_used_bytes=1, mem_total_bytes=2,
                  disk_free_bytes=3)


def presence(state: str) -> Presence:
    return Presence(state=state, since=T0)  # type: ignore[arg-type]


def item(device: str, msg, at: datetime = T0) -> Inbound:
    kind = {Health: Kind.HEALTH, Presence: Kind.PRESENCE, Hello: Kind.HELLO}[type(msg)]
    return Inbound(device, kind, msg, at.timestamp(), encode(msg))


def stored(s) -> list[dict]:
    """Every stored report, in order: {"d": device, "t": time, "r": report}."""
    return [e for b in s.scalars(select(HealthBatch).order_by(HealthBatch.id)) for e in b.entries()]


def test_a_batch_persists_every_health_report_and_the_latest_state(factory) -> None:
    t1 = T0 + timedelta(seconds=1)
    batch = [item("d0", presence("online")), item("d0", health(1)), item("d0", health(2), t1),
             item("d1", health(1)), item("d1", presence("offline"), t1)]
    with transaction(factory) as s:
        assert apply_batch(s, batch) == 5
    with factory() as s:
        assert [(e["d"], e["r"]["seq"]) for e in stored(s)] == [("d0", 1), ("d0", 2), ("d1", 1)]
        assert stored(s)[1]["t"] == t1.timestamp()
        batch_row = s.scalar(select(HealthBatch))
        assert (batch_row.count, batch_row.received_from, batch_row.received_to) == (3, T0, t1)
        d0, d1, d2 = (s.get(Device, f"d{i}") for i in range(3))
        assert (d0.status, d0.health_count, d0.last_health["seq"], d0.last_seen_at) == (
            "online", 2, 2, t1)
        assert (d1.status, d1.health_count) == ("offline", 1)  # the later presence wins
        assert d2.status == "enrolled"
        assert d2.health_count == 0


def test_hello_records_capabilities_and_merges_labels(factory) -> None:
    caps = Capabilities(arch="arm64", cpu_count=4, ram_bytes=1 << 30, disk_free_bytes=1)
    hello = Hello(agent_version="9.9", capabilities=caps, labels={"room": "b"}, sent_at=T0)
    with transaction(factory) as s:
        apply_batch(s, [item("d2", hello)])
    with factory() as s:
        d2 = s.get(Device, "d2")
        assert d2.capabilities["arch"] == "arm64"
        assert d2.labels == {"site": "a", "room": "b"}
        assert (d2.status, d2.agent_version) == ("online", "9.9")


def test_silent_devices_are_marked_offline(factory) -> None:
    with transaction(factory) as s:
        apply_batch(s, [item("d0", health(1)), item("d1", health(1), T0 + timedelta(seconds=50))])
    with transaction(factory) as s:
        n = mark_stale_offline(s, now=T0 + timedelta(seconds=60), silent_for=timedelta(seconds=30))
    assert n == 1
    with factory() as s:
        assert [s.get(Device, d).status for d in ("d0", "d1")] == ["offline", "online"]


def test_a_deleted_device_does_not_block_the_batch(factory) -> None:
    with transaction(factory) as s:
        apply_batch(s, [item("gone", health(1)), item("d0", health(1))])
    with factory() as s:
        assert [e["d"] for e in stored(s)] == ["gone", "d0"]  # kept verbatim, as received
        assert s.get(Device, "d0").health_count == 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_writer_holds_device_rows_until_the_flush_is_due(factory) -> None:
    clock = Clock()
    writer = BatchWriter(factory, device_flush=1.0, clock=clock)
    writer.write([item("d0", health(1)), item("d0", health(2))])
    with factory() as s:
        assert len(stored(s)) == 2
        assert s.get(Device, "d0").health_count == 0
    clock.now = 1.5
    writer.write([])
    with factory() as s:
        assert s.get(Device, "d0").health_count == 2
    assert not writer.has_pending


def test_a_device_back_from_offline_is_online_since_its_first_report(factory) -> None:
    clock = Clock()
    writer = BatchWriter(factory, device_flush=1.0, clock=clock)
    writer.write([item("d0", presence("online")), item("d1", presence("online"))])  # urgent
    t5, t6 = T0 + timedelta(seconds=5), T0 + timedelta(seconds=6)
    writer.write([item("d0", presence("offline"), t5)])
    writer.write([item("d0", health(1, t6), t6), item("d1", health(1, t6), t6)])
    writer.write([item("d0", health(2, t6 + timedelta(seconds=1)), t6 + timedelta(seconds=1))])
    clock.now = 1.5
    writer.write([])
    with factory() as s:
        d0, d1 = s.get(Device, "d0"), s.get(Device, "d1")
        assert (d0.status, d0.status_since, d0.last_health["seq"]) == ("online", t6, 2)
        assert (d1.status, d1.status_since) == ("online", T0)  # a report changes nothing


def test_a_failed_write_is_retried_not_dropped(factory, monkeypatch) -> None:
    from controller import ingest

    real, calls = ingest.apply_batch, []

    def flaky(session, items, **kwargs):
        calls.append(len(items))
        if len(calls) == 2:
            raise ConnectionError("database went away")
        return real(session, items, **kwargs)

    monkeypatch.setattr(ingest, "apply_batch", flaky)
    clock = Clock()
    writer = BatchWriter(factory, device_flush=1.0, retry_delay=0, clock=clock)
    writer.write([item("d0", health(1))])  # written; its device delta waits for the flush
    clock.now = 2.0
    assert writer.write([item("d0", health(2))])  # fails once, then is retried
    assert (writer.stats.write_failures, writer.stats.persisted) == (1, 2)
    with factory() as s:
        assert [e["r"]["seq"] for e in stored(s)] == [1, 2]
        assert s.get(Device, "d0").health_count == 2  # the pending delta survived the failure


def test_ingest_process_decodes_writes_and_counts(factory, db_url) -> None:
    from controller.ingest_process import IngestProcess

    proc = IngestProcess(db_url, linger=0.01, device_flush=0.2)
    proc.start()
    try:
        for seq in range(3000):
            proc.submit(f"d{seq % 3}", "health", encode(health(seq)), T0.timestamp())
        proc.submit("d0", "health", b'{"seq": "not a number"}', T0.timestamp())
        proc.submit("d1", "presence", b"\xff" * 5000, T0.timestamp())  # over the size cap
        wait_for(lambda: proc.stats.persisted == 3000, 60, "3000 reports persisted")
        wait_for(lambda: proc.stats.malformed == 2, 10, "the malformed messages counted")
        assert proc.stats.batches < 3000 / 10  # batched, not a transaction per message
    finally:
        proc.stop()
    with factory() as s:
        assert sorted(e["r"]["seq"] for e in stored(s)) == list(range(3000))
        assert s.scalar(select(func.sum(HealthBatch.count))) == 3000
        assert sum(s.get(Device, f"d{i}").health_count for i in range(3)) == 3000


def test_a_killed_ingest_worker_is_replaced_and_ingestion_goes_on(factory, db_url) -> None:
    import os
    import signal

    from controller.ingest_process import IngestProcess

    proc = IngestProcess(db_url, linger=0.01, device_flush=0.1)
    proc.start()
    try:
        proc.submit("d0", "health", encode(health(1)), T0.timestamp())
        wait_for(lambda: proc.stats.persisted == 1, 60, "the first report")
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: not proc.alive, 10, "the worker to die")
        proc.submit("d0", "health", encode(health(2)), T0.timestamp())
        wait_for(lambda: proc.stats.persisted == 2, 60, "the report after the restart")
        assert proc.restarts == 1
    finally:
        proc.stop()
    with factory() as s:
        assert [e["r"]["seq"] for e in stored(s)] == [1, 2]


def test_an_install_outcome_whose_report_was_lost_is_taken_from_health(factory) -> None:
    desired = DesiredState(device_id="d", generation=2, model="m", version="2.0.0",
                           variant="int8", target="t", issued_at=T0).model_dump(mode="json")
    old = {"generation": 1, "model": "m", "version": "1.0.0", "variant": "source",
           "state": "committed", "detail": ""}

    def outcome(generation: int, state: str, reason: str = "") -> dict:
        return {"seq": 9, "install_generation": generation, "install_state": state,
                "install_reason": reason}

    with transaction(factory) as s:
        for device, health in (("d0", outcome(2, "rolled_back", "smoke_test_failed: x")),
                               ("d1", outcome(2, "downloading")),  # not finished yet
                               ("d2", outcome(1, "committed"))):  # not the desired generation
            row = s.get(Device, device)
            row.desired_generation, row.desired, row.reported = 2, desired, old
            row.last_health = health
    with transaction(factory) as s:
        assert adopt_install_outcomes(s) == 1
    with transaction(factory) as s:
        assert adopt_install_outcomes(s) == 0  # done once
        assert s.get(Device, "d0").reported == ReportedState(  # as if it had arrived
            generation=2, model="m", version="2.0.0", variant="int8", state="rolled_back",
            detail="smoke_test_failed: x").model_dump(mode="json")
        assert s.get(Device, "d1").reported == old
        assert s.get(Device, "d2").reported == old
