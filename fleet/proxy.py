"""A TCP proxy whose link can be cut: what a Wi-Fi drop looks like to the broker and the
board (no FIN, no RST: bytes just stop), for the chaos bench and the tests. `tc netem` is
not available everywhere, so this is done in user space, and so is the added latency of an
emulated board's link (`edvit fleet up`, fleet/boards.py): each direction's bytes are held
`delay_ms` before they are forwarded."""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections import deque

log = logging.getLogger("edvit.proxy")


class CuttableProxy:
    """Listens on 127.0.0.1:port and forwards every connection to `target`. While cut,
    whatever either side sends is read and dropped, and new connections are accepted and
    left silent. With `delay_ms`, bytes are forwarded that long after they arrived, in
    either direction (a constant one-way delay keeps them in arrival order)."""

    def __init__(
        self, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
        listen_port: int = 0, delay_ms: float = 0.0,
    ) -> None:  # fmt: skip
        self.target = (target_host, target_port)
        self._listener = socket.create_server((listen_host, listen_port))
        self.host = listen_host
        self.port = self._listener.getsockname()[1]
        self.delay_s = delay_ms / 1000.0
        # (due time, sink, bytes), due times non-decreasing
        self._pending: deque[tuple[float, socket.socket, bytes]] = deque()
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> CuttableProxy:
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._thread.start()
        return self

    def cut(self) -> None:
        self._cut.set()

    def restore(self) -> None:
        self._cut.clear()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for key in list(self._selector.get_map().values()):
            with contextlib.suppress(OSError):
                key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()

    def serve_forever(self) -> None:
        """Run in this thread until stopped (`edvit fleet proxy`, a process per board)."""
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._run()

    def _run(self) -> None:
        while not self._stop.is_set():
            timeout = 0.1
            if self._pending:
                timeout = min(timeout, max(0.0, self._pending[0][0] - time.monotonic()))
            for key, _ in self._selector.select(timeout=timeout):
                if key.data is None:
                    self._accept()
                else:
                    self._forward(key.fileobj, key.data)  # type: ignore[arg-type]
            now = time.monotonic()
            while self._pending and self._pending[0][0] <= now:
                _, sink, data = self._pending.popleft()
                if data:
                    self._send(sink, data)
                else:
                    self._close(sink)

    def _close(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)
        sock.close()

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._selector.register(client, selectors.EVENT_READ, upstream)
        self._selector.register(upstream, selectors.EVENT_READ, client)

    def _forward(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            data = source.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(source)
            if self.delay_s > 0:  # after the bytes still held for it
                self._pending.append((time.monotonic() + self.delay_s, sink, b""))
            else:
                self._close(sink)
            return
        if self._cut.is_set():
            return  # the link is down: the bytes are lost
        if self.delay_s > 0:
            self._pending.append((time.monotonic() + self.delay_s, sink, data))
            return
        self._send(sink, data)

    @staticmethod
    def _send(sink: socket.socket, data: bytes) -> None:
        try:
            sink.setblocking(True)
            sink.sendall(data)
            sink.setblocking(False)
        except OSError:
            pass
