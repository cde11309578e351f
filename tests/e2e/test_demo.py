"""`edgefleet demo` end to end, as `make demo` runs it."""

import subprocess

from tests.conftest import cli


def test_demo_brings_the_simulated_fleet_online() -> None:
    done = subprocess.run(cli("demo", "--devices", "6", "--timeout", "30"), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6/6 devices online" in done.stdout
