"""`edgefleet model push/list/show` against a real controller process."""

import json
import os
import subprocess

from tests.conftest import cli
from tests.models import tiny_onnx


def run(controller, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args, "--controller", controller.url, "--token",
                              controller.admin.token or ""),
                          capture_output=True, text=True, timeout=120, check=False,
                          env=os.environ | {"COLUMNS": "200"})


def test_push_list_and_show_a_model_from_the_command_line(start_controller, tmp_path) -> None:
    controller = start_controller()
    model = tmp_path / "mlp.onnx"
    model.write_bytes(tiny_onnx())
    pushed = run(controller, "model", "push", str(model), "--name", "mlp", "--version", "1.0.0")
    assert pushed.returncode == 0, pushed.stderr
    assert "int8" in pushed.stdout  # waited for the variants, shows them with their figures
    assert "top1 " in pushed.stdout  # the fidelity metric chosen from the outputs
    listed = json.loads(run(controller, "model", "list", "--json").stdout)
    assert [(v["name"], v["version"], v["status"]) for v in listed] == [("mlp", "1.0.0",
                                                                       "ready")]
    shown = json.loads(run(controller, "model", "show", "mlp@1.0.0", "--json").stdout)
    assert [(v["name"], v["signed"]) for v in shown["variants"]] == [("source", True),
                                                                     ("int8", True)]

    smoke = tmp_path / "smoke.json"
    smoke.write_text(json.dumps({"inputs": [{"wrong": [[1.0]]}]}))
    failed = run(controller, "model", "push", str(model), "--name", "mlp", "--version", "1.1.0",
                 "--smoke-test", str(smoke), "--labels", "team=vision")
    assert failed.returncode == 1
    assert "the model takes ['x']" in failed.stdout
    deleted = run(controller, "model", "delete", "mlp@1.1.0")
    assert deleted.returncode == 0, deleted.stderr
    listed = json.loads(run(controller, "model", "list", "--json").stdout)
    assert [v["version"] for v in listed] == ["1.0.0"]

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(tiny_onnx()[:40])
    refused = run(controller, "model", "push", str(broken), "--name", "mlp", "--version", "2.0.0")
    assert refused.returncode == 1
    assert "invalid_model" in refused.stderr


def test_push_folds_external_data_and_takes_samples_variants_and_a_floor(
        start_controller, tmp_path) -> None:
    import numpy as np

    from tests.support import corpus

    controller = start_controller()
    entry = corpus.build("external_data")
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=np.stack([f["x"] for f in entry.samples]))  # by input, stacked
    pushed = run(controller, "model", "push", str(entry.path), "--name", "mlp", "--version",
                 "1.0.0", "--samples", str(samples), "--variants", "int8,fp16",
                 "--min-fidelity", "top1>=1.01")
    assert pushed.returncode == 1, pushed.stdout  # a floor above 1 is refused at once
    assert "must be between 0 and 1" in pushed.stderr
    pushed = run(controller, "model", "push", str(entry.path), "--name", "mlp", "--version",
                 "1.0.0", "--samples", str(samples), "--variants", "int8,fp16",
                 "--min-fidelity", "cosine>=0.99999999")
    assert pushed.returncode == 0, pushed.stderr
    assert "folded external.onnx's external data into the upload" in pushed.stdout
    assert "not offered: " in pushed.stdout  # int8 falls below a floor that high
    shown = json.loads(run(controller, "model", "show", "mlp@1.0.0", "--json").stdout)
    assert shown["variants"][0]["comparison"]["inputs"] == len(entry.samples)
    refused = {r["name"]: r["reason"] for r in shown["refused"]}
    assert "below the version's floor" in refused["int8"]
    bare = run(controller, "model", "push", str(entry.path), "--name", "mlp", "--version",
               "1.1.0", "--no-derive", "--samples", str(samples), "--json")
    assert bare.returncode == 0, bare.stderr
    out = json.loads(bare.stdout[bare.stdout.index("{"):])
    assert [v["name"] for v in out["variants"]] == ["source"]


def test_push_declares_a_sentence_encoder_from_its_sentence_transformers_directory(
        start_controller, tmp_path) -> None:
    from tests.models import tiny_encoder

    controller = start_controller()
    model = tiny_encoder(tmp_path / "st")
    smoke = tmp_path / "smoke.json"
    smoke.write_text(json.dumps({"inputs": [{"input_ids": [[2, 3]],
                                             "attention_mask": [[1, 1]]}]}))
    push = ["model", "push", str(model), "--name", "words", "--no-derive", "--smoke-test",
            str(smoke), "--encoder", str(tmp_path / "st")]
    pushed = run(controller, *push, "--version", "1.0.0")
    assert pushed.returncode == 0, pushed.stderr
    assert "tokenizer and pooling into the upload" in pushed.stdout
    shown = json.loads(run(controller, "model", "show", "words@1.0.0", "--json").stdout)
    assert shown["variants"][0]["requirements"]["onnx_embedding"] == {
        "pooling": "mean", "normalize": True, "max_tokens": 8, "dimension": 4}
    (tmp_path / "st" / "tokenizer.json").unlink()
    refused = run(controller, *push, "--version", "1.1.0")
    assert refused.returncode == 2
    assert "has no tokenizer.json" in refused.stderr
