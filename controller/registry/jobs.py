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
                self._finish(job_id)
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
            samples = version.samples_sha256
            return job.id, {"format": source.format, "quantization": source.quantization,
                            "embedding": bool(source.requirements.get("gguf_embedding")),
                            "source": str(self._blobs.path(source.sha256)),
                            "samples": str(self._blobs.path(samples)) if samples else None,
                            "smoke_test": version.smoke_test, **version.derive_options}

    def _run_worker(self, job_id: str, spec: dict[str, Any], workdir: Path
                    ) -> tuple[dict[str, Any] | None, str]:
        """Run the worker, storing what it reports as it goes: the source's smoke test
        (the version is deployable from then on), each variant, each refusal."""
        result: dict[str, Any] | None = None
        error = ""
        with (workdir / "stderr.log").open("w+") as stderr:
            (workdir / "spec.json").write_text(json.dumps(spec))
            child = subprocess.Popen(  # noqa: S603 - our own module, our own file
                [sys.executable, "-m", "controller.registry.derive", str(workdir / "spec.json")],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True,
                cwd=workdir)  # the quantisers leave temporary files in the working directory
            self._child = child
            timed_out = threading.Event()

            def expire() -> None:
                timed_out.set()
                child.kill()

            watchdog = threading.Timer(self.timeout_s, expire)
            watchdog.start()
            try:
                for line in _json_lines(child.stdout or ()):
                    self._take(job_id, line)
                    result = line.get("result", result)
                    error = str(line.get("error", error))
            finally:
                if child.poll() is None:
                    child.kill()
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

    def _take(self, job_id: str, line: dict[str, Any]) -> None:
        if "progress" in line:
            self._set(job_id, progress=float(line["progress"]),
                      message=str(line.get("message", ""))[:512])
        elif "source" in line:
            blob = self._store(Path(line["source"]["smoke_path"]))
            self._with_version(job_id, lambda s, v: _store_source(s, v, line["source"], blob))
        elif "variant" in line:
            built = line["variant"]
            try:
                blob = self._store(Path(built["path"]))
                test = self._store(Path(built["smoke_path"]))
                self._with_version(job_id, lambda s, v: _store_variant(
                    s, v, built, blob, test, now=self._clock()))
            except Exception as exc:  # one variant that cannot be stored never fails the version
                log.exception("storing variant %s of job %s failed", built["name"], job_id)
                refusal = {"name": built["name"], "reason": f"could not be stored: {exc}",
                           "comparison": built.get("comparison")}
                self._with_version(job_id, lambda s, v: _store_refusal(v, refusal))
        elif "refused" in line:
            self._with_version(job_id, lambda s, v: _store_refusal(v, line["refused"]))

    def _with_version(self, job_id: str, change: Callable[[Session, ModelVersion], None]
                      ) -> None:
        """Apply ``change`` to the job's version and re-sign the targets, in one
        transaction; nothing if the version was deleted meanwhile."""
        with transaction(self._sessions) as session:
            job = session.get(Job, job_id)
            if job is None:  # the version was deleted; the blob collector cleans up
                return
            change(session, session.get_one(ModelVersion, job.version_id))
            session.flush()
            service.publish_targets(session, self._trust, now=self._clock())

    def _finish(self, job_id: str) -> None:
        """Mark the job done (everything was stored as the worker reported it)."""
        with transaction(self._sessions) as session:
            job = session.get(Job, job_id)
            if job is None:
                return
            version = session.get_one(ModelVersion, job.version_id)
            job.state, job.progress, job.finished_at = "succeeded", 1.0, self._clock()
            job.message = summary(service.variants_of(session, version), version.refused)

    def _store(self, path: Path) -> Blob:
        return self._blobs.put(_chunks(path), max_bytes=path.stat().st_size)

    def _set(self, job_id: str, **values: Any) -> None:
        with transaction(self._sessions) as session:
            session.execute(update(Job).where(Job.id == job_id).values(**values))


def _store_source(session: Session, version: ModelVersion, done: dict[str, Any],
                  test: Blob) -> None:
    source = next(v for v in service.variants_of(session, version) if v.name == "source")
    if source.smoke_sha256 is not None:  # run again after a restart: keep what was signed
        return
    version.smoke_test = done["smoke_test"]
    source.smoke_sha256, source.smoke_size = test.sha256, test.size
    source.comparison = {"metric": done["metric"], "inputs": done["inputs"]} | (
        {"perplexity": done["perplexity"]} if done.get("perplexity") else {})
    if done.get("ram_bytes"):
        source.ram_estimate_bytes, source.ram_measured = int(done["ram_bytes"]), True


def _store_variant(session: Session, version: ModelVersion, built: dict[str, Any], blob: Blob,
                   test: Blob, *, now: datetime) -> None:
    variants = service.variants_of(session, version)
    if built["name"] in {v.name for v in variants}:
        return
    source = variants[0]
    info = inspect_artifact(blob.path, checker=False)  # built and run by the worker
    measured = built.get("ram_bytes")
    session.add(Variant(
        id=str(uuid.uuid4()), version_id=version.id, name=built["name"],
        format=source.format, quantization=built["quantization"],
        sha256=blob.sha256, size=blob.size, requirements=info.requirements,
        ram_estimate_bytes=int(measured) if measured else info.ram_estimate_bytes,
        ram_measured=bool(measured), created_at=now,
        target_path=service.target_path(version, built["name"], source.format),
        derived_from=source.name, comparison=built["comparison"],
        smoke_sha256=test.sha256, smoke_size=test.size))
    version.refused = [r for r in version.refused if r["name"] != built["name"]]


def _store_refusal(version: ModelVersion, refused: dict[str, Any]) -> None:
    version.refused = [r for r in version.refused if r["name"] != refused["name"]] + [{
        "name": refused["name"], "reason": str(refused["reason"])[:1024],
        "comparison": refused.get("comparison")}]


def summary(variants: list[Variant], refused: list[dict[str, Any]]) -> str:
    """One line for the job: what was built, how it compares with the source, what was
    refused."""
    parts = []
    for v in variants:
        c = v.comparison or {}
        if v.derived_from is None:
            continue
        metric = c.get("metric", "")
        figure = c.get("fidelity", {}).get(metric)
        parts.append(f"{v.name} at {c.get('size_ratio', 0):.0%} of the source size"
                     + (f", {metric} {figure:.3f}" if figure is not None else ""))
    parts += [f"{r['name']} refused: {r['reason']}" for r in refused]
    if not parts:
        return "smoke test completed; no variants to build from this source"
    return ("; ".join(parts))[:512]


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
