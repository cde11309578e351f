"""What this box is: capabilities for the hello, and health samples."""

import functools
import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from shared.messages import Capabilities, Health, Runtime

_ARCH = {"aarch64": "arm64", "amd64": "x86_64", "armv7l": "armv7"}
_INTERESTING_FLAGS = {"avx", "avx2", "avx512f", "avx512_vnni", "fma", "f16c", "sse4_2",
                      "neon", "asimd", "asimddp", "sve", "i8mm"}


def arch() -> str:
    machine = platform.machine().lower()
    return _ARCH.get(machine, machine)


def cpu_flags() -> tuple[str, ...]:
    """SIMD flags relevant to inference, from /proc/cpuinfo where readable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return tuple(sorted(flags & _INTERESTING_FLAGS))


def runtimes() -> tuple[Runtime, ...]:
    """Installed inference runtimes, found by package metadata (nothing is imported)."""
    found = []
    for dist, name in (("onnxruntime", "onnxruntime"), ("onnxruntime-gpu", "onnxruntime"),
                       ("llama_cpp_python", "llama.cpp")):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        providers: tuple[str, ...] = ()
        if name == "onnxruntime":
            providers = _onnx_providers()
        found.append(Runtime(name=name, version=version, providers=providers))
    return tuple(found)


@functools.cache
def _onnx_providers() -> tuple[str, ...]:
    """onnxruntime's execution providers, asked once in a child process: importing it
    here would keep numpy and onnxruntime in the agent (+30 MB) for good."""
    try:
        done = subprocess.run(  # noqa: S603 - our own interpreter, a fixed program
            [sys.executable, "-c", _PROVIDERS], capture_output=True, text=True, timeout=120,
            check=True)
        return tuple(json.loads(done.stdout.splitlines()[-1]))
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return ()  # a broken install reports no providers rather than crashing


_PROVIDERS = "import json, onnxruntime; print(json.dumps(onnxruntime.get_available_providers()))"


def capabilities(state_dir: Path, memory_limit: int | None = None) -> Capabilities:
    total = psutil.virtual_memory().total
    return Capabilities(
        arch=arch(),
        os=platform.system().lower(),
        cpu_count=os.cpu_count() or 1,
        cpu_flags=cpu_flags(),
        ram_bytes=min(total, memory_limit) if memory_limit else total,
        disk_free_bytes=shutil.disk_usage(state_dir).free,
        runtimes=runtimes(),
    )


def temperature_c() -> float | None:
    """The hottest sensor reading, where the platform exposes one."""
    try:
        sensors = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        return None
    readings = [t.current for entries in sensors.values() for t in entries if t.current]
    return max(readings) if readings else None


def health(seq: int, now: datetime, state_dir: Path, serving: dict[str, Any] | None = None
           ) -> Health:
    """Host figures, plus the serving counters (``Serving.health()``) when given."""
    mem = psutil.virtual_memory()
    return Health(
        seq=seq, sent_at=now, cpu_percent=psutil.cpu_percent(interval=None),
        mem_used_bytes=mem.total - mem.available, mem_total_bytes=mem.total,
        agent_rss_bytes=psutil.Process().memory_info().rss,
        disk_free_bytes=shutil.disk_usage(state_dir).free, temperature_c=temperature_c(),
        **(serving or {}),
    )
