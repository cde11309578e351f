"""TCP_NODELAY on the MQTT sockets both ends open (shared.net)."""

import socket

from controller.bridge import Bridge
from controller.settings import MqttUrl
from shared.net import tcp_nodelay
from shared.topics import Topics


def test_tcp_nodelay_turns_nagle_off_and_ignores_other_sockets() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as tcp:
        assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        tcp_nodelay(None, None, tcp)
        assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        tcp_nodelay(None, None, left)  # no error for a socket that is not TCP


def test_the_controller_and_devices_open_their_sockets_with_it() -> None:
    from agent.mqtt import device_client
    from tests.agent.test_session import session

    bridge = Bridge(MqttUrl("127.0.0.1", 1), Topics(), sink=lambda _k: print,
                    is_known=lambda _d: True)
    assert bridge._client.on_socket_open is tcp_nodelay
    assert device_client(session()).on_socket_open is tcp_nodelay
