"""`edgefleet demo` end to end, as `make demo` runs it."""

import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cli.api import Api
from tests.conftest import cli
from tests.integration.test_metrics import by_version


def test_demo_tells_the_whole_story() -> None:
    """A mixed fleet online (48 simulated devices, 6 real agents); v1 everywhere; v2
    through three canary stages; v3 failing its gates and rolled back automatically, with
    the reasons in the timeline: on a simulated class the fault the simulator plays, on
    the real agents' class the memory they measured. The real canary got the revert as a
    rollback. While v2 rolls out, /metrics counts devices per version as the fleet
    summary does."""
    proc = subprocess.Popen(cli("demo"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=os.environ | {"COLUMNS": "240"})
    lines, api, matched = [], None, None
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if m := re.search(r"dashboard: (http://127.0.0.1:\d+)/ \(sign in with the token in "
                          r"(\S+)\);", line):
            api = Api(m.group(1), Path(m.group(2)).read_text().strip())
        if api is not None and matched is None and "rollout of classifier@2.0.0" in line:
            matched = metrics_match_summary(api)
    proc.wait(240)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "48/48 devices online" in out
    assert "6 real agents online" in out
    assert "stage 3 of 3 (100%) passed its gates" in out
    assert re.search(r"- (error rate|latency p95) in class x86_64/ram<2G/onnxruntime", out), out
    assert "why classifier@3.0.0 was rolled back:" in out
    assert re.search(r"- memory in class x86_64/ram<8G/\S+: [\d.]+x the baseline", out), out
    assert "reverted: " in out
    # the real agents' table: a canary downloaded v3 and got the revert as a rollback
    # (nothing fetched again), the others were kept on v2 and probed
    assert re.search(r"edge-\d\s+classifier@2\.0\.0.*\brollback\b.*\bcommitted\b", out), out
    assert "54/54 devices run classifier@2.0.0; classifier@3.0.0 was rolled back" in out
    assert matched, "/metrics never matched the fleet summary during the v2 rollout"
    assert sum(matched.values()) == 54


def metrics_match_summary(api: Api) -> dict[str, int] | None:
    """Per-version device counts from /metrics, once they equal the summary's taken just
    before and just after (the fleet moves while a rollout runs)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        before = api.call("GET", "/fleet/summary")["by_model"]
        req = urllib.request.Request(f"{api.controller}/metrics",  # noqa: S310
                                     headers={"Authorization": f"Bearer {api.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            families = text_string_to_metric_families(resp.read().decode())
        counts = by_version(next(f for f in families if f.name == "edgefleet_devices").samples)
        after = api.call("GET", "/fleet/summary")["by_model"]
        if before == after == counts:
            return dict(counts)
        time.sleep(0.2)
    return None


def test_demo_fleet_only_brings_the_simulated_fleet_online() -> None:
    done = subprocess.run(cli("demo", "--devices", "6", "--timeout", "30", "--fleet-only"),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6/6 devices online" in done.stdout
