"""Rich renderings of fleet data, shared by the operator commands and the demo."""

from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.table import Table

_STATUS_STYLE = {"online": "green", "offline": "red", "enrolled": "yellow"}


def _ago(iso: str | None, now: datetime) -> str:
    if not iso:
        return "-"
    seconds = (now - datetime.fromisoformat(iso)).total_seconds()
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _gib(n: int | None) -> str:
    return f"{n / (1 << 30):.1f}" if n else "-"


def _short_class(device_class: str) -> str:
    """``arm64/ram<8G/llama.cpp+onnxruntime`` -> ``arm64/ram<8G/llama+ort`` for narrow terminals."""
    return device_class.replace("onnxruntime", "ort").replace("llama.cpp", "llama")


def devices_table(devices: list[dict[str, Any]], *, now: datetime | None = None) -> Table:
    now = now or datetime.now(UTC)
    online = sum(d["status"] == "online" for d in devices)
    table = Table(title=f"edgefleet devices: {online}/{len(devices)} online",
                  box=box.SIMPLE_HEAD)
    for col in ("device", "status", "class", "GiB", "CPU%", "seen"):
        table.add_column(col, no_wrap=True)
    for d in devices:
        caps = d.get("capabilities") or {}
        health = d.get("last_health") or {}
        style = _STATUS_STYLE.get(d["status"], "")
        table.add_row(d["id"], f"[{style}]{d['status']}[/]", _short_class(d["device_class"]),
                      _gib(caps.get("ram_bytes")), str(health.get("cpu_percent", "-")),
                      _ago(d.get("last_seen_at"), now))
    return table


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"edgefleet fleet: {summary['devices']} devices")
    table.add_column("")
    table.add_column("devices", justify="right")
    for status, n in summary["by_status"].items():
        table.add_row(f"[{_STATUS_STYLE.get(status, '')}]{status}[/]", str(n))
    table.add_section()
    for cls, n in summary["by_class"].items():
        table.add_row(cls, str(n))
    return table


def versions_table(versions: list[dict[str, Any]]) -> Table:
    table = Table(title="edgefleet models", box=box.SIMPLE_HEAD)
    for col in ("model", "version", "variant", "format", "quant", "size", "sha256", "signed"):
        table.add_column(col, no_wrap=True)
    for v in versions:
        for variant in v["variants"]:
            table.add_row(v["name"], v["version"], variant["name"], variant["format"],
                          variant["quantization"], f"{variant['size']:,}",
                          variant["sha256"][:12], "yes" if variant["signed"] else "[red]no[/]")
    return table
