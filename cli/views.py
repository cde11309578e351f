"""Rich renderings of fleet data, shared by the operator commands and the demo."""

from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Group
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
    for col in ("device", "status", "class", "GiB", "CPU%", "model", "seen"):
        table.add_column(col, no_wrap=True)
    for d in devices:
        caps = d.get("capabilities") or {}
        health = d.get("last_health") or {}
        style = _STATUS_STYLE.get(d["status"], "")
        table.add_row(d["id"], f"[{style}]{d['status']}[/]", _short_class(d["device_class"]),
                      _gib(caps.get("ram_bytes")), str(health.get("cpu_percent", "-")),
                      _model(d.get("reported")), _ago(d.get("last_seen_at"), now))
    return table


def _model(reported: dict[str, Any] | None) -> str:
    """``mlp@1.2.0 committed``: what the device last reported running."""
    if not reported:
        return "-"
    what = f"{reported['model']}@{reported['version']}" if reported.get("model") else "none"
    style = {"committed": "green", "rolled_back": "yellow", "failed": "red"}.get(
        reported["state"], "")
    return f"{what} [{style}]{reported['state']}[/]"


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"edgefleet fleet: {summary['devices']} devices")
    table.add_column("")
    table.add_column("devices", justify="right")
    for status, n in summary["by_status"].items():
        table.add_row(f"[{_STATUS_STYLE.get(status, '')}]{status}[/]", str(n))
    table.add_section()
    for cls, n in summary["by_class"].items():
        table.add_row(cls, str(n))
    table.add_section()
    for model, n in summary.get("by_model", {}).items():
        table.add_row(f"runs {model}", str(n))
    return table


def versions_table(versions: list[dict[str, Any]]) -> Table:
    table = Table(title="edgefleet models", box=box.SIMPLE_HEAD)
    for col in ("model", "status", "variant", "quant", "bytes", "vs source", "signed"):
        table.add_column(col, no_wrap=True)
    for v in versions:
        status = {"ready": "[green]ready[/]", "failed": "[red]failed[/]"}.get(
            v["status"], f"{v['status']} {(v.get('job') or {}).get('progress', 0):.0%}")
        for variant in v["variants"]:
            table.add_row(f"{v['name']}@{v['version']}", status, variant["name"],
                          f"{variant['format']} {variant['quantization']}",
                          f"{variant['size']:,}", comparison_text(variant.get("comparison")),
                          "yes" if variant["signed"] else "[red]no[/]")
        for refused in v.get("refused", []):
            table.add_row(f"{v['name']}@{v['version']}", status, refused["name"], "", "",
                          "[yellow]refused[/]", "no")
        if v["status"] == "failed":
            table.add_row("", "", "", f"[red]{v['job']['message']}[/]")
    return table


def comparison_text(c: dict[str, Any] | None) -> str:
    """``27% size, cosine 0.998, 0.6x time`` for a derived variant (and ``perplexity
    27.1->27.4`` for a language model); ``-`` for a source."""
    if not c or "size_ratio" not in c:
        return "-"
    parts = [f"{c['size_ratio']:.0%} size"]
    metric = c.get("metric")
    figure = (c.get("fidelity") or {}).get(metric)
    if figure is not None:
        parts.append(f"{metric} {figure:.3f}")
    if ppl := c.get("perplexity"):
        parts.append(f"perplexity {ppl['source']:.4g}->{ppl['variant']:.4g}")
    ms = c.get("latency_ms") or {}
    if ms.get("source"):
        parts.append(f"{ms['variant'] / ms['source']:.2g}x time")
    if c.get("warning"):
        parts.append("[yellow]poor[/]")
    return ", ".join(parts)


_STATE_STYLE = {"completed": "green", "rolled_back": "yellow", "aborted": "red",
                "rolling_back": "yellow", "paused": "magenta"}


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = round(width * done / total) if total else 0
    return f"[green]{'█' * filled}[/][dim]{'░' * (width - filled)}[/] {done}/{total}"


def rollout_view(r: dict[str, Any]) -> Group:
    """A rollout: header, stages with progress bars, per-class figures, timeline."""
    style = _STATE_STYLE.get(r["state"], "cyan")
    head = (f"[bold]rollout {r['id']}[/]  {r['model']}@{r['version']}  "
            f"[{style}]{r['state']}[/]  stage {r['stage'] + 1}/{len(r['stages'])}\n{r['reason']}")
    stages = Table(box=box.SIMPLE_HEAD, title="stages", title_justify="left")
    for col in ("", "stage", "bake", "committed", "failed"):
        stages.add_column(col, no_wrap=True)
    for i, s in enumerate(r["stages"]):
        mark = "▶" if i == r["stage"] and r["state"] not in ("completed", "rolled_back",
                                                              "aborted") else ""
        stages.add_row(mark, s["label"], f"{s['bake_s']:g}s", _bar(s["committed"], s["devices"]),
                       f"[red]{s['failed']}[/]" if s["failed"] else "0")
    classes = Table(box=box.SIMPLE_HEAD, title="by device class", title_justify="left")
    for col in ("class", "devices", "assigned", "committed", "failed", "error rate",
                "p95 ms", "baseline p95", "verdict"):
        classes.add_column(col, no_wrap=True)
    for cls, c in (r.get("by_class") or {}).items():
        f = c.get("figures") or {}
        canary, base = f.get("canary") or {}, f.get("baseline") or {}
        verdict = f.get("verdict", "-")
        classes.add_row(_short_class(cls), str(c["devices"]), str(c["assigned"]),
                        str(c["committed"]), str(c["failed"]),
                        f"{canary['error_rate']:.1%}" if canary.get("devices") else "-",
                        _ms(canary.get("latency_p95_ms")), _ms(base.get("latency_p95_ms")),
                        {"failed": "[red]failed[/]", "successful": "[green]ok[/]"}.get(
                            verdict, verdict))
    timeline = Table(box=box.SIMPLE_HEAD, title="timeline", title_justify="left")
    for col in ("at", "by", "state", "what"):
        timeline.add_column(col, overflow="fold")
    for e in (r.get("timeline") or [])[-15:]:
        timeline.add_row(e["at"][11:19], e["actor"], e["state"], e["reason"])
    return Group(head, stages, classes, timeline)


def _ms(value: float | None) -> str:
    return f"{value:.1f}" if value else "-"


def fleet_models_table(summary: dict[str, Any]) -> Table:
    """Devices per class and per model they report running (the fleet summary's
    ``by_class_model``): the fleet at a glance."""
    cells = {_short_class(cls): row for cls, row in summary["by_class_model"].items()}
    models = sorted(summary["by_model"])
    table = Table(title=f"edgefleet fleet: {summary['devices']} devices by class and model",
                  box=box.SIMPLE_HEAD)
    table.add_column("class")
    for m in models:
        table.add_column(m, justify="right")
    for cls, row in sorted(cells.items()):
        table.add_row(cls, *(str(row.get(m, 0)) for m in models))
    return table


def audit_table(entries: list[dict[str, Any]]) -> Table:
    """The audit log, newest first."""
    table = Table(title=f"edgefleet audit: {len(entries)} entries", box=box.SIMPLE_HEAD)
    for col in ("id", "at (UTC)", "actor", "action", "target", "from", "detail"):
        table.add_column(col, no_wrap=col != "detail")
    for e in entries:
        detail = ", ".join(f"{k}={v}" for k, v in e["detail"].items())
        table.add_row(str(e["id"]), e["at"][:19].replace("T", " "), e["actor"], e["action"],
                      e["target"], e["remote"] or "-", detail)
    return table


def status_view(summary: dict[str, Any], rollouts: list[dict[str, Any]]) -> Group:
    """The fleet summary and the active rollouts with their progress."""
    table = Table(title="active rollouts", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("rollout", "model", "state", "stage", "committed"):
        table.add_column(col, no_wrap=True)
    for r in rollouts:
        style = _STATE_STYLE.get(r["state"], "cyan")
        stage = r["stages"][min(r["stage"], len(r["stages"]) - 1)]
        table.add_row(r["id"][:8], f"{r['model']}@{r['version']}", f"[{style}]{r['state']}[/]",
                      f"{r['stage'] + 1}/{len(r['stages'])} ({stage['label']})",
                      _bar(r["counts"].get("committed", 0), r["counts"].get("members", 0)))
    if not rollouts:
        table.add_row("-", "none", "", "", "")
    return Group(summary_table(summary), table)
