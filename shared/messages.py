"""Every wire message: frozen, versioned, built strictly, decoded leniently.

Each message carries ``v`` (its schema version). A receiver accepts any ``v`` and
ignores fields it does not know, so a newer sender can add fields without breaking
an older receiver; a sender that names a field the message does not have is refused
(``TypeError``) where it builds the message, so a misspelt or forgotten field is a bug
found at once, not a value lost on the wire. Payloads are compact UTF-8 JSON.
``decode`` checks the size before it parses and raises only ``ProtocolError``
subclasses. ``InstallState`` is the one vocabulary of install states and outcomes.
"""

import json
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import SchemaValidator, core_schema

from shared.errors import MalformedMessage, MessageTooLarge, ProtocolError
from shared.topics import Kind

SCHEMA_VERSION = 1

#: Largest payload accepted per topic kind, in bytes; checked before parsing.
MAX_SIZE: dict[Kind, int] = {
    Kind.HELLO: 64 * 1024,
    Kind.PRESENCE: 1024,
    Kind.HEALTH: 16 * 1024,
    Kind.REPORTED: 16 * 1024,
    Kind.EVENTS: 16 * 1024,
    Kind.DESIRED: 16 * 1024,
    Kind.FETCH: 1024,
}

Name = Annotated[str, Field(max_length=128)]
Count = Annotated[int, Field(ge=0)]


class Message(BaseModel):
    """Base of all wire messages: unknown fields are refused when building (the
    constructor), ignored when decoding (``model_validate*``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int = SCHEMA_VERSION

    def __init__(self, **data: Any) -> None:
        unknown = data.keys() - type(self).model_fields.keys()
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        super().__init__(**data)

    # pydantic calls an overridden __init__ from model_validate* too, unless it is marked
    # as the base one: then only the constructor checks, and decoding stays lenient
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


class InstallState(StrEnum):
    """Where a device's install of a desired state is; the last three are its outcome."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    ACTIVATING = "activating"
    SMOKE_TEST = "smoke_test"
    PROBATION = "probation"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        """An outcome: the install is over (the model it names serves, or the old one)."""
        return self in OUTCOMES

    @property
    def bad(self) -> bool:
        """An outcome in which the desired model does not serve."""
        return self in (InstallState.FAILED, InstallState.ROLLED_BACK)


OUTCOMES = frozenset({InstallState.COMMITTED, InstallState.ROLLED_BACK, InstallState.FAILED})


class Runtime(Message):
    """An inference runtime installed on the device."""

    name: Name  # "onnxruntime", "llama.cpp"
    version: Name
    providers: tuple[Name, ...] = ()  # onnxruntime execution providers


class Capabilities(Message):
    """What the device is and has; drives variant choice and canary strata."""

    arch: Name  # "x86_64", "arm64"
    os: Name = "linux"
    cpu_count: Count
    cpu_flags: tuple[Name, ...] = ()
    ram_bytes: Count
    disk_free_bytes: Count
    runtimes: tuple[Runtime, ...] = ()
    accelerators: tuple[Name, ...] = ()


class Hello(Message):
    """Sent on every connect: who the device is and what it can do."""

    agent_version: Name
    capabilities: Capabilities
    labels: dict[Name, Name] = Field(default_factory=dict, max_length=64)
    sent_at: datetime


class Presence(Message):
    """Retained; the device's last will is the ``offline`` one."""

    state: Literal["online", "offline"]
    since: datetime


class Health(Message):
    """Periodic health report."""

    seq: Count
    sent_at: datetime
    cpu_percent: Annotated[float, Field(ge=0)]
    mem_used_bytes: Count
    mem_total_bytes: Count
    disk_free_bytes: Count
    temperature_c: float | None = None
    inference_count: Count = 0
    error_count: Count = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    active_model: Name | None = None  # "name@version" being served; the registry reads it
    #: resident memory of the model's worker process (what the memory gate compares) and
    #: of the agent itself; host-wide use (``mem_used_bytes``) moves with everything else
    model_rss_bytes: Count | None = None
    agent_rss_bytes: Count | None = None
    #: the device's install (``ReportedState``) repeated in every report, so an outcome
    #: whose one reported-state message a broker dropped under load still arrives
    #: probes (``Probe``) run on the active model, counted apart from application traffic
    probe_count: Count = 0
    probe_error_count: Count = 0
    probe_latency_p95_ms: float | None = None
    install_generation: Count | None = None
    install_state: InstallState | None = None
    install_reason: Annotated[str, Field(max_length=256)] | None = None


class Probe(Message):
    """A rollout's ask that an idle device exercise its model while a stage bakes: the
    smoke test's signed inputs, one every ``interval_s``, never above ``max_cpu_share``
    of the device's CPU, until ``until``. Counted apart from application traffic."""

    rollout: Name
    interval_s: Annotated[float, Field(gt=0)]
    max_cpu_share: Annotated[float, Field(gt=0, le=1)]
    until: datetime


class DesiredState(Message):
    """What the controller wants a device to run. Travels only inside a signed envelope."""

    device_id: Name
    generation: Count
    model: Name | None = None
    version: Name | None = None
    variant: Name | None = None
    target: Annotated[str, Field(max_length=512)] | None = None  # the TUF target to fetch
    issued_at: datetime
    #: the variant's file, as its signed target pins it: a rollback finds the copy it
    #: kept by this hash and needs no metadata
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    size: Count | None = None
    #: a rollout giving back what the device ran before: a copy the device kept and had
    #: already proven, so it fetches nothing and skips probation after the smoke test
    rollback: bool = False
    #: exercise the model (probes) while a rollout judges it; a desired state naming the
    #: model the device already runs only starts or renews probes, it installs nothing
    probe: Probe | None = None


class ReportedState(Message):
    """Retained: what the device actually runs, and for which desired generation."""

    generation: Count
    model: Name | None = None
    version: Name | None = None
    variant: Name | None = None
    state: InstallState
    detail: Annotated[str, Field(max_length=2048)] = ""


class Event(Message):
    """One step of an install, or anything else worth a timeline entry."""

    kind: Name
    generation: Count = 0
    detail: Annotated[str, Field(max_length=2048)] = ""
    at: datetime


M = TypeVar("M", bound=Message)

#: The message class carried by each topic kind (DESIRED carries a signed envelope).
BY_KIND: dict[Kind, type[Message]] = {
    Kind.HELLO: Hello,
    Kind.PRESENCE: Presence,
    Kind.HEALTH: Health,
    Kind.REPORTED: ReportedState,
    Kind.EVENTS: Event,
}


def encode(message: Message) -> bytes:
    """Serialise a message to compact JSON bytes."""
    return message.model_dump_json(exclude_none=True).encode()


def check_size(payload: bytes, limit: int) -> None:
    """Raise MessageTooLarge if ``payload`` is over ``limit`` bytes."""
    if len(payload) > limit:
        raise MessageTooLarge(f"{len(payload)} bytes is over the {limit}-byte limit")


def decode(cls: type[M], payload: bytes, *, limit: int) -> M:
    """Parse ``payload`` as ``cls``, after checking its size against ``limit``."""
    check_size(payload, limit)
    try:
        return cls.model_validate_json(payload)
    except ValidationError as exc:
        raise MalformedMessage(f"invalid {cls.__name__}: {_first_error(exc)}") from None
    except (ValueError, TypeError) as exc:  # non-UTF-8 bytes and similar
        raise MalformedMessage(f"invalid {cls.__name__}: {exc}") from None


def decode_for(kind: Kind, payload: bytes) -> Message:
    """Parse a device-published payload by its topic kind."""
    if kind not in BY_KIND:
        raise MalformedMessage(f"{kind.value} messages are not device messages")
    return decode(BY_KIND[kind], payload, limit=MAX_SIZE[kind])


def _fields_as_typed_dict(model: type[Message]) -> core_schema.CoreSchema:
    """``model``'s own field schemas as a typed dict: the same checks, but validation
    builds plain dicts instead of model objects (a third of the cost)."""
    fields = model.__pydantic_core_schema__["schema"]["fields"]
    return core_schema.typed_dict_schema(
        {name: core_schema.typed_dict_field(f["schema"], required=f["schema"]["type"] != "default")
         for name, f in fields.items()}, extra_behavior="ignore")


_HEALTH_LIST = SchemaValidator(core_schema.list_schema(_fields_as_typed_dict(Health)))


def check_health_many(payloads: Sequence[bytes]) -> list[ProtocolError | None]:
    """Check many health payloads, each size-checked, validated in one call; None for
    each good one, its error for each bad one. For ingestion, which stores the payloads
    as received and needs no objects.

    Validating a JSON array costs about half as much per report as one call per
    report. If any payload is bad, every payload is checked on its own so that the
    bad ones get their own errors and the good ones still pass.
    """
    limit = MAX_SIZE[Kind.HEALTH]
    if all(len(p) <= limit for p in payloads):
        try:
            _HEALTH_LIST.validate_json(b"[" + b",".join(payloads) + b"]")
        except (ValidationError, ValueError):
            pass
        else:
            return [None] * len(payloads)
    out: list[ProtocolError | None] = []
    for payload in payloads:
        try:
            decode(Health, payload, limit=limit)
            out.append(None)
        except ProtocolError as exc:
            out.append(exc)
    return out


def loads_object(payload: bytes, *, limit: int) -> dict[str, Any]:
    """Parse a JSON object after a size check; for envelopes and other raw JSON."""
    check_size(payload, limit)
    try:
        value = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MalformedMessage("expected a JSON object")
    return value


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "message"
    return f"{where}: {err['msg']}"
