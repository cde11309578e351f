"""Socket settings both ends of the MQTT link use (no MQTT library import here)."""

import contextlib
import socket
from typing import Any


def tcp_nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    """paho's ``on_socket_open``: send small packets at once.

    paho leaves Nagle's algorithm on. Fetch requests and QoS 1 acknowledgements are
    small packets sent while earlier data is still unacknowledged, so Nagle held each
    until the peer's delayed ACK, about 40 ms: measured as a 40-45 ms stall before each
    run of chunks of a download (bench/distribute.py).
    """
    with contextlib.suppress(OSError, AttributeError):  # not TCP: unix socket, websocket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
