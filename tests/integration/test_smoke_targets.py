"""Smoke tests of any size travel as signed targets of their own, pinned by hash."""

import hashlib
import json

import numpy as np

from tests.conftest import wait_for
from tests.integration.test_delivery import enroll, online, operator_cli, reported
from tests.support import corpus


def test_a_smoke_test_over_a_megabyte_is_signed_delivered_and_run_on_a_real_agent(
        start_controller, spawn, tmp_path) -> None:
    controller = start_controller()
    entry = corpus.build("convnet")
    image = np.random.default_rng(0).uniform(0, 1, (1, 1, 3, 160, 160)).astype(np.float32)
    np.save(tmp_path / "image.npy", image)  # one sample, 300 KB of floats
    pushed = operator_cli(controller, "model", "push", str(entry.path), "--name", "convnet",
                          "--version", "1.0.0", "--samples", f"image={tmp_path / 'image.npy'}",
                          "--json")
    version = json.loads(pushed[pushed.index("{"):])
    assert version["status"] == "ready", version["job"]
    source = version["variants"][0]
    assert source["smoke_test_bytes"] >= 1 << 20
    targets = json.loads((controller.data_dir / "tuf" / "metadata" / "targets.json")
                         .read_text())["signed"]["targets"]
    assert len(json.dumps(targets[source["target"]])) < 1024  # the model's entry stays small
    smoke_target = targets[f"{source['target']}.smoke.json"]
    assert smoke_target["length"] == source["smoke_test_bytes"]

    config, state, _local = enroll(controller, tmp_path, "box-1")
    spawn("agent", "run", "--config", str(config), log_name="box-1")
    device_id = online(controller, "box-1")
    operator_cli(controller, "devices", "pin", device_id, "convnet@1.0.0")
    done = wait_for(lambda: reported(controller, device_id, 1), 120, "the install to finish")
    assert done["state"] == "committed", done
    kinds = [e["kind"] for e in controller.admin.call("GET", f"/devices/{device_id}/events")]
    assert "smoke_test" in kinds
    (installed,) = (v for v in version["variants"] if v["name"] == done["variant"])
    staged = state / "models" / installed["sha256"] / "smoke.json"
    assert staged.stat().st_size >= 1 << 20
    assert (hashlib.sha256(staged.read_bytes()).hexdigest()
            == targets[f"{installed['target']}.smoke.json"]["hashes"]["sha256"])
