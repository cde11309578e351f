"""Shaped links for tests: a device in a network namespace of its own, on a link whose
rate, delay, jitter and loss a test sets, and which it can cut and restore.

These machines' kernels have no ``netem`` qdisc (``tc qdisc add ... netem`` answers
"Specified qdisc kind is unknown"; ``tbf`` and ``htb`` exist, which shape rate but
neither delay nor loss), so the link is emulated in user space, at the packet level:
two TUN devices, one on the host (``10.77.N.1``) and one moved into the namespace
(``10.77.N.2``), and a relay that reads each IP packet from one and writes it to the
other once the link would have carried it: queued behind the packets before it at
``rate`` (a bottleneck buffer of ``queue_s`` seconds, tail-dropped beyond), then
``delay`` plus up to ``jitter`` later, and dropped at random with probability
``loss``. ``down()`` drops everything, as a cut cable does. Both ends are the kernel's
own TCP, so what crosses is what crosses a real slow, lossy link.

Everything is removed on ``close()``: the TUN devices vanish with their file
descriptors, the namespace is deleted. Only root can do this (CI runs as root).
"""

import fcntl
import heapq
import itertools
import os
import random
import select
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from types import TracebackType

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
_numbers = itertools.count(1)


@dataclass
class Shape:
    """One direction of a link."""

    rate_bps: float  # bits per second
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0  # probability a packet is lost
    queue_s: float = 0.5  # the bottleneck buffer, in seconds of traffic at rate


def available() -> str | None:
    """Why shaped links cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "shaped links need root (network namespaces and TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "shaped links need /dev/net/tun"
    return None


class ShapedLink:
    """A namespace ``ns`` reached from the host over an emulated link.

    ``host`` is the host side's address (where a broker for the device listens),
    ``device`` the namespace side's; ``run(args)`` runs a command in the namespace.
    """

    def __init__(self, down_shape: Shape, up_shape: Shape | None = None, *,
                 seed: int = 0) -> None:
        n = next(_numbers) + os.getpid() % 200
        self.ns = f"ef-link-{os.getpid()}-{n}"
        self.host, self.device = f"10.77.{n}.1", f"10.77.{n}.2"
        self.to_device, self.to_host = down_shape, up_shape or down_shape
        self._rng = random.Random(seed)
        self._up = threading.Event()
        self._up.set()
        self._stop = threading.Event()
        self._fds: list[int] = []
        self.dropped = 0
        self.carried = 0
        self.bytes_to_device = 0  # IP bytes delivered into the namespace
        #: (when, bytes_to_device) at every 64 KiB delivered: the link's own throughput
        self.delivered: list[tuple[float, int]] = []
        try:
            _ip("netns", "add", self.ns)
            host_if, ns_if = f"efh{n}", f"efd{n}"
            self._host_fd, self._ns_fd = _tun(host_if), _tun(ns_if)
            self._fds = [self._host_fd, self._ns_fd]
            _ip("addr", "add", self.host, "peer", self.device, "dev", host_if)
            _ip("link", "set", host_if, "up")
            _ip("link", "set", ns_if, "netns", self.ns)
            self.exec("ip", "addr", "add", self.device, "peer", self.host, "dev", ns_if)
            self.exec("ip", "link", "set", ns_if, "up")
            self.exec("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        self._threads = [
            threading.Thread(target=self._relay, args=(self._host_fd, self._ns_fd,
                                                      self.to_device), daemon=True),
            threading.Thread(target=self._relay, args=(self._ns_fd, self._host_fd,
                                                      self.to_host), daemon=True)]
        for thread in self._threads:
            thread.start()

    # -- the outside --------------------------------------------------------------------

    def command(self, *args: str) -> list[str]:
        """``args`` as a command that runs inside the namespace."""
        return ["ip", "netns", "exec", self.ns, *args]

    def exec(self, *args: str) -> None:
        subprocess.run(self.command(*args), check=True, capture_output=True, timeout=30)

    def rate_bps(self, start: int, size: int) -> float | None:
        """Bits per second the link delivered over the middle 80% of ``size`` bytes sent
        after ``start`` (a ``bytes_to_device`` reading); None if it did not get there."""
        lo, hi = start + size // 10, start + size * 9 // 10
        t_lo = next((t for t, b in self.delivered if b >= lo), None)
        t_hi = next((t for t, b in self.delivered if b >= hi), None)
        if t_lo is None or t_hi is None or t_hi <= t_lo:
            return None
        return (hi - lo) * 8 / (t_hi - t_lo)

    def down(self) -> None:
        """Cut the link: every packet is lost until ``up()``."""
        self._up.clear()

    def up(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._stop.set()
        for thread in getattr(self, "_threads", []):
            thread.join(5)
        for fd in self._fds:
            os.close(fd)  # a TUN device that is not persistent goes with its descriptor
        self._fds = []
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False,
                       timeout=30)

    def __enter__(self) -> "ShapedLink":
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.close()

    # -- the relay ----------------------------------------------------------------------

    def _relay(self, source: int, sink: int, shape: Shape) -> None:
        """Carry packets from ``source`` to ``sink`` as ``shape`` would."""
        pending: list[tuple[float, int, bytes]] = []  # (when it arrives, order, packet)
        free_at = last = 0.0  # when the link has sent what is queued; the last arrival
        order = itertools.count()
        while not self._stop.is_set():
            now = time.monotonic()
            wait = max(0.0, min(0.05, pending[0][0] - now)) if pending else 0.05
            ready, _, _ = select.select([source], [], [], wait)
            now = time.monotonic()
            if ready:
                packet = os.read(source, 65535)
                backlog = max(0.0, free_at - now)
                if not self._up.is_set() or self._rng.random() < shape.loss \
                        or backlog > shape.queue_s:
                    self.dropped += 1
                else:
                    free_at = max(free_at, now) + len(packet) * 8 / shape.rate_bps
                    arrive = free_at + shape.delay_s + self._rng.uniform(0, shape.jitter_s)
                    last = max(last, arrive)  # jitter delays, it does not reorder
                    heapq.heappush(pending, (last, next(order), packet))
            while pending and pending[0][0] <= now:
                _, _, packet = heapq.heappop(pending)
                if self._up.is_set():
                    try:
                        os.write(sink, packet)
                        self.carried += 1
                        if sink == self._ns_fd:
                            before = self.bytes_to_device
                            self.bytes_to_device += len(packet)
                            if before >> 16 != self.bytes_to_device >> 16:
                                self.delivered.append((now, self.bytes_to_device))
                    except OSError:  # the other side is not up yet, or going away
                        self.dropped += 1


def _tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)
