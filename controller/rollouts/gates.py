"""Gate evaluation: are the devices that got the target doing as well as the rest? Pure.

Each evaluation looks at the devices assigned so far, overall and per device class
(so one bad class cannot hide in the fleet's average), and answers Successful,
Failed or Inconclusive with the figures it used:

- install failures: devices whose install failed or rolled back, over those assigned;
- smoke tests: devices whose on-device smoke test failed;
- missing: devices assigned longer than the report timeout with no outcome;
- health (only once a stage has baked): canaries' error rate (its 95% lower bound, so
  a few unlucky requests are not a regression), latency p95 (over a ratio and by a
  minimum of ms) and memory against the baseline of the same class (devices still on
  what they ran before).
  Canaries that served fewer than ``min_requests`` requests on the target do not
  count; a class with fewer than ``min_devices`` such canaries is Inconclusive.
"""

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from controller.rollouts.plan import Gates
from shared.messages import InstallState

COMMITTED = InstallState.COMMITTED

ALL = "all"
SUCCESSFUL, FAILED, INCONCLUSIVE = "successful", "failed", "inconclusive"


@dataclass(frozen=True)
class Figures:
    """One device's health on its active model, since that model was activated."""

    requests: int
    errors: int
    latency_p95_ms: float | None
    #: the model worker's resident memory (older agents: the host's use); None while no
    #: worker runs (it died, or is loading), which is not a figure of the model
    mem_used_bytes: int | None

    @classmethod
    def of(cls, health: Mapping[str, Any] | None, *, probes: bool = False) -> "Figures | None":
        """From a health report: its application traffic, or with ``probes`` its probes'."""
        if not health:
            return None
        # the model worker's own memory where the agent reports it: host-wide use moves
        # with everything else on the box and would hide a model that needs 3x as much
        # (agents that report their own memory leave out a worker's they cannot measure)
        own = "agent_rss_bytes" in health or "model_rss_bytes" in health
        memory = health.get("model_rss_bytes") if own else health.get("mem_used_bytes")
        memory = int(memory) if memory else None
        if probes:
            return cls(int(health.get("probe_count") or 0),
                       int(health.get("probe_error_count") or 0),
                       health.get("probe_latency_p95_ms"), memory)
        return cls(int(health.get("inference_count") or 0), int(health.get("error_count") or 0),
                   health.get("latency_p95_ms"), memory)


@dataclass(frozen=True)
class Aggregate:
    """Figures of a group of devices: pooled error rate, medians of p95 and memory."""

    devices: int
    requests: int
    error_rate: float
    latency_p95_ms: float | None
    mem_used_bytes: float
    errors: int = 0

    @classmethod
    def of(cls, figures: Iterable[Figures]) -> "Aggregate":
        group = list(figures)
        requests = sum(f.requests for f in group)
        errors = sum(f.errors for f in group)
        p95s = [f.latency_p95_ms for f in group if f.latency_p95_ms is not None]
        memory = [f.mem_used_bytes for f in group if f.mem_used_bytes is not None]
        return cls(len(group), requests, errors / requests if requests else 0.0,
                   statistics.median(p95s) if p95s else None,
                   statistics.median(memory) if memory else 0.0, errors)

    def error_rate_low(self, z: float = 1.645) -> float:
        """The Wilson lower bound of the error rate (one-sided 95%): one unlucky error
        in a handful of requests is not a regression; a real one survives the bound."""
        n = self.requests
        if not n:
            return 0.0
        p = self.errors / n
        centre = p + z * z / (2 * n)
        spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return max(0.0, (centre - spread) / (1 + z * z / n))


@dataclass(frozen=True)
class Member:
    """A device of the target set, as the gates see it."""

    device_id: str
    cls: str
    assigned_at: datetime | None  # None: not given the target (yet)
    outcome: InstallState | None = None  # None: pending
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
             *, now: datetime, health: bool, probes: bool = False) -> Evaluation:
    """Judge the assigned members, overall and per class; ``health`` adds the comparison."""
    assigned = [m for m in members if m.assigned_at is not None]
    scopes: dict[str, list[Member]] = {}
    for m in assigned:
        scopes.setdefault(m.cls, []).append(m)
    scopes[ALL] = assigned  # last: the fleet's comparison is made of the classes'
    result = Evaluation(SUCCESSFUL)
    inconclusive = False
    for scope, group in scopes.items():
        figures, failures, unsure = _judge(scope, group, base.get(scope), gates, now=now,
                                           health=health, probes=probes,
                                           classes=result.figures)
        result.figures[scope] = figures
        result.reasons += failures
        inconclusive |= unsure
    if result.reasons:
        result.verdict = FAILED
    elif inconclusive:
        result.verdict = INCONCLUSIVE
        result.reasons = [f.pop("waiting") for s, f in result.figures.items()
                          if s != ALL and f.get("verdict") == INCONCLUSIVE] or [
            result.figures[ALL].pop("waiting")]
        for f in result.figures.values():
            f.pop("waiting", None)
    return result


def _judge(scope: str, group: list[Member], base: Aggregate | None, gates: Gates, *,
           now: datetime, health: bool, probes: bool,
           classes: Mapping[str, dict[str, Any]]) -> tuple[dict[str, Any], list[str], bool]:
    where = "the fleet" if scope == ALL else f"class {scope}"
    n = len(group)
    failed = [m for m in group if m.outcome is not None and m.outcome.bad]
    smoke = [m for m in failed if m.reason.startswith("smoke_test_failed")]
    missing = [m for m in group if m.outcome is None and m.assigned_at is not None
               and (now - m.assigned_at).total_seconds() > gates.report_timeout_s]
    figures: dict[str, Any] = {"assigned": n, "committed": sum(m.outcome == COMMITTED
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
        on_target = [m.health for m in group if m.outcome == COMMITTED and m.health
                     and m.health.requests >= gates.min_requests]
        canary = Aggregate.of(on_target)
        figures["canary"] = asdict(canary)
        figures["baseline"] = asdict(base) if base else None
        committed = sum(m.outcome == COMMITTED for m in group)
        if committed and canary.devices < gates.min_devices:
            unsure = True
            # what an operator of an idle fleet needs to read: the stage waits for traffic
            figures["waiting"] = (
                f"waiting for probes in {where}: {canary.devices} of {committed} canaries "
                f"ran {gates.min_requests} probes on the target" if probes else
                f"waiting for traffic in {where}: {canary.devices} of {committed} canaries "
                f"served {gates.min_requests} requests on the target") + (
                f" (the gate needs {gates.min_devices}" +
                (")" if probes else "; idle devices need a plan with probes)"))
        elif canary.devices:
            ratios = _fleet_ratios(canary, base, classes) if scope == ALL else \
                _ratios(canary, base)
            figures["comparison"] = ratios
            failures += _check(ratios, gates, where)
    figures["verdict"] = FAILED if failures else INCONCLUSIVE if unsure else SUCCESSFUL
    return figures, failures, unsure


def _ratios(canary: Aggregate, base: Aggregate | None) -> dict[str, float]:
    """Canary against baseline, within one class: what the gates compare."""
    if base is None or not base.devices:
        return {}
    out = {"error_rate_increase": canary.error_rate_low() - base.error_rate}
    if canary.latency_p95_ms and base.latency_p95_ms:
        out["latency_p95_ratio"] = canary.latency_p95_ms / base.latency_p95_ms
        out["latency_p95_increase_ms"] = canary.latency_p95_ms - base.latency_p95_ms
    if canary.mem_used_bytes and base.mem_used_bytes:
        out["memory_ratio"] = canary.mem_used_bytes / base.mem_used_bytes
    return out


def _fleet_ratios(canary: Aggregate, base: Aggregate | None,
                  classes: Mapping[str, dict[str, Any]]) -> dict[str, float]:
    """The fleet's comparison: pooled error rates, and latency and memory ratios averaged
    over classes by canary count (classes differ too much to pool absolute figures)."""
    out = {}
    if base is not None and base.devices:
        out["error_rate_increase"] = canary.error_rate_low() - base.error_rate
    for key in ("latency_p95_ratio", "latency_p95_increase_ms", "memory_ratio"):
        weighted = [(f["comparison"][key], f["canary"]["devices"]) for f in classes.values()
                    if key in f.get("comparison", {})]
        if weighted:
            out[key] = sum(r * n for r, n in weighted) / sum(n for _, n in weighted)
    return out


def _check(ratios: Mapping[str, float], gates: Gates, where: str) -> list[str]:
    out = []
    increase = ratios.get("error_rate_increase", 0.0)
    if increase > gates.max_error_rate_increase:
        out.append(f"error rate in {where}: at least +{increase:.1%} over the baseline "
                   f"(> +{gates.max_error_rate_increase:.1%}, 95% confidence)")
    ratio = ratios.get("latency_p95_ratio", 0.0)
    increase = ratios.get("latency_p95_increase_ms", 0.0)
    if ratio > gates.max_latency_p95_ratio and increase >= gates.min_latency_increase_ms:
        out.append(f"latency p95 in {where}: {ratio:.2f}x the baseline, +{increase:.3g} ms "
                   f"(> {gates.max_latency_p95_ratio:g}x and >= "
                   f"{gates.min_latency_increase_ms:g} ms)")
    ratio = ratios.get("memory_ratio", 0.0)
    if ratio > gates.max_memory_ratio:
        out.append(f"memory in {where}: {ratio:.2f}x the baseline (> {gates.max_memory_ratio:g}x)")
    return out
