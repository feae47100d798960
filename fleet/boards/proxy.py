"""A TCP proxy whose link can be cut: what a Wi-Fi drop looks like to the broker and the
board (no FIN, no RST: bytes just stop; those sent meanwhile arrive when the link is back,
as TCP retransmits them, and a peer that hears nothing for its keepalive closes), for the
chaos bench and the tests. `tc netem` is not available everywhere, so this is done in user
space, and so is the added latency of an emulated board's link (`edvit fleet up`,
fleet/boards/boards.py): each direction's bytes are held `delay_ms` before they are
forwarded.

Each direction of a connection has its own reader and writer thread with a bounded queue
between them, so the link is full duplex: a board that reads its frames slowly (at its CPU
quota) slows only the frames, as TCP would, and its features still go out."""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time

log = logging.getLogger("edvit.proxy")

CHUNK = 65536
# Chunks read ahead of a slow receiver before the reader stops reading (flow control).
QUEUED_CHUNKS = 64


class CuttableProxy:
    """Listens on `listen_host:listen_port` and forwards every connection to `target`. While
    cut, whatever either side sends is held (up to QUEUED_CHUNKS per direction, then the
    sender's own buffers fill) and delivered in order once the link is restored, and new
    connections are accepted and left silent. A TCP stream never loses bytes in the middle:
    a link that dropped them would hand the peer a stream with a hole (an MQTT packet gone,
    the next one parsed as if nothing happened). With `delay_ms`, bytes are forwarded that
    long after they arrived, in either direction (a constant one-way delay keeps them in
    arrival order)."""

    def __init__(
        self, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
        listen_port: int = 0, delay_ms: float = 0.0,
    ) -> None:  # fmt: skip
        self.target = (target_host, target_port)
        self._listener = socket.create_server((listen_host, listen_port))
        self._listener.settimeout(0.1)
        self.host = listen_host
        self.port = self._listener.getsockname()[1]
        self.delay_s = delay_ms / 1000.0
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> CuttableProxy:
        self._thread.start()
        return self

    def cut(self) -> None:
        self._cut.set()

    def restore(self) -> None:
        self._cut.clear()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            _close(sock)

    def serve_forever(self) -> None:
        """Run in this thread until stopped (`edvit fleet proxy`, a process per board)."""
        self._accept_loop()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets.update((client, upstream))
            self._forward(client, upstream)
            self._forward(upstream, client)

    def _forward(self, source: socket.socket, sink: socket.socket) -> None:
        """One direction: a reader that queues what arrives and a writer that sends it once it
        is due and the link is up. When either side closes, both are closed."""
        held: queue.Queue[tuple[float, bytes]] = queue.Queue(maxsize=QUEUED_CHUNKS)
        done = threading.Event()  # the writer has stopped: nothing will take from `held`

        def read() -> None:
            while not done.is_set():
                try:
                    data = source.recv(CHUNK)
                except OSError:
                    data = b""
                item = (time.monotonic() + self.delay_s, data)
                while not done.is_set():
                    try:
                        held.put(item, timeout=0.5)  # blocks while the receiver is slow
                        break
                    except queue.Full:
                        continue
                if not data:
                    return

        def write() -> None:
            while True:
                due, data = held.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    break  # after the bytes still held for it
                while self._cut.is_set() and not self._stop.is_set():
                    time.sleep(0.02)  # the link is down: held until it is back
                try:
                    sink.sendall(data)
                except OSError:
                    break
            done.set()
            self._close_pair(source, sink)

        for target, role in ((read, "read"), (write, "write")):
            threading.Thread(target=target, name=f"proxy-{role}", daemon=True).start()

    def _close_pair(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(sockets)
        for sock in sockets:
            _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
