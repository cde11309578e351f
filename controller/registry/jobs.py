"""Background jobs: complete a version's smoke test and build its quantised variants.

The ``jobs`` table is the queue. A push adds a ``queued`` row in its own transaction;
one runner thread per controller claims the oldest queued job, runs the derive worker
(``controller.registry.derive``) in a child process, copies its progress lines into the
row, and on success stores the variants (blob store, ``variants`` rows, signed targets)
in one transaction. A job that was ``running`` when the controller stopped is queued
again at start, so a restart mid-quantisation loses nothing. This module does not
decide what to derive or how to compare; the worker does.
"""

import json
import logging
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from controller.db.engine import transaction
from controller.db.models import Job, ModelVersion, Variant
from controller.registry import service
from controller.registry.blobs import Blob, BlobStore
from controller.registry.inspect import inspect_artifact
from controller.registry.trust import TrustRepository

log = logging.getLogger(__name__)

DERIVE = "derive"
ACTIVE = ("queued", "running")


def enqueue(session: Session, *, version: ModelVersion, now: datetime) -> Job:
    job = Job(id=str(uuid.uuid4()), kind=DERIVE, version_id=version.id, state="queued",
              progress=0.0, message="waiting for the job runner", created_at=now)
    session.add(job)
    session.flush()
    return job


def requeue_interrupted(session: Session) -> int:
    """Jobs left ``running`` by a controller that stopped: run them again."""
    result = session.execute(update(Job).where(Job.state == "running").values(
        state="queued", progress=0.0, message="queued again after a controller restart"))
    return int(result.rowcount)  # type: ignore[attr-defined]


class JobRunner:
    """One thread that runs queued jobs one at a time, each in a child process."""

    def __init__(self, *, session_factory: sessionmaker[Session], blobs: BlobStore,
                 trust: TrustRepository, clock: Callable[[], datetime], workdir: Path,
                 timeout_s: float = 3600.0) -> None:
        self._sessions = session_factory
        self._blobs, self._trust, self._clock = blobs, trust, clock
        self._workdir = workdir
        self.timeout_s = timeout_s  # a job running longer is killed and marked failed
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._child: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with transaction(self._sessions) as session:
            if n := requeue_interrupted(session):
                log.info("queued %d interrupted jobs again", n)
        self._thread = threading.Thread(target=self._loop, name="edgefleet-jobs", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.kill()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if self.run_next():
                    continue
            except Exception:
                log.exception("the job runner failed; retrying shortly")
            self._wake.wait(timeout=5.0)
            self._wake.clear()

    def run_next(self) -> bool:
        """Claim and run the oldest queued job; False if there was none."""
        claimed = self._claim()
        if claimed is None:
            return False
        job_id, spec = claimed
        workdir = self._workdir / job_id
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        try:
            result, error = self._run_worker(job_id, dict(spec, workdir=str(workdir)), workdir)
            if result is not None:
                self._finish(job_id, result)
            else:
                self._set(job_id, state="failed", message=error, finished_at=self._clock())
        except Exception as exc:
            log.exception("job %s failed", job_id)
            self._set(job_id, state="failed", message=f"internal error: {exc}"[:512],
                      finished_at=self._clock())
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return True

    def _claim(self) -> tuple[str, dict[str, Any]] | None:
        with transaction(self._sessions) as session:
            job = session.scalar(select(Job).where(Job.state == "queued")
                                 .order_by(Job.created_at).limit(1))
            if job is None:
                return None
            taken = session.execute(update(Job).where(Job.id == job.id, Job.state == "queued")
                                    .values(state="running", started_at=self._clock(),
                                            message="starting"))
            if not taken.rowcount:  # type: ignore[attr-defined]
                return None
            version = session.get_one(ModelVersion, job.version_id)
            source = next(v for v in service.variants_of(session, version) if v.name == "source")
            return job.id, {"format": source.format, "quantization": source.quantization,
                            "source": str(self._blobs.path(source.sha256)),
                            "smoke_test": version.smoke_test}

    def _run_worker(self, job_id: str, spec: dict[str, Any], workdir: Path
                    ) -> tuple[dict[str, Any] | None, str]:
        result: dict[str, Any] | None = None
        error = ""
        with (workdir / "stderr.log").open("w+") as stderr:
            (workdir / "spec.json").write_text(json.dumps(spec))
            child = subprocess.Popen(  # noqa: S603 - our own module, our own file
                [sys.executable, "-m", "controller.registry.derive", str(workdir / "spec.json")],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True)
            self._child = child
            timed_out = threading.Event()

            def expire() -> None:
                timed_out.set()
                child.kill()

            watchdog = threading.Timer(self.timeout_s, expire)
            watchdog.start()
            for line in _json_lines(child.stdout or ()):
                if "progress" in line:
                    self._set(job_id, progress=float(line["progress"]),
                              message=str(line.get("message", ""))[:512])
                result = line.get("result", result)
                error = str(line.get("error", error))
            code = child.wait()
            watchdog.cancel()
            self._child = None
            if timed_out.is_set():
                result, error = None, f"stopped after {self.timeout_s:g} s: the job took too long"
            elif result is None and not error:
                stderr.seek(0)
                tail = [ln for ln in stderr.read().splitlines() if ln.strip()][-1:]
                error = (f"the derive worker died (exit code {code})"
                         + (f": {tail[0]}" if tail else ""))[:512]
        return (result if code == 0 else None), error

    def _finish(self, job_id: str, result: dict[str, Any]) -> None:
        stored = [(v, self._store(Path(v["path"]))) for v in result["variants"]]
        now = self._clock()
        with transaction(self._sessions) as session:
            job = session.get(Job, job_id)
            if job is None:  # the version was deleted meanwhile; the blob collector cleans up
                return
            version = session.get_one(ModelVersion, job.version_id)
            version.smoke_test = result["smoke_test"]
            variants = service.variants_of(session, version)
            source = next(v for v in variants if v.name == "source")
            source.expected = result["source_expected"]
            have = {v.name for v in variants}
            for built, blob in stored:
                if built["name"] in have:
                    continue
                info = inspect_artifact(blob.path)
                session.add(Variant(
                    id=str(uuid.uuid4()), version_id=version.id, name=built["name"],
                    format=source.format, quantization=built["quantization"],
                    sha256=blob.sha256, size=blob.size, requirements=info.requirements,
                    ram_estimate_bytes=info.ram_estimate_bytes, created_at=now,
                    target_path=service.target_path(version, built["name"], source.format),
                    derived_from=source.name, comparison=built["comparison"],
                    expected=built["expected"]))
            job.state, job.progress, job.finished_at = "succeeded", 1.0, now
            job.message = summary(stored)
            session.flush()
            service.publish_targets(session, self._trust, now=now)

    def _store(self, path: Path) -> Blob:
        return self._blobs.put(_chunks(path), max_bytes=path.stat().st_size)

    def _set(self, job_id: str, **values: Any) -> None:
        with transaction(self._sessions) as session:
            session.execute(update(Job).where(Job.id == job_id).values(**values))


def summary(stored: list[tuple[dict[str, Any], Blob]]) -> str:
    """One line for the job: what was built and how it compares with the source."""
    if not stored:
        return "smoke test completed; no variants to build from this source"
    parts = []
    for built, _ in stored:
        c = built["comparison"]
        figure = (f"top-1 agreement {c['top1_agreement']:.0%}" if "top1_agreement" in c
                  else f"token agreement {c['token_agreement']:.0%}")
        parts.append(f"{built['name']} at {c['size_ratio']:.0%} of the source size, {figure}")
    return ("built " + "; ".join(parts))[:512]


def _json_lines(stream: Any) -> Iterator[dict[str, Any]]:
    for raw in stream:
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue  # a library printing to stdout; not ours
        if isinstance(line, dict):
            yield line


def _chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk
