"""What a rollout plan says, checked; device classes; which devices go first. Pure.

A plan is stages (a percent or a count of the target set, a bake time, optional gate
overrides), plan-wide gate thresholds, a failure policy and a concurrency limit.
Canary order is deterministic (a hash of rollout id and device id) and stratified:
every device class is represented before any class gets a second device, and
after that each class advances in proportion to its size.
"""

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from controller.fleet import device_class as hardware_class

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
POLICIES = ("rollback", "pause")


class PlanError(ValueError):
    """A plan that cannot run; ``field`` names the part that is wrong."""

    def __init__(self, field_name: str, detail: str) -> None:
        super().__init__(f"{field_name}: {detail}")
        self.field, self.detail = field_name, detail


@dataclass(frozen=True)
class Gates:
    """Thresholds a stage must meet. Rates are fractions; ratios compare with baseline."""

    max_install_failure_rate: float = 0.1  # failed or rolled back on the device
    max_smoke_failures: int = 0  # devices whose on-device smoke test failed
    report_timeout_s: float = 600.0  # a device assigned this long without an outcome
    max_missing_rate: float = 0.1  # ... is missing; at most this share may be
    max_error_rate_increase: float = 0.05  # canary error rate minus baseline error rate
    max_latency_p95_ratio: float = 1.5
    # ... and only when p95 is also this many ms over the baseline's: on a model that
    # answers in 2 ms, a busy scheduler alone doubles p95 (effect size, as in Kayenta)
    min_latency_increase_ms: float = 5.0
    max_memory_ratio: float = 1.3
    min_requests: int = 20  # a canary's health counts once it served this many
    min_devices: int = 1  # per class: canaries with enough requests to judge it
    inconclusive_timeout_s: float = 900.0  # too few reports this long: pause for a human

    @classmethod
    def of(cls, values: Mapping[str, Any], *, base: "Gates | None" = None,
           where: str = "gates") -> "Gates":
        known = {f.name: f.type for f in fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise PlanError(f"{where}.{key}", f"unknown gate; known: {', '.join(known)}")
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise PlanError(f"{where}.{key}", f"must be a number >= 0, not {value!r}")
        typed: dict[str, Any] = {k: (int(v) if known[k] is int else float(v))
                                 for k, v in values.items()}
        return replace(base or cls(), **typed)


@dataclass(frozen=True)
class Stage:
    percent: float | None = None
    count: int | None = None
    bake_s: float = 0.0
    gates: dict[str, float] = field(default_factory=dict)  # overrides of the plan's gates

    def label(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else f"{self.count} devices"


@dataclass(frozen=True)
class Probes:
    """A plan's ask that devices exercise their model while a stage bakes (agent.probes):
    one probe every ``interval_s``, at most ``max_cpu_share`` of the device's CPU. Gates
    then judge the probes' figures instead of application traffic."""

    interval_s: float = 1.0
    max_cpu_share: float = 0.1

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> "Probes":
        known = {f.name for f in fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise PlanError(f"probes.{key}", f"unknown; known: {', '.join(sorted(known))}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PlanError(f"probes.{key}", f"must be a number, not {value!r}")
        probes = cls(**{k: float(v) for k, v in values.items()})
        if not 0.05 <= probes.interval_s <= 3600:
            raise PlanError("probes.interval_s", "must be between 0.05 and 3600 seconds")
        if not 0 < probes.max_cpu_share <= 1:
            raise PlanError("probes.max_cpu_share", "must be above 0 and at most 1")
        return probes


def parse_duration(text: str, *, where: str) -> float:
    """``30s``, ``10m``, ``1h``, ``2d`` or plain seconds."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise PlanError(where, f"{text!r} is not a duration (like 30s, 10m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_stages(text: str) -> list[Stage]:
    """``1%:10m,10%:30m,50%:1h,100%``: a percent or a count, then an optional bake time."""
    stages = []
    for i, part in enumerate(p.strip() for p in text.split(",")):
        where = f"stages[{i}]"
        size, _, bake = part.partition(":")
        bake_s = parse_duration(bake, where=where) if bake else 0.0
        try:
            if size.endswith("%"):
                stages.append(Stage(percent=float(size[:-1]), bake_s=bake_s))
            else:
                stages.append(Stage(count=int(size), bake_s=bake_s))
        except ValueError:
            raise PlanError(where, f"{size!r} is neither a percent (10%) nor a count") from None
    return stages


def check_stages(stages: list[Stage], gates: Gates) -> None:
    """Refuse stages that cannot run, naming the stage that is wrong."""
    if not stages:
        raise PlanError("stages", "a plan needs at least one stage")
    last = 0.0
    for i, s in enumerate(stages):
        where = f"stages[{i}]"
        if (s.percent is None) == (s.count is None):
            raise PlanError(where, "give a percent or a count")
        size = s.percent if s.percent is not None else s.count
        assert size is not None  # noqa: S101 - one of them is set
        if size <= 0 or (s.percent is not None and s.percent > 100):
            raise PlanError(where, f"{s.label()} is out of range")
        if s.percent is not None and i > 0 and stages[i - 1].percent is not None \
                and s.percent <= last:
            raise PlanError(where, f"percentages must increase: {s.label()} after {last:g}%")
        if s.count is not None and i > 0 and stages[i - 1].count is not None \
                and s.count <= last:
            raise PlanError(where, f"counts must increase: {s.count} after {last:g}")
        if s.bake_s < 0:
            raise PlanError(where, "bake time must be >= 0")
        Gates.of(s.gates, base=gates, where=f"{where}.gates")
        last = size
    if stages[-1].percent != 100:
        raise PlanError(f"stages[{len(stages) - 1}]", "the last stage must be 100%")


def stage_gates(gates: Gates, stage: Stage) -> Gates:
    return Gates.of(stage.gates, base=gates)


def stage_size(stage: Stage, *, total: int, classes: int, first: bool) -> int:
    """How many devices of ``total`` the stage covers (all stages so far together)."""
    size = math.ceil(total * stage.percent / 100) if stage.percent is not None else \
        stage.count or 0
    if first:
        size = max(size, classes)  # every class is in the first stage
    return min(size, total)


def device_class(capabilities: Mapping[str, Any] | None, variant: str) -> str:
    """The cell a device is canaried and judged in: its hardware class x chosen variant."""
    return f"{hardware_class(dict(capabilities) if capabilities else None)}/{variant}"


def _rank(rollout_id: str, device_id: str) -> bytes:
    return hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).digest()


def canary_order(rollout_id: str, members: Iterable[tuple[str, str]]) -> list[str]:
    """Device ids of ``(device id, class)`` in the order they receive the target.

    Within a class devices are ordered by hash; across classes, a device's place is
    its rank in its class divided by the class's size, so the first device of every
    class comes before the second of any, and big classes advance in proportion.
    """
    by_class: dict[str, list[str]] = {}
    for device_id, cls in members:
        by_class.setdefault(cls, []).append(device_id)
    keyed = []
    for ids in by_class.values():
        ids.sort(key=lambda d: _rank(rollout_id, d))
        keyed += [(i / len(ids), _rank(rollout_id, d), d) for i, d in enumerate(ids)]
    return [d for *_, d in sorted(keyed)]


def gates_to_json(gates: Gates) -> dict[str, float]:
    return asdict(gates)


def stages_to_json(stages: list[Stage]) -> list[dict[str, Any]]:
    return [asdict(s) for s in stages]


def stages_from_json(raw: list[dict[str, Any]]) -> list[Stage]:
    return [Stage(**s) for s in raw]
