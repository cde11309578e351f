"""The controller's /metrics against a real fleet: the same counts as the fleet summary."""

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ControllerProcess, cli, wait_for
from tests.integration.test_rollout_durability import on, setup_fleet

ROOT = Path(__file__).resolve().parents[2]


def scrape(c: ControllerProcess, token: str | None) -> dict[str, list[Any]]:
    """Samples by metric family name."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"{c.url}/metrics", headers=headers)  # noqa: S310
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - a local test URL
        text = resp.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def by_version(samples: list[Any]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for s in samples:
        model, version = s.labels["model"], s.labels["version"]
        counts["none" if model == "none" else f"{model}@{version}"] += int(s.value)
    return +counts


def test_metrics_count_devices_per_version_like_the_summary_and_show_the_rollout(
        start_controller: Callable[..., ControllerProcess], spawn: Callable[..., Any],
        tmp_path: Path) -> None:
    c = start_controller("--rollout-tick", "0.5")
    setup_fleet(c, spawn, tmp_path)
    canaries = on(c, "1.0.0")[:3]
    for device_id in canaries:
        c.admin.call("PUT", f"/devices/{device_id}/pin", {"model": "m@2.0.0"})
    wait_for(lambda: len(on(c, "2.0.0")) == 3, 60, "three devices on 2.0.0")
    viewer = c.token("viewer")

    metrics = scrape(c, viewer)
    summary = c.admin.call("GET", "/fleet/summary")
    assert by_version(metrics["edgefleet_devices"]) == {"m@1.0.0": 5, "m@2.0.0": 3}
    assert by_version(metrics["edgefleet_devices"]) == summary["by_model"]
    by_class: Counter[str] = Counter()
    for s in metrics["edgefleet_devices"]:
        by_class[s.labels["device_class"]] += int(s.value)
    assert by_class == summary["by_class"]

    rid = c.admin.call("POST", "/rollouts", {"model": "m", "version": "2.0.0",
                                             "stages": "1:1h,100%"})["id"]
    wait_for(lambda: any(s.labels["state"] == "baking"
                         for s in scrape(c, viewer)["edgefleet_rollout_info"]), 60,
             "the rollout baking its first stage")
    metrics = scrape(c, viewer)
    assert [(s.labels["rollout"], s.value) for s in metrics["edgefleet_rollout_stage"]] == [
        (rid, 1)]
    assert [s.value for s in metrics["edgefleet_rollout_stages"]] == [2]
    assert sum(s.value for s in metrics["edgefleet_rollout_devices"]) == 8
    assert metrics["edgefleet_ingest_persisted"][0].value > 0
    assert metrics["edgefleet_mqtt_connected"][0].value == 1
    for histogram in ("edgefleet_mqtt_publish_seconds", "edgefleet_db_statement_seconds"):
        count = next(s for s in metrics[histogram] if s.name == f"{histogram}_count")
        assert count.value > 0, histogram

    shown = subprocess.run(cli("status", "--controller", c.url, "--token", viewer),
                           capture_output=True, text=True, timeout=60, check=True,
                           env=os.environ | {"COLUMNS": "200"}).stdout
    assert re.search(rf"{rid[:8]} +m@2\.0\.0 +baking +1/2 \(1 devices\) +█+░+ \d/8", shown), \
        shown
    assert "runs m@2.0.0" in shown
    as_json = json.loads(subprocess.run(
        cli("status", "--json", "--controller", c.url, "--token", viewer), capture_output=True,
        text=True, timeout=60, check=True).stdout)
    assert [r["id"] for r in as_json["active_rollouts"]] == [rid]
    assert as_json["by_model"] == c.admin.call("GET", "/fleet/summary")["by_model"]

    with pytest.raises(urllib.error.HTTPError) as refused:
        scrape(c, None)
    assert refused.value.code == 401


def test_the_grafana_dashboard_charts_only_metrics_that_exist(
        start_controller: Callable[..., ControllerProcess], tmp_path: Path) -> None:
    from agent.metrics import AgentMetrics

    c = start_controller()
    agent = AgentMetrics()
    agent.inferences.labels("m", "1").inc()
    agent.errors.labels("m", "1").inc()
    agent.latency.labels("m", "1").observe(0.01)
    agent.installs.labels("committed").inc()
    families = scrape(c, c.token("viewer"))
    exposed = set(families) | {s.name for samples in families.values() for s in samples}
    exposed |= {s.name for f in agent.registry.collect() for s in f.samples}
    dashboard = json.loads((ROOT / "packaging" / "grafana-dashboard.json").read_text())
    used = {name for p in dashboard["panels"] for t in p["targets"]
            for name in re.findall(r"edgefleet_[a-z_]+", t["expr"])}
    assert used
    assert used <= exposed, used - exposed
