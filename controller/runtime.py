"""The controller's running parts, built from Settings and started/stopped together.

Start order: data dir, database (migrated), keys, embedded broker (if no --mqtt),
job runner, ingestor, MQTT bridge, scheduler. Stop runs the other way round.
"""

import gc
import logging
import os
import secrets
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from controller import delivery
from controller.bridge import Bridge, Sink
from controller.broker import BrokerPolicy, EmbeddedBroker
from controller.db.engine import make_engine, session_factory, transaction, upgrade
from controller.db.models import Device, utcnow
from controller.dynsec import RESPONSE, DynamicSecurity, DynsecError
from controller.fetch import FetchServer
from controller.ingest import adopt_install_outcomes, mark_stale_offline
from controller.ingest_process import IngestProcess
from controller.leader import Leadership
from controller.metrics import Metrics
from controller.registry.blobs import BlobStore
from controller.registry.jobs import JobRunner
from controller.registry.service import publish_targets, referenced_blobs
from controller.registry.trust import TrustRepository
from controller.rollouts import service as rollouts
from controller.security import ensure_admin_token, write_secret_file
from controller.settings import MqttUrl, Settings
from shared.envelope import Signer, public_key_to_text
from shared.topics import Kind, Topics

log = logging.getLogger(__name__)

CONTROLLER_USER = "edgefleet-controller"
UNKNOWN_RECHECK_S = 5.0


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key at ``path`` (PEM, 0600), created on first use."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_secret_file(path, pem)
    return key


class Runtime:
    """Owns the engine, broker, bridge, ingestor and scheduler of one controller."""

    def __init__(self, settings: Settings, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self.clock = clock
        self.topics = Topics(settings.topic_root)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(settings.data_dir, 0o700)
        self.engine = make_engine(settings.db_url)
        self.session_factory = session_factory(self.engine)
        self.metrics = Metrics()
        self.metrics.watch_engine(self.engine)
        self.signer = Signer(load_or_create_key(settings.data_dir / "keys" / "desired-state.key"))
        self.desired_key_text = public_key_to_text(self.signer.private_key.public_key())
        self.blobs = BlobStore(settings.data_dir / "blobs")
        self.trust = TrustRepository(settings.data_dir / "tuf")
        self.policy = BrokerPolicy(self.topics)
        self.known: set[str] = set()
        self._unknown_checked: dict[str, float] = {}  # device id -> when the database said no
        self.broker: EmbeddedBroker | None = None
        self.bridge: Bridge | None = None
        self.dynsec: DynamicSecurity | None = None
        self.fetch: FetchServer | None = None
        self.ingestor = IngestProcess(settings.db_url, linger=settings.ingest_linger_s)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.leadership = Leadership(self.engine)
        self.metrics.collect_from(self)
        self.jobs = JobRunner(session_factory=self.session_factory, blobs=self.blobs,
                              trust=self.trust, clock=clock,
                              workdir=settings.data_dir / "work")

    def start(self) -> None:
        s = self.settings
        upgrade(self.engine)
        with transaction(self.session_factory) as session:
            if ensure_admin_token(session, data_dir=s.data_dir, configured=s.admin_token,
                                  now=self.clock()) and s.admin_token is None:
                log.info("created the admin token in %s", s.data_dir / "admin-token")
            if not self.trust.exists():
                self.trust.initialize(now=self.clock())
                log.info("created the TUF repository in %s", self.trust.dir)
            publish_targets(session, self.trust, now=self.clock())
            self.refresh_trust()  # the controller may have been down past an expiry
            for device_id, secret_hash in session.execute(
                select(Device.id, Device.mqtt_secret_hash)
            ):
                self.admit_device(device_id, secret_hash)
        mqtt_url = s.mqtt_url
        if mqtt_url is None:
            password = secrets.token_urlsafe(24)
            self.policy.add_service_user(CONTROLLER_USER, password)
            self.broker = EmbeddedBroker(s.broker_listen, self.policy)
            self.broker.start()
            mqtt_url = MqttUrl(s.broker_listen.host, s.broker_listen.port, CONTROLLER_USER,
                               password)
        self.jobs.start()
        self.ingestor.start()
        # on an external broker, replicas of this controller share the work of health,
        # events and fetch requests (the embedded broker serves one controller)
        self.bridge = Bridge(mqtt_url, self.topics, sink=self._sink_for,
                             is_known=self.is_enrolled,
                             observe_publish=self.metrics.mqtt_publish_seconds.observe,
                             share_group="edgefleet" if s.mqtt_url is not None else None)
        bridge = self.bridge
        # Fetch answers go out at QoS 0: the fetch protocol acknowledges by itself (a
        # device asks for what it has not got, by offset, after a timeout), so a QoS 1
        # acknowledgement per chunk only paced the transfer (single device, 50 MiB:
        # 145 -> 272 MiB/s through a stock Mosquitto; bench/distribute.py).
        self.fetch = FetchServer(self.trust, self.blobs, self.topics,
                                 lambda topic, payload: bridge.publish(topic, payload, qos=0))
        if s.mqtt_dynsec:
            self.dynsec = DynamicSecurity(bridge.publish, self.topics)
            self.bridge.add_handler(RESPONSE, self.dynsec.on_response)
        self.bridge.start()
        if self.dynsec is not None:
            self.dynsec.ensure_controller(mqtt_url.username or "")
            self.bridge.resubscribe()  # the device topics were refused before that
        self.republish_desired()  # an embedded broker forgot them
        silent_for = timedelta(seconds=max(3 * s.health_interval_s, 2 * s.keepalive_s))
        self.scheduler.add_job(self.sweep, "interval", seconds=max(1.0, s.keepalive_s / 4),
                               kwargs={"silent_for": silent_for}, id="sweep", coalesce=True,
                               max_instances=1)
        self.scheduler.add_job(self.refresh_trust, "interval", minutes=30, id="tuf-refresh",
                               coalesce=True, max_instances=1)
        self.scheduler.add_job(self.collect_blobs, "interval", hours=1, id="blob-gc",
                               coalesce=True, max_instances=1)
        if s.rollout_tick_s > 0:
            self.scheduler.add_job(self.tick_rollouts, "interval", seconds=s.rollout_tick_s,
                                   id="rollouts", coalesce=True, max_instances=1)
        self.scheduler.start()
        gc.freeze()  # start-up objects need no more collecting; keeps the receive path lean
        # Every message queued for ingestion is a tuple that survives a few young
        # collections; at the default threshold (700) the collector ran every few dozen
        # messages and walked the queue each time.
        gc.set_threshold(50_000, 20, 20)

    def _sink_for(self, kind: str) -> Sink:
        """Where the bridge sends a device's messages of ``kind`` (resolved once per topic,
        on the MQTT network thread): fetch requests to the fetch server, the rest to
        ingestion."""
        if kind == Kind.FETCH.value:
            return self._fetch_request
        return self.ingestor.submit

    def _fetch_request(self, device_id: str, _kind: str, payload: bytes, _at: float) -> None:
        if self.fetch is not None:
            self.fetch.submit(device_id, payload)

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.bridge is not None:
            self.bridge.stop()
        if self.fetch is not None:
            self.fetch.stop()
        self.jobs.stop()
        self.leadership.release()
        self.ingestor.stop()
        if self.broker is not None:
            self.broker.stop()
        self.engine.dispose()

    def sweep(self, *, silent_for: timedelta) -> None:
        """Scheduler job: mark silent devices offline; take install outcomes from health
        reports where a reported-state message was lost."""
        with transaction(self.session_factory) as session:
            if n := mark_stale_offline(session, now=self.clock(), silent_for=silent_for):
                log.info("marked %d silent devices offline", n)
            if n := adopt_install_outcomes(session):
                log.info("took the install outcome of %d devices from their health reports "
                         "(their reported state did not arrive)", n)

    def tick_rollouts(self, now: datetime | None = None) -> int:
        """Scheduler job (on the leading replica): advance rollouts; publish what they
        assign after the commit. Returns how many desired states were published."""
        if not self.leadership.held():
            return 0
        if self.leadership.taken_over:  # a leader killed between commit and publish
            self.leadership.taken_over = False
            self.republish_desired()
        with transaction(self.session_factory) as session:
            assignments = rollouts.tick(session, now=now or self.clock(), signer=self.signer)
        for assignment in assignments:
            self.publish_desired(assignment)
        return len(assignments)

    def refresh_trust(self) -> None:
        """Scheduler job: re-sign the TUF timestamp/snapshot before they expire."""
        if self.trust.refresh(now=self.clock()):
            log.info("re-signed the TUF timestamp")

    def collect_blobs(self) -> list[str]:
        """Scheduler job: delete blobs no variant references (older than an hour)."""
        with self.session_factory() as session:
            referenced = referenced_blobs(session)
        gone = self.blobs.collect(referenced)
        if gone:
            log.info("collected %d unreferenced blobs", len(gone))
        return gone

    def provision_device(self, device_id: str, secret: str) -> None:
        """Give a device being enrolled its account on an external broker with the
        dynamic security plugin (raises DynsecError if the broker refuses); nothing to do
        for the embedded broker, which checks the secret's hash itself."""
        if self.dynsec is not None:
            self.dynsec.add_device(device_id, secret)

    def admit_device(self, device_id: str, secret_hash: str) -> None:
        """Let an enrolled device onto the broker and into ingestion."""
        self.policy.add_device(device_id, secret_hash)
        self.known.add(device_id)

    def is_enrolled(self, device_id: str) -> bool:
        """From the MQTT thread: whether to accept a device's messages. A device another
        replica enrolled is looked up in the database (at most every 5 s per unknown id)."""
        if device_id in self.known:
            return True
        now = time.monotonic()
        if now - self._unknown_checked.get(device_id, -UNKNOWN_RECHECK_S) < UNKNOWN_RECHECK_S:
            return False
        with self.session_factory() as session:
            secret_hash = session.scalar(select(Device.mqtt_secret_hash)
                                         .where(Device.id == device_id))
        if secret_hash is None:
            if len(self._unknown_checked) > 100_000:  # spam with random ids: start over
                self._unknown_checked.clear()
            self._unknown_checked[device_id] = now
            return False
        self.admit_device(device_id, secret_hash)
        return True

    def unprovision_device(self, device_id: str) -> None:
        """Remove a device's broker account, if the controller gave it one; a broker that
        refuses is logged with the command that does it by hand."""
        if self.dynsec is not None:
            try:
                self.dynsec.remove_device(device_id)
            except DynsecError:
                log.exception("could not remove %s's broker account; remove it with "
                              "mosquitto_ctrl dynsec deleteClient", device_id)

    def forget_device(self, device_id: str) -> None:
        self.policy.devices.pop(device_id, None)
        self.unprovision_device(device_id)
        self.known.discard(device_id)
        if self.bridge is not None:
            self.bridge.forget(device_id)
            self.bridge.publish(self.topics.device(device_id, Kind.DESIRED), b"", retain=True)

    def republish_desired(self) -> None:
        """Publish every device's desired state again, as stored (devices ignore repeats)."""
        with self.session_factory() as session:
            for device in delivery.published(session):
                self.publish_desired(delivery.Assignment(
                    device.id, delivery.envelope(device, self.signer)))

    def publish_desired(self, assignment: delivery.Assignment) -> None:
        """Publish a device's signed desired state, retained (after the commit)."""
        if self.bridge is not None:
            self.bridge.publish(self.topics.device(assignment.device_id, Kind.DESIRED),
                                assignment.envelope, qos=1, retain=True)

    def mqtt_connected(self) -> bool:
        return self.bridge is not None and self.bridge.connected.is_set()
