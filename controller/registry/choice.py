"""Variant choice: which artifact of a version a device should run.

A pure function of the variants and the device's reported capabilities: no
session, no clock. A variant fits when the device has its runtime (at the version
it needs), enough RAM for its estimate, and enough free disk for it while the
previous model stays on disk. Among the variants that fit, the one earliest in
``PREFERENCE`` wins (highest fidelity first); when none fits, every variant's
reason is returned so an operator can see why.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.messages import Capabilities

#: Fidelity order, best first; quantisations not listed come last.
PREFERENCE = ("fp32", "f32", "fp16", "f16", "bf16", "q8_0", "int8", "q6_k", "q5_k_m",
              "q5_0", "q4_k_m", "q4_0")
RUNTIME_OF_FORMAT = {"onnx": "onnxruntime", "gguf": "llama.cpp"}
DISK_HEADROOM = 2  # the download is staged beside the running model


@dataclass(frozen=True)
class VariantSpec:
    """What the choice needs to know of a variant."""

    name: str
    format: str
    quantization: str
    size: int
    ram_estimate_bytes: int
    requirements: dict[str, Any]


@dataclass(frozen=True)
class Choice:
    variant: VariantSpec | None
    reasons: dict[str, str]  # variant name -> why it does not fit (only the misfits)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def misfit(variant: VariantSpec, device: Capabilities) -> str | None:
    """Why ``variant`` cannot run on ``device``, or None if it can."""
    runtime = RUNTIME_OF_FORMAT.get(variant.format)
    if runtime is None:
        return f"unknown format {variant.format!r}"
    installed = {r.name: r for r in device.runtimes}
    if runtime not in installed:
        return f"needs {runtime}, which the device does not have"
    needed = variant.requirements.get("min_onnxruntime") if runtime == "onnxruntime" else None
    if needed and _version_tuple(installed[runtime].version) < _version_tuple(str(needed)):
        return f"needs {runtime} >= {needed}, the device has {installed[runtime].version}"
    if variant.ram_estimate_bytes > device.ram_bytes:
        return (f"needs about {variant.ram_estimate_bytes / 2**30:.2f} GiB of RAM, "
                f"the device has {device.ram_bytes / 2**30:.2f} GiB")
    if variant.size * DISK_HEADROOM > device.disk_free_bytes:
        return (f"needs {variant.size * DISK_HEADROOM / 2**30:.2f} GiB free disk, "
                f"the device has {device.disk_free_bytes / 2**30:.2f} GiB")
    return None


def rank(variant: VariantSpec) -> tuple[int, int, str]:
    quant = variant.quantization.lower()
    order = PREFERENCE.index(quant) if quant in PREFERENCE else len(PREFERENCE)
    return (order, -variant.size, variant.name)


def choose_variant(variants: Sequence[VariantSpec], device: Capabilities) -> Choice:
    """The best variant that fits ``device`` (see the module docstring)."""
    reasons = {}
    fitting = []
    for variant in variants:
        why = misfit(variant, device)
        if why is None:
            fitting.append(variant)
        else:
            reasons[variant.name] = why
    best = min(fitting, key=rank) if fitting else None
    return Choice(best, reasons)
