"""Structured logs: with EDGEFLEET_LOG_FORMAT=json every line a controller writes is a
JSON object, and no secret it handed out appears in it."""

import json
import signal
from collections.abc import Callable
from typing import Any

from tests.conftest import ControllerProcess, wait_for


def test_controller_logs_json_lines_without_secrets(
        start_controller: Callable[..., ControllerProcess], spawn: Callable[..., Any]) -> None:
    c = start_controller(env={"EDGEFLEET_LOG_FORMAT": "json"})
    enroll_token = c.enroll_token(uses=2)
    operator_token = c.token("operator")
    spawn("sim", "--devices", "2", "--controller", c.url, "--token", enroll_token,
          log_name="sim")
    wait_for(lambda: sum(d["status"] == "online" for d in c.devices()) == 2, 60,
             "two devices online")
    c.admin.call("DELETE", f"/devices/{c.devices()[0]['id']}")
    c.proc.send_signal(signal.SIGTERM)
    c.proc.wait(30)

    text = c.log()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines, "the controller logged nothing"
    for line in lines:
        assert set(line) >= {"ts", "level", "logger", "process", "pid", "msg"}, line
    assert any(line["msg"].startswith("edgefleet controller on http://") for line in lines)
    assert {line["process"] for line in lines} >= {"controller"}
    for secret in (c.admin.token or "", enroll_token, operator_token):
        assert len(secret) > 20
        assert secret not in text
