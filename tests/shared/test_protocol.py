"""Wire protocol: golden messages, size limits, signing, generations, fuzzed decoders."""

import contextlib
import json
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from shared.envelope import Signer, Verifier, open_desired, seal_desired
from shared.errors import (
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    SignatureError,
    StaleGeneration,
    TopicError,
    WrongDevice,
)
from shared.messages import (
    BY_KIND,
    MAX_SIZE,
    Capabilities,
    DesiredState,
    Health,
    Hello,
    Presence,
    Runtime,
    check_health_many,
    decode,
    decode_for,
    encode,
)
from shared.topics import Kind, Topics

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
TOPICS = Topics()

GOLDEN_HELLO = (
    b'{"v":1,"agent_version":"0.1.0","capabilities":{"v":1,"arch":"arm64","os":"linux",'
    b'"cpu_count":4,"cpu_flags":["neon"],"ram_bytes":4294967296,"disk_free_bytes":1000,'
    b'"runtimes":[{"v":1,"name":"onnxruntime","version":"1.32.0",'
    b'"providers":["CPUExecutionProvider"]}],"accelerators":[]},"labels":{"site":"a"},'
    b'"sent_at":"2026-11-28T12:00:00Z"}'
)


def test_hello_encodes_to_the_golden_bytes() -> None:
    hello = Hello(
        agent_version="0.1.0",
        capabilities=Capabilities(
            arch="arm64",
            cpu_count=4,
            cpu_flags=("neon",),
            ram_bytes=4 << 30,
            disk_free_bytes=1000,
            runtimes=(Runtime(name="onnxruntime", version="1.32.0",
                              providers=("CPUExecutionProvider",)),),
        ),
        labels={"site": "a"},
        sent_at=T0,
    )
    assert encode(hello) == GOLDEN_HELLO
    assert decode_for(Kind.HELLO, GOLDEN_HELLO) == hello


def test_unknown_fields_are_ignored_and_newer_versions_accepted() -> None:
    raw = json.dumps({"v": 7, "state": "online", "since": "2026-11-28T12:00:00Z", "new": [1]})
    assert decode_for(Kind.PRESENCE, raw.encode()) == Presence(v=7, state="online", since=T0)


def test_size_is_checked_before_parsing() -> None:
    huge = b"{" + b" " * MAX_SIZE[Kind.PRESENCE] + b"}"
    with pytest.raises(MessageTooLarge):
        decode_for(Kind.PRESENCE, huge)


def test_schema_violation_names_the_field() -> None:
    with pytest.raises(MalformedMessage, match="cpu_percent"):
        decode(Health, b'{"seq":1,"sent_at":"2026-11-28T12:00:00Z","cpu_percent":-1,'
               b'"mem_used_bytes":1,"mem_total_bytes":1,"disk_free_bytes":1}', limit=1000)


def test_topics_round_trip_and_reject_foreign_topics() -> None:
    topic = TOPICS.device("dev-1", Kind.HEALTH)
    assert topic == "ef/v1/dev/dev-1/health"
    assert TOPICS.parse(topic).device_id == "dev-1"
    for bad in ["ef/v2/dev/a/health", "ef/v1/dev/a/health/x", "ef/v1/dev/A/health",
                "ef/v1/dev/a/nope", "ef/v1/dev//health"]:
        with pytest.raises(TopicError):
            TOPICS.parse(bad)


def test_device_policy_confines_a_device_to_its_own_topics() -> None:
    assert TOPICS.device_may_publish("a", "ef/v1/dev/a/health")
    assert not TOPICS.device_may_publish("a", "ef/v1/dev/b/health")
    assert not TOPICS.device_may_publish("a", "ef/v1/dev/a/desired")
    assert TOPICS.device_may_subscribe("a", "ef/v1/dev/a/desired")
    assert not TOPICS.device_may_subscribe("a", "ef/v1/dev/+/desired")
    assert not TOPICS.device_may_subscribe("a", "ef/v1/#")
    # fetch answers are per device; signed blobs are broadcast, one topic per blob
    assert TOPICS.device_may_publish("a", "ef/v1/dev/a/fetch")
    assert TOPICS.device_may_subscribe("a", "ef/v1/dev/a/data")
    assert not TOPICS.device_may_subscribe("a", "ef/v1/dev/b/data")
    assert TOPICS.device_may_subscribe("a", TOPICS.blob("ab" * 32))
    assert not TOPICS.device_may_subscribe("a", "ef/v1/blob/+")
    assert not TOPICS.device_may_subscribe("a", "ef/v1/blob/not-a-digest")
    assert not TOPICS.device_may_publish("a", TOPICS.blob("ab" * 32))


def _desired(generation: int, device_id: str = "dev-1") -> DesiredState:
    return DesiredState(device_id=device_id, generation=generation, model="m", version="1.0.0",
                        issued_at=T0)


def test_signed_desired_state_verifies_and_enforces_generations() -> None:
    key = Ed25519PrivateKey.generate()
    signer, verifier = Signer(key), Verifier.of(key.public_key())
    env = seal_desired(signer, _desired(5))
    assert open_desired(verifier, env, device_id="dev-1", last_generation=4).generation == 5
    with pytest.raises(StaleGeneration):
        open_desired(verifier, env, device_id="dev-1", last_generation=5)  # replay
    with pytest.raises(StaleGeneration):
        open_desired(verifier, seal_desired(signer, _desired(3)), device_id="dev-1",
                     last_generation=5)  # older
    with pytest.raises(WrongDevice):
        open_desired(verifier, env, device_id="dev-2", last_generation=0)


def test_wrong_key_and_tampered_payload_are_refused() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    env = seal_desired(Signer(other), _desired(1))
    with pytest.raises(SignatureError, match="unknown key"):
        open_desired(Verifier.of(key.public_key()), env, device_id="dev-1", last_generation=0)
    # Same key id, different payload: the signature no longer matches.
    good = json.loads(seal_desired(Signer(key), _desired(1)))
    forged = json.loads(seal_desired(Signer(key), _desired(9)))
    good["payload"] = forged["payload"]
    with pytest.raises(SignatureError, match="does not verify"):
        open_desired(Verifier.of(key.public_key()), json.dumps(good).encode(),
                     device_id="dev-1", last_generation=0)


@given(st.sampled_from(sorted(BY_KIND)), st.binary(max_size=2048))
def test_random_bytes_never_crash_a_decoder(kind: Kind, payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_for(kind, payload)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=20,
)


@given(st.sampled_from(sorted(BY_KIND)), JSON)
def test_random_json_never_crashes_a_decoder(kind: Kind, value: object) -> None:
    with contextlib.suppress(ProtocolError):
        decode_for(kind, json.dumps(value).encode())


@given(st.binary(max_size=1024))
def test_random_bytes_never_crash_the_envelope_verifier(payload: bytes) -> None:
    verifier = Verifier.of(Ed25519PrivateKey.generate().public_key())
    with contextlib.suppress(ProtocolError):
        open_desired(verifier, payload, device_id="d", last_generation=0)


@given(st.dictionaries(st.sampled_from(["v", "kid", "alg", "payload", "sig"]), JSON))
def test_random_envelopes_never_crash_the_verifier(env: dict[str, object]) -> None:
    key = Ed25519PrivateKey.generate()
    verifier = Verifier.of(key.public_key())
    with contextlib.suppress(ProtocolError):
        open_desired(verifier, json.dumps(env).encode(), device_id="d", last_generation=0)


def test_route_splits_device_topics_and_rejects_the_rest() -> None:
    assert TOPICS.route("ef/v1/dev/dev-1/health") == ("dev-1", "health")
    for bad in ["ef/v2/dev/a/health", "ef/v1/dev/a/health/x", "ef/v1/dev/a", "x/ef/v1/dev/a/b"]:
        assert TOPICS.route(bad) is None


@given(st.text(max_size=60))
def test_route_agrees_with_parse_on_valid_topics(suffix: str) -> None:
    topic = "ef/v1/dev/" + suffix
    try:
        parsed = TOPICS.parse(topic)
    except TopicError:
        return
    assert TOPICS.route(topic) == (parsed.device_id, parsed.kind.value)


def test_decoding_health_in_bulk_isolates_the_bad_reports() -> None:
    good = encode(Health(seq=1, sent_at=T0, cpu_percent=1, mem_used_bytes=1, mem_total_bytes=1,
                         disk_free_bytes=1))
    oversize = b"{" + b" " * MAX_SIZE[Kind.HEALTH] + b"}"
    out = check_health_many([good, b'{"seq": -1}', good, oversize, b"]"])
    assert [type(x).__name__ for x in out] == ["NoneType", "MalformedMessage", "NoneType",
                                              "MessageTooLarge", "MalformedMessage"]
    assert check_health_many([good, good]) == [None, None]


HEALTH_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.floats(-1, 1e6),
                          st.sampled_from(["2026-11-29T12:00:00Z", "soon", "m@1.0.0", ""]))


@given(st.dictionaries(st.sampled_from([*Health.model_fields, "extra"]),
                       HEALTH_VALUES, max_size=16), st.integers(0, 2))
def test_bulk_health_checks_agree_with_the_model(fields: dict[str, object], copies: int) -> None:
    """The bulk check (a typed dict built from the model's own fields) accepts exactly
    what decoding into ``Health`` accepts, alone or among good reports."""
    good = encode(Health(seq=1, sent_at=T0, cpu_percent=1, mem_used_bytes=1,
                         mem_total_bytes=1, disk_free_bytes=1))
    payload = json.dumps(fields).encode()
    try:
        decode(Health, payload, limit=MAX_SIZE[Kind.HEALTH])
        expected = True
    except ProtocolError:
        expected = False
    out = check_health_many([good] * copies + [payload])
    assert (out[-1] is None) == expected
    assert out[:-1] == [None] * copies
