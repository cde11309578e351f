"""`edgefleet demo` end to end, as `make demo` runs it."""

import os
import re
import subprocess

from tests.conftest import cli


def test_demo_tells_the_whole_story() -> None:
    """A mixed fleet online; v1 everywhere; v2 through three canary stages; v3 failing one
    class's gate and rolled back automatically, with the reason in the timeline."""
    done = subprocess.run(cli("demo"), capture_output=True, text=True, timeout=240,
                          check=False, env=os.environ | {"COLUMNS": "240"})
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "48/48 devices online" in out
    assert "stage 3 of 3 (100%) passed its gates" in out
    assert re.search(r"rollback: (error rate|latency p95) in class x86_64/ram<2G/onnxruntime",
                     out)
    assert "reverted: " in out
    assert "48/48 devices run classifier@2.0.0; classifier@3.0.0 was rolled back" in out


def test_demo_fleet_only_brings_the_simulated_fleet_online() -> None:
    done = subprocess.run(cli("demo", "--devices", "6", "--timeout", "30", "--fleet-only"),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6/6 devices online" in done.stdout
