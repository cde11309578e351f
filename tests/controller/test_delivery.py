"""The desired state from the controller's row to the agent's installer: one object."""

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller import delivery
from controller.db.engine import make_engine, session_factory, transaction, upgrade
from controller.db.models import Device, ModelVersion, Variant
from shared.envelope import Signer, Verifier, open_desired
from shared.messages import Capabilities, DesiredState, Probe, Runtime

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
SHA = "ab" * 32


def _version() -> tuple[ModelVersion, Variant]:
    version = ModelVersion(id="v1", model_name="mlp", version="1.2.0")
    variant = Variant(id="x", version_id="v1", name="int8", format="onnx", quantization="int8",
                      sha256=SHA, size=1234, requirements={}, ram_estimate_bytes=1 << 20,
                      target_path="models/mlp/1.2.0/int8.onnx")
    return version, variant


PROBE = Probe(rollout="r1", interval_s=0.5, max_cpu_share=0.1, until=T0 + timedelta(hours=1))


def test_every_desired_state_field_reaches_the_agent_as_stored_rollback_included(
        db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    key = Ed25519PrivateKey.generate()
    signer, public = Signer(key), key.public_key()
    caps = Capabilities(arch="x86_64", cpu_count=2, ram_bytes=8 << 30, disk_free_bytes=8 << 30,
                        runtimes=(Runtime(name="onnxruntime", version="1.23"),))
    try:
        with transaction(session_factory(engine)) as s:
            device = Device(id="d1", name="d1", labels={}, mqtt_secret_hash="x", enrolled_at=T0,
                            status="online", health_count=0, desired_generation=4,
                            capabilities=caps.model_dump(mode="json"))
            s.add(device)
            s.flush()
            version, variant = _version()
            sent = delivery.assign(s, device, version, now=T0, signer=signer, rollback=True,
                                   variants=[variant], probe=PROBE)
        with session_factory(engine)() as s:
            stored = delivery.desired_state(s.get(Device, "d1"))
            again = delivery.envelope(s.get(Device, "d1"), signer)
    finally:
        engine.dispose()
    got = open_desired(Verifier.of(public), sent.envelope, device_id="d1", last_generation=4)
    assert got == stored == DesiredState(
        device_id="d1", generation=5, model="mlp", version="1.2.0", variant="int8",
        target="models/mlp/1.2.0/int8.onnx", sha256=SHA, size=1234, issued_at=T0,
        rollback=True, probe=PROBE)
    assert again == sent.envelope  # a restarted controller publishes the same bytes
    unset = [name for name in DesiredState.model_fields if getattr(got, name) in (None, False)]
    assert unset == [], f"the round trip does not cover {unset}"


def test_building_a_message_with_a_field_it_does_not_have_is_refused() -> None:
    with pytest.raises(TypeError, match="DesiredState has no field rolback"):
        DesiredState(device_id="d1", generation=1, issued_at=T0, rolback=True)
    # decoding stays lenient: a newer controller may add fields
    assert DesiredState.model_validate_json(
        '{"device_id": "d1", "generation": 1, "issued_at": "2026-12-02T12:00:00Z", '
        '"future": 1}').generation == 1

