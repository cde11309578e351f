"""Probes: an idle device exercises its model while a rollout judges it.

A rollout whose plan asks for probes puts a ``Probe`` in the desired state of its
canaries and of the baseline devices (those still on what they ran before). While the
installed model serves and the probe has not expired, ``Prober`` runs the model's
signed smoke-test inputs through the model worker, one every ``interval_s``, counted
apart from application traffic (``Serving.probe``), so the controller judges an idle
fleet on probe latency, errors and memory. After each probe it waits long enough that
probes never use more than ``max_cpu_share`` of the device's CPU (the worker's CPU
time, measured).
"""

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from shared.messages import Probe

log = logging.getLogger(__name__)

IDLE_POLL_S = 1.0  # how soon probes start once asked for


class Probed(Protocol):
    def probe(self) -> float | None: ...


def pause(probe: Probe, elapsed_s: float, cpu_s: float | None, cpus: int) -> float:
    """How long to wait after a probe that took ``elapsed_s`` and ``cpu_s`` of CPU (None:
    unknown, taken as one core for the whole time): the next starts one interval after
    this one at the soonest, and probes use at most ``max_cpu_share`` of ``cpus`` cores."""
    used = elapsed_s if cpu_s is None else cpu_s
    return max(0.0, probe.interval_s - elapsed_s,
               used / (probe.max_cpu_share * cpus) - elapsed_s)


class Prober:
    """Runs probes on its own thread while ``settings()`` names a live probe."""

    def __init__(self, serving: Probed, settings: Callable[[], Probe | None], *,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC),
                 cpus: int | None = None) -> None:
        self._serving, self._settings = serving, settings
        self._clock, self._now = clock, now
        self._cpus = cpus or os.cpu_count() or 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prober", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            probe = self._settings()
            if probe is None or self._now() >= probe.until:
                self._stop.wait(IDLE_POLL_S)
                continue
            started = self._clock()
            try:
                cpu = self._serving.probe()
            except LookupError as exc:  # nothing to probe with: say so once a poll
                log.debug("no probe: %s", exc)
                self._stop.wait(IDLE_POLL_S)
                continue
            self._stop.wait(pause(probe, self._clock() - started, cpu, self._cpus))
