"""The model worker held to the box's memory limit by a real memory cgroup (root)."""

import subprocess
from pathlib import Path

import numpy as np
import pytest

from agent import limits
from agent.runtime import ModelWorker, RuntimeCrashed
from cli.samples import mlp_onnx
from tests.conftest import unavailable

MiB = 1 << 20
ROWS = 64


@pytest.fixture(autouse=True)
def cgroups() -> None:
    try:
        limits.WorkerLimit.make(MiB).remove()
    except limits.LimitUnavailable as exc:
        unavailable(f"a memory cgroup ({exc})")


def _worker(tmp_path: Path, scratch: int) -> ModelWorker:
    path = tmp_path / f"m{scratch}.onnx"
    path.write_bytes(mlp_onnx(hidden=4096, inputs=256, batch="N", scratch_bytes=scratch))
    return ModelWorker(path, "onnx", memory_limit=120 * MiB)


def _infer(worker: ModelWorker) -> object:
    x = np.ones((ROWS, 256), np.float32)
    return worker.call("infer_raw", inputs={"x": ("float32", [ROWS, 256], x.tobytes())})


def test_a_model_that_needs_more_than_the_limit_is_stopped_and_says_so(tmp_path) -> None:
    """64 rows of 2 MiB of scratch each need 128 MiB more than the model: over a 120 MiB
    limit the kernel stops the worker; the same model without the scratch runs."""
    fits, hungry = _worker(tmp_path, 0), _worker(tmp_path, 2 * MiB)
    try:
        fits.start()
        hungry.start()  # loading fits: only the rows it is sent need the memory
        assert fits.limit is not None
        assert hungry.limit is not None
        assert _infer(fits)
        with pytest.raises(RuntimeCrashed, match="ran out of memory: it needs more than "
                           "this box's limit of 120 MiB"):
            _infer(hungry)
        assert hungry.limit.oom_kills() >= 1
        assert _infer(fits)  # a worker of its own: the other's limit was not shared
        made = [fits.limit.path, hungry.limit.path]
    finally:
        fits.stop()
        hungry.stop()
    assert not any(p.exists() for p in made)  # removed with their workers


def test_no_limit_makes_no_cgroup(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(mlp_onnx(hidden=64))
    worker = ModelWorker(path, "onnx")
    worker.start()
    try:
        assert worker.limit is None
    finally:
        worker.stop()


def test_the_worker_cgroups_of_a_killed_agent_are_removed_and_a_live_ones_kept() -> None:
    gone = subprocess.Popen(["true"])  # a pid that has exited
    gone.wait()
    live = limits.WorkerLimit.make(64 * MiB)  # this process's: it is alive
    dead = live.path.with_name(f"{limits.PREFIX}{gone.pid}-0")
    dead.mkdir()
    try:
        limits.remove_stale()
        assert not dead.exists()
        assert live.path.exists()
    finally:
        live.remove()
