"""Drives the install state machine: download (TUF over MQTT), verify, stage, activate,
smoke test, probation, commit; or roll back to the previous model.

On disk, under the agent's state dir::

    install.json            the install in progress or last finished (atomic writes)
    models/<sha256>/        a staged, verified model: model.<onnx|gguf> + meta.json, and
                            smoke.json (its smoke test, a signed target of its own)
    current -> models/<sha> the active model (a symlink, swapped atomically)
    tuf/metadata, tuf/download

The state is written *before* every step that changes something, so an agent killed
anywhere resumes per ``machine.RESUME`` and only ever serves a staged model whose hash
was checked against signed metadata. Steps before activation never touch ``current``,
so a failure there leaves the previous model serving.
"""

import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from tuf.api import exceptions as tuf_errors

from agent.faults import crash_point
from agent.session import install_outcome
from agent.update.machine import RESUME, TERMINAL, Event, State, next_state
from shared import smoke, targets
from shared.files import fsync_dir, write_atomic
from shared.messages import DesiredState, Probe
from shared.targets import TargetInfo

log = logging.getLogger(__name__)

SMOKE_FILE = "smoke.json"
META_FILE = "meta.json"  # the variant's TargetInfo, as signed


@dataclass(frozen=True)
class Install:
    """What ``install.json`` holds."""

    generation: int = 0
    state: State = State.IDLE
    model: str | None = None
    version: str | None = None
    variant: str | None = None
    target: str | None = None
    sha256: str | None = None
    previous: str | None = None  # the sha256 that was active before this install
    rollback: bool = False  # a rollout giving back a proven model: no probation
    probe: dict[str, Any] | None = None  # the desired state's ``Probe``, as JSON
    reason: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


class InstallFailed(Exception):
    """A step failed; ``reason`` is a stable code for the controller, ``str`` the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Reporter(Protocol):
    def event(self, kind: str, generation: int, detail: str) -> None: ...
    def reported(self, install: Install) -> None: ...


class Room(NamedTuple):
    """Memory a new model may take: while the running one serves, and once it stops."""

    beside: int
    alone: int


class Serving(Protocol):
    def activate(self, model_dir: Path | None, *, replace: bool = False) -> None: ...
    def smoke_test(self, model_dir: Path) -> str | None: ...
    def probation(self, seconds: float, stop: threading.Event) -> str | None: ...


class Installer:
    """Runs installs on its own thread, one at a time; newer desired states win."""

    def __init__(self, state_dir: Path, *, updater: Callable[[], Any], reporter: Reporter,
                 serving: Serving, probation_s: float = 5.0,
                 download: Callable[[Any], Path] | None = None,
                 disk_free: Callable[[Path], int] | None = None,
                 ram_free: Callable[[], Room] | None = None) -> None:
        self.dir = state_dir
        self.models = state_dir / "models"
        self.current = state_dir / "current"
        self._updater, self._reporter, self._serving = updater, reporter, serving
        self._fetch = download  # target info -> verified file; else the Updater's own
        self._probation_s = probation_s
        self._disk_free = disk_free or (lambda p: shutil.disk_usage(p).free)
        self._ram_free = ram_free or _available_ram
        self._wanted: DesiredState | None = None
        self._progress_tenth = 0  # of the current download, reported as events
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="installer", daemon=True)
        self.install = self._load()

    # -- the outside ------------------------------------------------------------------

    def start(self) -> None:
        self.models.mkdir(parents=True, exist_ok=True)
        self._serving.activate(self.active_dir())
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def want(self, desired: DesiredState) -> None:
        """A verified desired state (from the MQTT thread): install it unless it is done
        or in progress (an install being resumed has that generation already)."""
        if desired.generation <= self.install.generation:
            return
        self._wanted = desired
        self._wake.set()

    def progress(self, target: str, done: int, total: int) -> None:
        """From the fetcher, after every chunk of a blob: an event at each tenth."""
        install = self.install
        tenth = 10 * done // total if total else 10
        if install.state != State.DOWNLOADING or tenth <= self._progress_tenth:
            return
        self._progress_tenth = tenth
        self._reporter.event("download_progress", install.generation,
                             f"{done} of {total} bytes ({10 * tenth}%) of {target}")

    def health(self) -> dict[str, Any]:
        """The last install's outcome, for every health report."""
        install = self.install
        return install_outcome(install.generation, install.state, install.reason)

    def probe(self) -> Probe | None:
        """The probes the controller asked for, while the model they exercise serves."""
        install = self.install
        if install.probe is None or install.state != State.COMMITTED:
            return None
        return Probe.model_validate(install.probe)

    def active_dir(self) -> Path | None:
        return self.current.resolve() if self.current.is_symlink() else None

    # -- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        if self.install.state not in TERMINAL:
            log.info("resuming the install of generation %d from %s", self.install.generation,
                     self.install.state)
            self._run(replace(self.install, state=RESUME[self.install.state]))
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            desired, self._wanted = self._wanted, None
            if desired is None or self._stop.is_set():
                continue
            if self._serves(desired):
                self._keep(desired)
            else:
                self._run(self._begin(desired))

    def _serves(self, d: DesiredState) -> bool:
        """Whether ``d`` names the model that already serves, committed (a rollback is
        always carried out: it re-hashes and smoke-tests the copy)."""
        install = self.install
        return install.state == State.COMMITTED and not d.rollback and d.sha256 is not None \
            and d.sha256 == self._active_sha() and \
            (d.model, d.version, d.variant) == (install.model, install.version, install.variant)

    def _keep(self, d: DesiredState) -> None:
        """A desired state naming the serving model: nothing to install; its probes (or
        none) take over, and the new generation is reported committed at once."""
        probe = d.probe.model_dump(mode="json") if d.probe else None
        install = replace(self.install, generation=d.generation, probe=probe, rollback=False,
                          reason="")
        self._save(install)
        detail = (f"probes every {d.probe.interval_s:g}s (at most {d.probe.max_cpu_share:.0%} "
                  f"of the CPU) until {d.probe.until.isoformat()} for rollout {d.probe.rollout}"
                  if d.probe else "no probes")
        self._reporter.event("kept", d.generation, f"{d.target} already serves; {detail}")
        self._reporter.reported(install)

    def _begin(self, d: DesiredState) -> Install:
        self._progress_tenth = 0
        return Install(generation=d.generation, state=next_state(State.IDLE, Event.START),
                       model=d.model, version=d.version, variant=d.variant, target=d.target,
                       sha256=d.sha256, previous=self._active_sha(), rollback=d.rollback,
                       probe=d.probe.model_dump(mode="json") if d.probe else None)

    def _run(self, install: Install) -> None:
        steps: dict[State, Callable[[Install], Install]] = {
            State.DOWNLOADING: self._download, State.ACTIVATING: self._activate,
            State.SMOKE_TEST: self._smoke_test, State.PROBATION: self._probation,
        }
        if install.target is None:  # "run no model"
            self._save(install)
            self._swap(None)
            self._serving.activate(None)
            self._finish(replace(install, state=State.COMMITTED))
            return
        self._save(install)
        self._reporter.event(install.state.value, install.generation, install.target)
        while install.state not in TERMINAL:
            if self._wanted is not None and self._wanted.generation > install.generation:
                log.info("generation %d supersedes %d", self._wanted.generation,
                         install.generation)
                if install.state in (State.SMOKE_TEST, State.PROBATION):
                    install = self._rollback(install, "superseded")
                self._reporter.event("superseded", install.generation, install.target or "")
                return
            failure = None
            try:
                install = steps[install.state](install)
            except InstallFailed as exc:
                failure = exc
            except Exception as exc:  # a bug or an I/O error must not stop the installer
                log.exception("install step %s failed", install.state.value)
                failure = InstallFailed("internal_error", f"{type(exc).__name__}: {exc}")
            if failure is not None:
                reason = f"{failure.reason}: {failure}"
                if install.state in (State.SMOKE_TEST, State.PROBATION):
                    install = self._rollback(install, reason)
                else:
                    install = replace(install, state=next_state(install.state, Event.FAILED),
                                      reason=reason)
                    self._discard_partial()
            self._save(install)
        self._finish(install)

    # -- steps --------------------------------------------------------------------------

    def _download(self, install: Install) -> Install:
        """Refresh TUF metadata, download the target (checked against its signed length
        and hashes), re-hash it, and stage it under models/<sha256>: downloading ->
        verifying -> staging."""
        assert install.target is not None  # noqa: S101 - checked by _run
        if install.rollback and install.sha256 and \
                (self.models / install.sha256 / META_FILE).exists():
            # the copy it kept was verified when it came; activation re-hashes it against
            # the signed desired state's hash: no metadata, no download
            self._reporter.event("rollback", install.generation, f"to the copy of "
                                 f"{install.target} kept as {install.sha256[:12]}")
            install = self._step(self._step(install, Event.DOWNLOADED), Event.VERIFIED)
            return self._step(install, Event.STAGED)
        try:
            updater = self._updater()
            updater.refresh()
            info = updater.get_targetinfo(install.target)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            raise InstallFailed("metadata_refused", f"{type(exc).__name__}: {exc}") from None
        if info is None:
            raise InstallFailed("not_signed", f"{install.target} is not a signed target")
        try:
            about = targets.parse(info.custom)
        except ValueError as exc:
            raise InstallFailed("not_signed", f"{install.target}'s signed description is "
                                f"not one this agent reads: {exc}") from None
        sha = info.hashes["sha256"]
        if install.sha256 is not None and install.sha256 != sha:
            raise InstallFailed("not_signed", f"the desired state wants {install.sha256} "
                                f"but {install.target} is signed as {sha}")
        install = replace(install, sha256=sha, detail={"size": info.length})
        self._save(install)
        staged = self.models / sha
        ram = about.ram_estimate_bytes
        if ram > (room := self._ram_free()).alone:
            raise InstallFailed("insufficient_memory", f"{install.target} needs about {ram} "
                                f"bytes of RAM; {room.alone} are available with the "
                                "running model stopped")
        if not (staged / META_FILE).exists():
            test = self._smoke_target(updater, about)
            needed = 2 * info.length + (test.length if test else 0)
            free = self._disk_free(self.dir)
            if free < needed:
                raise InstallFailed("insufficient_disk", f"needs {needed} bytes free for "
                                    f"{install.target}, has {free}")
            path = self._download_one(updater, info)
            test_path = self._download_one(updater, test) if test else None
            install = self._step(install, Event.DOWNLOADED)
            if _sha256(path) != sha:
                path.unlink(missing_ok=True)
                raise InstallFailed("hash_mismatch", f"{install.target} changed on disk")
            install = self._step(install, Event.VERIFIED)
            self._stage(path, staged, about, test_path)
        else:
            install = self._step(self._step(install, Event.DOWNLOADED), Event.VERIFIED)
        return self._step(install, Event.STAGED)

    def _smoke_target(self, updater: Any, about: TargetInfo) -> Any:
        """The signed target of the variant's smoke test, checked against the hash and
        length the variant's own target pins; None if it has none."""
        ref = about.smoke_test
        if ref is None:
            return None
        try:
            test = updater.get_targetinfo(ref.target)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            raise InstallFailed("metadata_refused", f"{type(exc).__name__}: {exc}") from None
        if test is None or test.hashes.get("sha256") != ref.sha256 or test.length != ref.length:
            raise InstallFailed("not_signed", f"the smoke test {ref.target} is not signed as "
                                "the variant's target pins it")
        return test

    def _download_one(self, updater: Any, info: Any) -> Path:
        """``info``'s file, downloaded and checked against its signed length and hashes."""
        try:
            return self._fetch(info) if self._fetch else Path(updater.download_target(info))
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            raise InstallFailed("download_refused", f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            reason = "insufficient_disk" if exc.errno == 28 else "io_error"
            raise InstallFailed(reason, str(exc)) from None

    def _stage(self, path: Path, staged: Path, about: TargetInfo,
               test: Path | None) -> None:
        work = staged.with_name(staged.name + ".tmp")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        if test is not None:
            os.replace(test, work / SMOKE_FILE)
        os.replace(path, work / f"model.{about.format}")
        write_atomic(work / META_FILE, about.model_dump_json().encode())
        fsync_dir(work)
        os.replace(work, staged)
        fsync_dir(self.models)

    def _activate(self, install: Install) -> Install:
        assert install.sha256 is not None  # noqa: S101 - set while downloading
        staged = self.models / install.sha256
        model = _model_file(staged)
        if model is None or _sha256(model) != install.sha256:
            raise InstallFailed("staged_corrupt", f"the staged copy of {install.target} "
                                "is missing or damaged")
        # a model that does not fit beside the running one replaces it: serving stops
        # while it loads, which is better than a box that can never update
        ram = TargetInfo.model_validate_json((staged / META_FILE).read_bytes()
                                             ).ram_estimate_bytes
        replacing = ram > (room := self._ram_free()).beside
        if replacing:
            log.info("%s needs about %d bytes, %d are free beside the running model: it "
                     "is stopped while the new one loads", install.target, ram, room.beside)
        self._swap(staged)
        crash_point("swapped")
        try:
            self._serving.activate(staged, replace=replacing)
        except Exception as exc:  # noqa: BLE001 - any runtime failure to load
            self._swap(self.models / install.previous if install.previous else None)
            self._serving.activate(self.active_dir())
            raise InstallFailed("load_failed", str(exc)) from None
        return self._step(install, Event.ACTIVATED)

    def _smoke_test(self, install: Install) -> Install:
        assert install.sha256 is not None  # noqa: S101 - set while downloading
        why = self._serving.smoke_test(self.models / install.sha256)
        if why is not None:
            raise InstallFailed("smoke_test_failed", why)
        # a rollback gives back the model it had before: probation proved it then
        return self._step(install, Event.PROVEN if install.rollback else Event.PASSED)

    def _probation(self, install: Install) -> Install:
        why = self._serving.probation(self._probation_s, self._stop)
        if why is not None:
            raise InstallFailed("regression", why)
        return self._step(install, Event.PASSED)

    def _rollback(self, install: Install, reason: str) -> Install:
        previous = self.models / install.previous if install.previous else None
        self._swap(previous)
        # the model rolled back from failed: it need not serve while the previous loads,
        # and on a box with room for one model at a time the previous could not load beside it
        self._serving.activate(previous, replace=True)
        log.warning("rolled back generation %d: %s", install.generation, reason)
        return replace(install, state=State.ROLLED_BACK, reason=reason)

    # -- bookkeeping ----------------------------------------------------------------------

    def _step(self, install: Install, event: Event) -> Install:
        install = replace(install, state=next_state(install.state, event))
        self._save(install)
        if install.state not in TERMINAL:
            self._reporter.event(install.state.value, install.generation, install.target or "")
        return install

    def _finish(self, install: Install) -> None:
        self._save(install)
        self._reporter.event(install.state.value, install.generation, install.reason)
        self._reporter.reported(install)

    def _swap(self, target: Path | None) -> None:
        """Point ``current`` at ``target`` (None: no model) in one rename."""
        if target is None:
            self.current.unlink(missing_ok=True)
        else:
            link = self.dir / "current.new"
            link.unlink(missing_ok=True)
            link.symlink_to(target.relative_to(self.dir))
            os.replace(link, self.current)
        fsync_dir(self.dir)

    def _active_sha(self) -> str | None:
        active = self.active_dir()
        return active.name if active is not None else None

    def _discard_partial(self) -> None:
        """Remove what a failed install left, but a download's kept prefix (``.part``):
        the same model asked for again carries on from it."""
        for path in (self.dir / "tuf" / "download").glob("*"):
            if not path.name.endswith((".part", ".part.json")):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        for work in self.models.glob("*.tmp"):
            shutil.rmtree(work, ignore_errors=True)

    def _load(self) -> Install:
        path = self.dir / "install.json"
        if not path.exists():
            return Install()
        raw = json.loads(path.read_text())
        return Install(**{**raw, "state": State(raw["state"])})

    def _save(self, install: Install) -> None:
        self.install = install
        write_atomic(self.dir / "install.json", json.dumps(asdict(install)).encode())
        crash_point(install.state.value)


def run_smoke_test(call: Callable[..., Any], fmt: str, test: dict[str, Any],
                   clock: Callable[[], float]) -> str | None:
    """Run a completed smoke test through ``call`` (a ModelWorker's); None if it passes."""
    tolerance, budget = float(test["tolerance"]), float(test["latency_budget_ms"])
    kind = str(test.get("kind", "generate"))

    def run(given: Any) -> tuple[Any, float]:
        started = clock()
        if fmt == "gguf" and kind == "embed":
            got = call("embed", text=given)
        elif fmt == "gguf":
            got = call("generate", prompt=given, max_tokens=int(test.get("max_tokens", 16)))
        else:
            got = call("infer", inputs=given)
        return got, (clock() - started) * 1000

    for n, (given, expected) in enumerate(zip(test["inputs"], test["expected"], strict=True)):
        got, took_ms = run(given)
        off = smoke.distance(fmt, got, expected, kind)
        if off > tolerance:
            return f"input {n}: off by {off:.3g}, tolerance {tolerance:g}"
        if took_ms > budget:
            # a model's first run of a shape pays one-off costs (onnxruntime sizes its
            # memory, the weights' pages are touched): over budget, it is timed again
            first = took_ms
            got, took_ms = run(given)
            if took_ms > budget:
                return (f"input {n}: took {took_ms:.0f} ms, budget {budget:g} ms (the "
                        f"first run: {first:.0f} ms)")
    return None


def _available_ram() -> Room:
    import psutil

    available = int(psutil.virtual_memory().available)
    return Room(available, available)


def _model_file(staged: Path) -> Path | None:
    return next((p for p in staged.glob("model.*")), None)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
