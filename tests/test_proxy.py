"""The link proxy of emulated boards and the chaos bench: delay, cut, and full duplex."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from edvit.fleet.boards.proxy import CuttableProxy


def _pair(delay_ms: float) -> tuple[CuttableProxy, socket.socket, socket.socket]:
    """A proxy in front of a listening socket: (proxy, the client's end, the server's end)."""
    server = socket.create_server(("127.0.0.1", 0))
    proxy = CuttableProxy("127.0.0.1", server.getsockname()[1], delay_ms=delay_ms).start()
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    server.settimeout(5)
    accepted, _ = server.accept()
    server.close()
    accepted.settimeout(5)
    return proxy, client, accepted


def test_bytes_arrive_after_the_delay_and_not_while_cut() -> None:
    proxy, client, server = _pair(delay_ms=30)
    try:
        started = time.monotonic()
        client.sendall(b"ping")
        assert server.recv(16) == b"ping"
        assert time.monotonic() - started >= 0.03
        proxy.cut()
        client.sendall(b"held")
        server.settimeout(0.3)
        with pytest.raises(TimeoutError):
            server.recv(16)  # nothing crosses a cut link
        proxy.restore()
        client.sendall(b"back")
        server.settimeout(5)
        got = b""
        while len(got) < 8:
            got += server.recv(16)
        assert got == b"heldback"  # what was sent meanwhile comes first, as TCP resends it
    finally:
        proxy.stop()


def test_a_receiver_that_does_not_read_does_not_hold_up_the_other_direction() -> None:
    """The board (client) stops reading its frames; its own messages still go through."""
    proxy, client, server = _pair(delay_ms=1)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stop = threading.Event()

    def flood() -> None:  # the broker keeps sending frames the board does not read
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                server.send(b"f" * 65536)
            except (TimeoutError, OSError):
                continue

    flooding = threading.Thread(target=flood, daemon=True)
    flooding.start()
    try:
        time.sleep(0.5)  # the proxy's queue and both socket buffers toward the board fill up
        started = time.monotonic()
        client.sendall(b"features")
        server.settimeout(5)
        received = b""
        while b"features" not in received:
            received += server.recv(64)
        assert time.monotonic() - started < 0.5
    finally:
        stop.set()
        flooding.join(timeout=2)
        proxy.stop()
