"""Gate evaluation: are the devices that got the target doing as well as the rest? Pure.

Each evaluation looks at the devices assigned so far, overall and per device class
(so one bad class cannot hide in the fleet's average), and answers Successful,
Failed or Inconclusive with the figures it used:

- install failures: devices whose install failed or rolled back, over those assigned;
- smoke tests: devices whose on-device smoke test failed;
- missing: devices assigned longer than the report timeout with no outcome;
- health (only once a stage has baked): canaries' error rate, latency p95 and memory
  against the baseline of the same class (devices still on what they ran before).
  Canaries that served fewer than ``min_requests`` requests on the target do not
  count; a class with fewer than ``min_devices`` such canaries is Inconclusive.
"""

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from controller.rollouts.plan import Gates

ALL = "all"
SUCCESSFUL, FAILED, INCONCLUSIVE = "successful", "failed", "inconclusive"
FINAL_OUTCOMES = frozenset({"committed", "failed", "rolled_back"})


@dataclass(frozen=True)
class Figures:
    """One device's health on its active model, since that model was activated."""

    requests: int
    errors: int
    latency_p95_ms: float | None
    mem_used_bytes: int

    @classmethod
    def of(cls, health: Mapping[str, Any] | None) -> "Figures | None":
        if not health:
            return None
        return cls(int(health.get("inference_count") or 0), int(health.get("error_count") or 0),
                   health.get("latency_p95_ms"), int(health.get("mem_used_bytes") or 0))


@dataclass(frozen=True)
class Aggregate:
    """Figures of a group of devices: pooled error rate, medians of p95 and memory."""

    devices: int
    requests: int
    error_rate: float
    latency_p95_ms: float | None
    mem_used_bytes: float

    @classmethod
    def of(cls, figures: Iterable[Figures]) -> "Aggregate":
        group = list(figures)
        requests = sum(f.requests for f in group)
        p95s = [f.latency_p95_ms for f in group if f.latency_p95_ms is not None]
        return cls(len(group), requests,
                   sum(f.errors for f in group) / requests if requests else 0.0,
                   statistics.median(p95s) if p95s else None,
                   statistics.median(f.mem_used_bytes for f in group) if group else 0.0)


@dataclass(frozen=True)
class Member:
    """A device of the target set, as the gates see it."""

    device_id: str
    cls: str
    assigned_at: datetime | None  # None: not given the target (yet)
    outcome: str = "pending"  # pending | committed | failed | rolled_back
    reason: str = ""
    health: Figures | None = None  # only while it reports running the target


@dataclass
class Evaluation:
    verdict: str
    reasons: list[str] = field(default_factory=list)
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)  # ALL and each class


def baseline(figures: Iterable[tuple[str, Figures]], gates: Gates) -> dict[str, Aggregate]:
    """Aggregates per class (and ALL) of ``(class, figures)`` with enough requests."""
    usable = [(c, f) for c, f in figures if f.requests >= gates.min_requests]
    out = {ALL: Aggregate.of(f for _, f in usable)}
    for cls in {c for c, _ in usable}:
        out[cls] = Aggregate.of(f for c, f in usable if c == cls)
    return out


def evaluate(members: Sequence[Member], base: Mapping[str, Aggregate], gates: Gates,
             *, now: datetime, health: bool) -> Evaluation:
    """Judge the assigned members, overall and per class; ``health`` adds the comparison."""
    assigned = [m for m in members if m.assigned_at is not None]
    scopes = {ALL: assigned}
    for m in assigned:
        scopes.setdefault(m.cls, []).append(m)
    result = Evaluation(SUCCESSFUL)
    inconclusive = False
    for scope, group in scopes.items():
        figures, failures, unsure = _judge(scope, group, base.get(scope), gates, now=now,
                                           health=health)
        result.figures[scope] = figures
        result.reasons += failures
        inconclusive |= unsure
    if result.reasons:
        result.verdict = FAILED
    elif inconclusive:
        result.verdict = INCONCLUSIVE
        result.reasons = [f"too few reports to judge {s}" for s, f in result.figures.items()
                          if f.get("verdict") == INCONCLUSIVE]
    return result


def _judge(scope: str, group: list[Member], base: Aggregate | None, gates: Gates, *,
           now: datetime, health: bool) -> tuple[dict[str, Any], list[str], bool]:
    where = "the fleet" if scope == ALL else f"class {scope}"
    n = len(group)
    failed = [m for m in group if m.outcome in ("failed", "rolled_back")]
    smoke = [m for m in failed if m.reason.startswith("smoke_test_failed")]
    missing = [m for m in group if m.outcome == "pending" and m.assigned_at is not None
               and (now - m.assigned_at).total_seconds() > gates.report_timeout_s]
    figures: dict[str, Any] = {"assigned": n, "committed": sum(m.outcome == "committed"
                                                               for m in group),
                               "failed": len(failed), "smoke_failed": len(smoke),
                               "missing": len(missing)}
    failures = []
    if len(smoke) > gates.max_smoke_failures:
        failures.append(f"smoke test failed on {len(smoke)} of {n} devices in {where} "
                        f"(allowed {gates.max_smoke_failures}): {smoke[0].reason}")
    if n and len(failed) / n > gates.max_install_failure_rate:
        failures.append(f"install failures in {where}: {len(failed)} of {n} "
                        f"({len(failed) / n:.0%} > {gates.max_install_failure_rate:.0%})")
    if n and len(missing) / n > gates.max_missing_rate:
        failures.append(f"no report from {len(missing)} of {n} devices in {where} within "
                        f"{gates.report_timeout_s:g}s ({len(missing) / n:.0%} > "
                        f"{gates.max_missing_rate:.0%})")
    unsure = False
    if health:
        on_target = [m.health for m in group if m.outcome == "committed" and m.health
                     and m.health.requests >= gates.min_requests]
        canary = Aggregate.of(on_target)
        figures["canary"] = asdict(canary)
        figures["baseline"] = asdict(base) if base else None
        if any(m.outcome == "committed" for m in group) and canary.devices < gates.min_devices:
            unsure = True
        elif canary.devices and base is not None and base.devices:
            failures += _compare(canary, base, gates, where)
    figures["verdict"] = FAILED if failures else INCONCLUSIVE if unsure else SUCCESSFUL
    return figures, failures, unsure


def _compare(canary: Aggregate, base: Aggregate, gates: Gates, where: str) -> list[str]:
    out = []
    increase = canary.error_rate - base.error_rate
    if increase > gates.max_error_rate_increase:
        out.append(f"error rate in {where}: {canary.error_rate:.1%} on the target vs "
                   f"{base.error_rate:.1%} on the baseline (+{increase:.1%} > "
                   f"+{gates.max_error_rate_increase:.1%})")
    if canary.latency_p95_ms and base.latency_p95_ms:
        ratio = canary.latency_p95_ms / base.latency_p95_ms
        if ratio > gates.max_latency_p95_ratio:
            out.append(f"latency p95 in {where}: {canary.latency_p95_ms:.1f} ms vs "
                       f"{base.latency_p95_ms:.1f} ms ({ratio:.2f}x > "
                       f"{gates.max_latency_p95_ratio:g}x)")
    if canary.mem_used_bytes and base.mem_used_bytes:
        ratio = canary.mem_used_bytes / base.mem_used_bytes
        if ratio > gates.max_memory_ratio:
            out.append(f"memory in {where}: {canary.mem_used_bytes / 2**20:.0f} MiB vs "
                       f"{base.mem_used_bytes / 2**20:.0f} MiB ({ratio:.2f}x > "
                       f"{gates.max_memory_ratio:g}x)")
    return out
