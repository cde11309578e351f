"""The dashboard in headless Chromium (Playwright driving Debian's /usr/bin/chromium)
against a real controller and a simulated fleet on both backends."""

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ControllerProcess, unavailable, wait_for
from tests.integration.test_rollout_durability import setup_fleet

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("EDGEFLEET_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[2] / "build" / "test-artifacts"))


@pytest.fixture
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright (pip install playwright)")
    if not CHROMIUM.exists():
        unavailable("Chromium (apt-get install chromium)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox"])
        yield chromium
        chromium.close()


def signed_in(browser: Any, c: ControllerProcess, token: str) -> Any:
    """A fresh page signed in with ``token`` on the fleet view."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(c.url)
    page.fill("#token", token)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#fleet .card")
    return page


def test_dashboard_shows_the_fleet_live_and_acts_by_role(
        start_controller: Callable[..., ControllerProcess], spawn: Callable[..., Any],
        browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    c = start_controller("--rollout-tick", "0.5")
    setup_fleet(c, spawn, tmp_path)
    sim = spawn("sim", "--devices", "1", "--controller", c.url, "--token", c.enroll_token(),
                log_name="lone")
    lone = wait_for(lambda: [d["id"] for d in c.devices()
                             if d["status"] == "online" and not d["reported"]], 60,
                    "a ninth device online")[0]
    rid = c.admin.call("POST", "/rollouts", {"model": "m", "version": "2.0.0",
                                             "stages": "25%:1h,100%"})["id"]
    wait_for(lambda: c.admin.call("GET", f"/rollouts/{rid}")["state"] == "baking", 60,
             "the canary stage baking")

    operator = signed_in(browser, c, c.token("operator"))
    box = operator.locator(f".rollout[data-rollout='{rid}']")
    box.wait_for()
    assert box.get_attribute("data-state") == "baking"
    assert "stage 1 of 2 (25%)" in box.inner_text()
    assert operator.locator("#card-devices .n").inner_text() == "9"
    assert operator.locator("#by-class tbody tr").count() >= 2
    assert "m@1.0.0" in operator.locator("#by-model").inner_text()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    operator.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    viewer = signed_in(browser, c, c.token("viewer"))
    viewer.locator(f".rollout[data-rollout='{rid}']").wait_for()
    assert viewer.locator("button[data-action]").count() == 0
    assert "(viewer)" in viewer.locator("#who").inner_text()

    operator.click("nav a[href='#/devices']")  # no reload from here on
    canary = next(d for d in c.devices() if (d["reported"] or {}).get("version") == "2.0.0")
    operator.fill("#search", canary["id"])
    expect(operator.locator("#devices tbody tr")).to_have_count(1)
    operator.click(f"tr[data-device='{canary['id']}'] a")
    expect(operator.locator("#events")).to_contain_text("committed")
    expect(operator.locator("svg.chart text").first).to_contain_text("CPU: ")
    assert "no data" not in operator.locator("svg.chart text").first.text_content()
    operator.click("nav a[href='#/devices']")
    status = operator.locator(f"tr[data-device='{lone}'] td.status")
    status.wait_for()
    assert status.inner_text() == "online"
    operator.evaluate("window.__same_page = true")
    os.kill(sim.pid, signal.SIGKILL)
    expect(status).to_have_text("offline", timeout=30_000)
    assert operator.evaluate("window.__same_page") is True

    operator.click("nav a[href='#/']")
    operator.once("dialog", lambda dialog: dialog.accept())
    operator.click(f".rollout[data-rollout='{rid}'] button[data-action='rollback']")
    wait_for(lambda: c.admin.call("GET", f"/rollouts/{rid}")["state"] in (
        "rolling_back", "rolled_back"), 30, "the rollout rolling back")
    operator.wait_for_selector(f".rollout[data-rollout='{rid}'] .state.rolling_back, "
                               f".rollout[data-rollout='{rid}'] .state.rolled_back",
                               timeout=10_000)
    audited = c.admin.call("GET", "/audit?action=rollout")
    assert [(e["actor"], e["action"]) for e in audited] == [
        ("test-operator", "rollout.rollback"), ("bootstrap-admin", "rollout.create")]


def test_the_models_page_shows_each_variants_worth_and_why_one_was_refused(
        start_controller: Callable[..., ControllerProcess], browser: Any,
        tmp_path: Path) -> None:
    from playwright.sync_api import expect

    from tests.models import tiny_onnx

    c = start_controller()
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_onnx())
    for version, extra in (("1.0.0", {}), ("1.1.0", {"variants": ["int8"],
                                                      "min_fidelity": "iou>=0.5"})):
        up = c.admin.upload("/uploads", model, params={"filename": "m.onnx"})
        c.admin.call("POST", f"/models/m/versions/{version}", {"upload": up["sha256"], **extra})
        wait_for(lambda v=version: c.admin.call("GET", f"/models/m/versions/{v}")["status"]
                 == "ready", 120, f"m@{version} built")
    page = signed_in(browser, c, c.token("viewer"))
    page.click("nav a[href='#/models']")
    offered = page.locator("section[data-version='m@1.0.0'] tr[data-variant='int8']")
    expect(offered).to_contain_text("top1 1.0000")
    expect(offered).to_contain_text("offered")
    refused = page.locator("section[data-version='m@1.1.0'] tr[data-refused='int8']")
    expect(refused).to_contain_text("refused: ")
    expect(refused).to_contain_text("iou does not apply to this model's outputs")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "models.png"), full_page=True)
