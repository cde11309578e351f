"""What a simulated device does with a model: install it on a timer, serve made-up traffic.

The simulator's devices receive and verify desired states with the real session code;
``SimDevice`` then plays the installer (the same events and reported state as
``agent.update.installer``, without downloading) and makes up health figures for the
active model. Faults, given per model version and hardware profile, make a version
misbehave on some devices, so rollouts and their gates can be shown and tested:

    MODEL@VERSION[/PROFILE]:KEY=VALUE,...   keys: smoke=1 install=1 error_rate=0.3
                                                  latency=3 memory=1.5
"""

import random
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime

from agent.session import DeviceSession, Publisher, install_outcome
from shared.messages import DesiredState, Health, Probe, ReportedState
from shared.messages import InstallState as S

Schedule = Callable[[float, Callable[[], None]], None]  # run a callback after a delay

BASE_LATENCY_MS = {"pi4-2g": 40.0, "jetson-8g": 12.0, "nuc-16g": 5.0, "gateway-1g": 60.0}
BASE_ERROR_RATE = 0.002
REQUESTS_PER_S = 20.0


@dataclass(frozen=True)
class Fault:
    smoke: bool = False  # the on-device smoke test fails (the device rolls back itself)
    install: bool = False  # the download is refused
    error_rate: float | None = None
    latency: float = 1.0  # factor on the profile's latency
    memory: float = 1.0  # factor on the memory the model takes


Faults = dict[tuple[str, str], Fault]  # (model@version, profile or "*") -> fault


def parse_faults(specs: list[str]) -> Faults:
    """``m@v/profile:error_rate=0.3,latency=3`` -> faults; ValueError says what is wrong."""
    out: Faults = {}
    types = {f.name: f.type for f in fields(Fault)}
    for spec in specs:
        where, _, settings = spec.partition(":")
        ref, _, profile = where.partition("/")
        if "@" not in ref or not settings:
            raise ValueError(f"fault {spec!r}: expected MODEL@VERSION[/PROFILE]:KEY=VALUE,...")
        values: dict[str, object] = {}
        for item in settings.split(","):
            key, _, value = item.partition("=")
            if key not in types:
                raise ValueError(f"fault {spec!r}: unknown key {key!r}; known: "
                                 f"{', '.join(types)}")
            values[key] = value in ("1", "true", "yes") if types[key] is bool else float(value)
        out[(ref, profile or "*")] = Fault(**values)  # type: ignore[arg-type]
    return out


class SimDevice:
    """One simulated device's installer and model server."""

    def __init__(self, profile: str, rng: random.Random, *, faults: Faults, schedule: Schedule,
                 ram_bytes: int, step_s: float = 0.2) -> None:
        self.profile, self.rng = profile, rng
        self.faults, self.schedule, self.step_s = faults, schedule, step_s
        self.ram_bytes = ram_bytes
        self.session: DeviceSession | None = None
        self.client: Publisher | None = None
        self.active: tuple[str, str, str | None] | None = None  # model, version, variant
        self.requests = self.errors = 0
        self.probes = self.probe_errors = 0
        self.probe: Probe | None = None  # asked for by a rollout (agent.probes)
        self._counted_at: datetime | None = None
        self.outcome: tuple[int, S, str] = (0, S.IDLE, "")  # generation, state, reason

    def bind(self, session: DeviceSession, client: Publisher) -> None:
        """Serve ``session``'s desired states, reporting over ``client``."""
        self.session, self.client = session, client
        session.on_desired = self.on_desired

    def _current(self, desired: DesiredState) -> bool:
        return self.session is not None and self.session.generation == desired.generation

    # -- installing ---------------------------------------------------------------------

    def on_desired(self, desired: DesiredState) -> None:
        """A verified desired state: play the install steps, one per ``step_s``."""
        self.probe = desired.probe
        kept = self.outcome[1] == S.COMMITTED and not desired.rollback and \
            self.active == (desired.model, desired.version, desired.variant)
        if desired.target is None or desired.model is None or kept:
            if kept:  # the model it serves: only the probes change, as on a real agent
                self._event("kept", desired.generation, desired.target or "")
            self.schedule(0, lambda: self._finish(desired, S.COMMITTED, ""))
            return
        fault = self._fault(f"{desired.model}@{desired.version}")
        previous = self.active
        steps = [S.DOWNLOADING, S.VERIFYING, S.STAGING, S.ACTIVATING, S.SMOKE_TEST]
        if not desired.rollback:
            steps.append(S.PROBATION)

        def step(i: int) -> None:
            if not self._current(desired):
                return  # superseded
            if i == len(steps):
                self._finish(desired, S.COMMITTED, "")
                return
            kind = steps[i]
            self._event(kind.value, desired.generation, desired.target or "")
            if kind == S.VERIFYING and fault.install:
                self._finish(desired, S.FAILED, "download_refused: simulated fault")
                return
            if kind == S.ACTIVATING:
                self._activate((desired.model or "", desired.version or "", desired.variant))
            if kind == S.SMOKE_TEST and fault.smoke:
                self._activate(previous)
                self._finish(desired, S.ROLLED_BACK, "smoke_test_failed: simulated fault on "
                             f"{self.profile}")
                return
            delay = self.step_s * (1 + self.rng.random()) if kind == S.DOWNLOADING else \
                self.step_s / 2
            self.schedule(delay, lambda: step(i + 1))

        self.schedule(0, lambda: step(0))

    def _activate(self, model: tuple[str, str, str | None] | None) -> None:
        self.active = model
        self.requests = self.errors = self.probes = self.probe_errors = 0

    def _finish(self, desired: DesiredState, state: S, reason: str) -> None:
        if not self._current(desired):
            return
        if desired.model is None:
            self._activate(None)
        self.outcome = (desired.generation, state, reason)
        self._event(state.value, desired.generation, reason)
        if self.session is not None and self.client is not None:
            self.session.send_reported(self.client, ReportedState(
                generation=desired.generation, model=desired.model, version=desired.version,
                variant=desired.variant, state=state, detail=reason))

    def _event(self, kind: str, generation: int, detail: str) -> None:
        if self.session is not None and self.client is not None:
            self.session.send_event(self.client, kind, generation, detail)

    # -- serving ------------------------------------------------------------------------

    def _fault(self, ref: str) -> Fault:
        return self.faults.get((ref, self.profile)) or self.faults.get((ref, "*")) or Fault()

    def health(self, seq: int, now: datetime) -> Health:
        rng = self.rng
        used = int(self.ram_bytes * rng.uniform(0.25, 0.3))
        p50 = p95 = model_rss = None
        if self.active is not None:
            fault = self._fault(f"{self.active[0]}@{self.active[1]}")
            elapsed = (now - self._counted_at).total_seconds() if self._counted_at else 0
            served = int(elapsed * REQUESTS_PER_S * rng.uniform(0.8, 1.2))
            rate = BASE_ERROR_RATE if fault.error_rate is None else fault.error_rate
            self.requests += served
            self.errors += sum(rng.random() < rate for _ in range(served))
            if self.probe is not None and now < self.probe.until:
                probed = int(elapsed / self.probe.interval_s)
                self.probes += probed
                self.probe_errors += sum(rng.random() < rate for _ in range(probed))
            base = BASE_LATENCY_MS.get(self.profile, 20.0) * fault.latency
            p50, p95 = round(base * rng.uniform(0.95, 1.05), 2), \
                round(base * 1.6 * rng.uniform(0.95, 1.05), 2)
            model_rss = int(self.ram_bytes * 0.1 * fault.memory * rng.uniform(0.97, 1.03))
            used += model_rss
        self._counted_at = now
        return Health(seq=seq, sent_at=now, cpu_percent=round(rng.uniform(2, 60), 1),
                      mem_used_bytes=used, mem_total_bytes=self.ram_bytes,
                      disk_free_bytes=32 << 30, temperature_c=round(rng.uniform(35, 70), 1),
                      inference_count=self.requests, error_count=self.errors,
                      latency_p50_ms=p50, latency_p95_ms=p95, probe_count=self.probes,
                      probe_error_count=self.probe_errors,
                      probe_latency_p95_ms=p95 if self.probes else None,
                      active_model=f"{self.active[0]}@{self.active[1]}" if self.active else None,
                      model_rss_bytes=model_rss,
                      **install_outcome(*self.outcome))

