"""The model worker held to the box's memory limit by a memory cgroup.

``memory_limit_bytes`` in ``agent.toml`` is the memory models may use on this box. The
agent reports it as the device's RAM (the registry picks a variant that fits) and, where
it can make a memory cgroup, runs each model worker in one with that hard limit: a model
that needs more on the inputs it is really given is killed by the kernel's OOM killer,
as on a box of that size, and the agent says it ran out of memory, instead of the box
swapping or the OOM killer choosing the agent. Swap is counted in the limit where the
kernel accounts it.

It needs cgroup v1's memory controller and the right to make a child of the agent's own
cgroup (root, or a delegated subtree). Under cgroup v2 or without that right the limit
is only reported, and ``WorkerLimit.make`` says why; on cgroup v2 use the service
manager's own limit (systemd's ``MemoryMax=``) for the whole agent instead.
"""

import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

V1_ROOT = Path("/sys/fs/cgroup/memory")
PREFIX = "edgefleet-model-"
_serial = itertools.count()


class LimitUnavailable(Exception):
    """No memory cgroup can be made here; the message says why."""


@dataclass(frozen=True)
class WorkerLimit:
    """One model worker's memory cgroup (cgroup v1)."""

    path: Path
    limit: int

    @classmethod
    def make(cls, limit: int, *, root: Path = V1_ROOT,
             proc_cgroup: Path = Path("/proc/self/cgroup")) -> "WorkerLimit":
        """A new cgroup of ``limit`` bytes beside nothing else, under the agent's own."""
        own = own_cgroup(root, proc_cgroup)
        path = own / f"{PREFIX}{os.getpid()}-{next(_serial)}"
        try:
            path.mkdir()
        except OSError as exc:
            raise LimitUnavailable(f"cannot make a memory cgroup in {own}: "
                                   f"{exc.strerror}") from None
        try:
            (path / "memory.limit_in_bytes").write_text(str(limit))
            memsw = path / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # not there when the kernel does not account swap
                memsw.write_text(str(limit))
        except OSError as exc:
            path.rmdir()
            raise LimitUnavailable(f"cannot set a memory limit in {path}: "
                                   f"{exc.strerror}") from None
        return cls(path, limit)

    def join(self) -> None:
        """Move the calling process (the worker, before it loads anything) into it."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        """How many times the kernel killed a process of this cgroup for memory."""
        try:
            text = (self.path / "memory.oom_control").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        """Remove the cgroup once its worker has exited."""
        try:
            self.path.rmdir()
        except OSError as exc:
            log.warning("could not remove the memory cgroup %s: %s", self.path, exc.strerror)


def own_cgroup(root: Path = V1_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> Path:
    """The directory of this process's cgroup v1 memory cgroup; LimitUnavailable if none."""
    if not (root / "cgroup.procs").exists():
        raise LimitUnavailable("there is no cgroup v1 memory controller (cgroup v2 or none)")
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError as exc:
        raise LimitUnavailable(f"cannot read {proc_cgroup}: {exc.strerror}") from None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return root / path.lstrip("/")
    raise LimitUnavailable("this process is in no cgroup v1 memory cgroup (cgroup v2)")


def remove_stale(root: Path = V1_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> None:
    """Remove the worker cgroups of agents that are gone (killed before they could)."""
    try:
        own = own_cgroup(root, proc_cgroup)
    except LimitUnavailable:
        return
    for path in own.glob(f"{PREFIX}*"):
        agent = path.name.removeprefix(PREFIX).split("-")[0]
        if agent.isdigit() and _alive(int(agent)):
            continue  # another agent's, on the same host
        try:
            path.rmdir()
        except OSError as exc:
            log.warning("could not remove the memory cgroup %s: %s", path, exc.strerror)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
