"""`edvit secure init` against a real mosquitto, and a real 3-node NATS cluster, started from
the configs it writes.

The ACL matrix: every identity x every topic family, in both directions, on both brokers
(on the cluster, the identity and the observer are on different nodes). Allowed publishes
reach a test-only observer identity (`topic readwrite #`, added here, never by secure init);
forbidden ones never do; subscriptions an identity may not make receive nothing. Then the
refusals (anonymous, wrong password, no client certificate, plain TCP on the TLS port) and
the bad input a user can give (missing files, wrong CA, hostname mismatch): one line, exit 2.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import queue
import secrets
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edvit.broker.local import LocalBroker, mosquitto_path
from edvit.broker.nats_cluster import NatsCluster, nats_authorization, nats_server_path
from edvit.cli import main
from edvit.errors import BrokerError, ConfigError
from edvit.fleet.ops import secure
from edvit.limits import MESSAGE_EXPIRY_S
from edvit.mqtt import Connection, MqttClient, unique_client_id
from edvit.topics import Topics
from helpers import tier

pytestmark = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed")

NODES = ("node-0", "node-1")
CAMERAS = ("cam0", "cam1")
OBSERVER = "test-observer"
TIMEOUT = 5.0

# Topic family -> one topic of it (prefix edvit), with who may write it and who may read it.
FAMILIES: dict[str, tuple[str, set[str], set[str]]] = {
    "frame, own camera": ("edvit/cameras/cam0/frame", {"cam0"}, set(NODES)),
    "frame, other camera": ("edvit/cameras/cam1/frame", {"cam1"}, set(NODES)),
    "tokens": ("edvit/cameras/cam0/tokens", {"cam0"}, set(NODES)),
    "camera status": ("edvit/cameras/cam0/status", {"cam0"}, {"dashboard"}),
    "plan": (
        "edvit/plan",
        {"deploy", "aggregator"},
        {"deploy", "aggregator", "dashboard", *NODES, *CAMERAS},
    ),
    "model": ("edvit/models/sub0", {"deploy"}, {"deploy", "aggregator", *NODES, *CAMERAS}),
    "features, node-0": ("edvit/features/cam0/sub0/node-0", {"node-0"}, {"aggregator"}),
    "features, node-1": ("edvit/features/cam0/sub1/node-1", {"node-1"}, {"aggregator"}),
    "features, no node level": ("edvit/features/cam0/sub0", set(), {"aggregator"}),
    "node status, node-0": ("edvit/nodes/node-0/status", {"node-0"}, {"aggregator", "dashboard"}),
    "node status, node-1": ("edvit/nodes/node-1/status", {"node-1"}, {"aggregator", "dashboard"}),
    "predictions": ("edvit/predictions/cam0", {"aggregator"}, {"aggregator", "dashboard"}),
    "aggregator status": (
        "edvit/aggregator/status",
        {"aggregator"},
        {"aggregator", "dashboard", "homeassistant"},
    ),
    "instance status": ("edvit/aggregators/a1/status", {"aggregator"}, {"aggregator", "dashboard"}),
    "lease": ("edvit/aggregator/lease", {"aggregator"}, {"aggregator", "dashboard"}),
    "node stats, node-0": ("edvit/stats/nodes/node-0", {"node-0"}, {"dashboard"}),
    "camera stats, cam0": ("edvit/stats/cameras/cam0", {"cam0"}, {"dashboard"}),
    "aggregator stats": ("edvit/stats/aggregators/a1", {"aggregator"}, {"dashboard"}),
    "fleet health": ("edvit/fleet/health", {"aggregator"}, {"aggregator", "dashboard"}),
    # --ha-discovery: outside the prefix, written by the aggregator (for its own fleet's
    # node id only) and read by Home Assistant, which writes its own birth and will.
    "ha discovery": ("homeassistant/sensor/edvit/cam0/config", {"aggregator"}, {"homeassistant"}),
    "ha state": ("homeassistant/sensor/edvit/cam0/state", {"aggregator"}, {"homeassistant"}),
    "ha, another fleet": ("homeassistant/sensor/other/cam0/config", set(), {"homeassistant"}),
    "ha birth": ("homeassistant/status", {"homeassistant"}, {"homeassistant"}),
}
IDENTITIES = ("deploy", "aggregator", "dashboard", "homeassistant", *NODES, *CAMERAS)


@dataclass(frozen=True)
class SecureBroker:
    """DIR of `secure init` and the broker started from it: a mosquitto, or a NATS cluster
    (then `broker` is None)."""

    dir: Path
    broker: LocalBroker | None
    cluster: NatsCluster | None = None

    @property
    def subscribe_qos(self) -> int:
        """The matrix's subscriptions: QoS 1 on mosquitto; QoS 0 on NATS, where each QoS 1
        subscription is a JetStream consumer of its own and messages from one publisher
        come out of different consumers in any order (the sentinel would overtake)."""
        return 0 if self.cluster is not None else 1

    def address(self, node: int = 0) -> tuple[str, int]:
        """Where to connect: the mosquitto, or the cluster's node `node`."""
        if self.cluster is not None:
            return "127.0.0.1", self.cluster.nodes[node % len(self.cluster.nodes)].mqtt_port
        assert self.broker is not None
        return self.broker.host, self.broker.port

    def files(self, identity: str) -> Path:
        return self.dir / "clients" / identity

    def client(self, identity: str | None, *, password: str | None = None,
               cert: bool = True, tls: bool = True) -> mqtt.Client:  # fmt: skip
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
        if tls:
            home = self.files(identity or "dashboard")
            client.tls_set(
                ca_certs=str(self.dir / "ca.crt"),
                certfile=str(home / "client.crt") if cert else None,
                keyfile=str(home / "client.key") if cert else None,
            )
        if identity is not None:
            secret = (self.files(identity) / "password").read_text().strip()
            client.username_pw_set(identity, password if password is not None else secret)
        return client


def _add_observer(
    directory: Path, nodes: tuple[str, ...] = NODES, ha_prefix: str = "homeassistant"
) -> None:
    """A read-and-write-everything identity for the tests' eyes only, in the mosquitto files
    and in the NATS users (rewritten from secure init's own rules plus the observer's)."""
    home = directory / "clients" / OBSERVER
    secure._Authority(directory, force=False).issue(
        home / "client.crt", home / "client.key", OBSERVER, server_names=[]
    )
    password = secrets.token_urlsafe(16)
    (home / "password").write_text(password + "\n")
    with (directory / "broker" / "passwd").open("a") as f:
        f.write(secure.password_line(OBSERVER, password) + "\n")
    with (directory / "broker" / "acl").open("a") as f:
        f.write(f"\nuser {OBSERVER}\ntopic readwrite #\n")
    rules = secure.acl_rules(secure.parse_identities(nodes, CAMERAS), Topics(), ha_prefix=ha_prefix)
    rules[OBSERVER] = [("readwrite", "#")]
    passwords = {name: (directory / "clients" / name / "password").read_text().strip()
                 for name in rules}  # fmt: skip
    (directory / "nats" / "users.conf").write_text(nats_authorization(rules, passwords))


@pytest.fixture(scope="module")
@tier("broker")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    directory = tmp_path_factory.mktemp("secure") / "fleet"
    secure.init(directory, secure.parse_identities(NODES, CAMERAS), port=8883)
    _add_observer(directory)
    log_path = directory.parent / "broker.log"
    broker = LocalBroker(
        kind="mosquitto", log_path=log_path, secure_config=directory / "broker/mosquitto.conf"
    )
    broker.start()
    try:
        yield SecureBroker(directory, broker)
    finally:
        broker.stop()


def _secure_cluster(directory: Path) -> NatsCluster:
    """A 3-node NATS cluster from DIR/nats/ (started by the caller)."""
    binary, why_not = nats_server_path()
    if binary is None:
        pytest.skip(why_not)
    login = secure.login(directory, OBSERVER, "mqtts://127.0.0.1:1")
    return NatsCluster(binary, directory.parent / "nats", secure=directory, login=login)


@pytest.fixture(scope="module")
@tier("broker")
def secured_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    directory = tmp_path_factory.mktemp("secure-nats") / "fleet"
    secure.init(directory, secure.parse_identities(NODES, CAMERAS), port=8883)
    _add_observer(directory)
    cluster = _secure_cluster(directory)
    try:
        cluster.start()
        yield SecureBroker(directory, None, cluster)
    finally:
        cluster.stop()


BROKERS = ["secured", "secured_nats"]


def _connect(client: mqtt.Client, host: str, port: int) -> Any:
    """Connect and return the CONNACK's reason code, None if the broker closed the
    connection without one (or raise what the socket raised)."""
    acks: queue.Queue[Any] = queue.Queue()
    client.on_connect = lambda _c, _u, _f, rc, _p: acks.put(rc)
    client.on_disconnect = lambda *_args: acks.put(None)
    client.connect(host, port, keepalive=10)
    client.loop_start()
    try:
        return acks.get(timeout=TIMEOUT)
    except queue.Empty:
        return None


def _connected(sb: SecureBroker, identity: str | None, node: int = 0, **kwargs: Any) -> mqtt.Client:
    client = sb.client(identity, **kwargs)
    rc = _connect(client, *sb.address(node))
    assert rc is not None and not rc.is_failure, f"{identity} could not connect: {rc}"
    return client


class Observer:
    """The observer subscribed to '#', with a sentinel that proves earlier messages are in."""

    def __init__(self, sb: SecureBroker, topic_filter: str = "#",
                 identity: str = OBSERVER, node: int = 0) -> None:  # fmt: skip
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.subacks: queue.Queue[Any] = queue.Queue()
        self.client = sb.client(identity)
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload))
        self.client.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subacks.put(rcs)
        rc = _connect(self.client, *sb.address(node))
        assert rc is not None and not rc.is_failure, rc

    def subscribe(self, *topics: str, qos: int = 1) -> None:
        for topic in topics:
            self.client.subscribe(topic, qos=qos)
            self.subacks.get(timeout=TIMEOUT)

    def await_interest(self, sender: mqtt.Client, topic: str) -> None:
        """Until a probe `sender` publishes on `topic` arrives: on a cluster, proof that
        this client's subscriptions (up to the one `topic` matches) reached the sender's
        node, which forwards nothing before."""
        for _ in range(10):
            probe = f"probe-{uuid.uuid4().hex}".encode()
            sender.publish(topic, probe, qos=1).wait_for_publish(TIMEOUT)
            with contextlib.suppress(AssertionError):
                self.until(topic, probe, timeout=1.0)
                return
        raise AssertionError(f"no probe on {topic} came through")

    def until(
        self, topic: str, payload: bytes, timeout: float = TIMEOUT
    ) -> list[tuple[str, bytes]]:
        """Every message received before (topic, payload), which must arrive."""
        seen = []
        while True:
            try:
                message = self.messages.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"sentinel {payload!r} on {topic} never came") from None
            if message == (topic, payload):
                return seen
            seen.append(message)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.broker  # through its `broker` fixture, by name
@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.parametrize("identity", IDENTITIES)
def test_an_identity_publishes_only_where_the_acl_says(
    request: pytest.FixtureRequest, broker: str, identity: str
) -> None:
    secured: SecureBroker = request.getfixturevalue(broker)
    observer = Observer(secured)
    observer.subscribe("#", qos=secured.subscribe_qos)
    # The identity is on another node of a cluster; the sentinel goes from that node too,
    # after the identity's publishes, over the same route.
    sender = _connected(secured, OBSERVER, node=1)
    client = _connected(secured, identity, node=1)
    try:
        observer.await_interest(sender, "test/sentinel")
        for topic, _writers, _readers in FAMILIES.values():
            # QoS 1: once PUBACKed, the broker has forwarded or dropped the message.
            client.publish(topic, identity.encode(), qos=1).wait_for_publish(TIMEOUT)
        sentinel = f"end-{uuid.uuid4().hex}".encode()
        sender.publish("test/sentinel", sentinel, qos=1)
        arrived = {topic for topic, payload in observer.until("test/sentinel", sentinel)
                   if payload == identity.encode()}  # fmt: skip
    finally:
        for mqtt_client in (client, sender):
            mqtt_client.disconnect()
            mqtt_client.loop_stop()
        observer.stop()
    expected = {topic for topic, writers, _ in FAMILIES.values() if identity in writers}
    assert arrived == expected


@pytest.mark.broker  # through its `broker` fixture, by name
@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.parametrize("identity", IDENTITIES)
def test_an_identity_reads_only_what_the_acl_says(
    request: pytest.FixtureRequest, broker: str, identity: str
) -> None:
    secured: SecureBroker = request.getfixturevalue(broker)
    reader = Observer(secured, identity=identity, node=1)
    # The sentinel goes last, to a topic the identity reads: the plan, or for Home
    # Assistant (which reads no plan) the aggregator's status.
    last = "edvit/aggregator/status" if identity == "homeassistant" else "edvit/plan"
    # Every family subscribed one by one, the sentinel's last: a forbidden subscription
    # must bring nothing (mosquitto grants it and delivers nothing; NATS refuses it in the
    # SUBACK).
    topics = [topic for topic, _, _ in FAMILIES.values() if topic != last]
    reader.subscribe(*topics, last, qos=secured.subscribe_qos)
    publisher = _connected(secured, OBSERVER)
    try:
        reader.await_interest(publisher, last)
        for topic, _writers, _readers in FAMILIES.values():
            publisher.publish(topic, b"x", qos=1).wait_for_publish(TIMEOUT)
        sentinel = f"end-{uuid.uuid4().hex}".encode()
        publisher.publish(last, sentinel, qos=1).wait_for_publish(TIMEOUT)
        received = {topic for topic, _ in reader.until(last, sentinel)}
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        reader.stop()
    expected = {topic for topic, _, readers in FAMILIES.values() if identity in readers}
    assert received == expected


def test_the_dashboard_sees_frames_only_when_asked() -> None:
    ids = secure.parse_identities(["n"], ["c"])
    plain = secure.acl_text(ids, Topics())
    seeing = secure.acl_text(ids, Topics(), dashboard_sees_frames=True)
    dashboard = seeing.split("user dashboard\n")[1].split("\n\n")[0]
    assert "cameras/+/frame" in dashboard and "cameras/+/tokens" in dashboard
    assert "cameras/+/frame" not in plain.split("user dashboard\n")[1].split("\n\n")[0]


@pytest.mark.broker
def test_a_custom_ha_prefix_moves_both_ends_of_discovery(tmp_path: Path) -> None:
    """`secure init --ha-prefix site/ha`: the aggregator writes its fleet's configs under
    site/ha and nowhere under the default prefix; Home Assistant reads them there."""
    directory = tmp_path / "fleet"
    argv = ["secure", "init", str(directory), "--nodes", "n0", "--cameras", ",".join(CAMERAS),
            "--ha-prefix", "site/ha"]  # fmt: skip
    assert main(argv) == 0
    _add_observer(directory, nodes=("n0",), ha_prefix="site/ha")
    config = directory / "broker/mosquitto.conf"
    with LocalBroker(kind="mosquitto", log_path=tmp_path / "broker.log", secure_config=config) as b:
        sb = SecureBroker(directory, b)
        reader = Observer(sb, identity="homeassistant")
        reader.subscribe("site/ha/#", "homeassistant/#")
        aggregator = _connected(sb, "aggregator")
        try:
            for topic in ("homeassistant/sensor/edvit/cam0/config",
                          "site/ha/sensor/other/cam0/config",
                          "site/ha/sensor/edvit/cam0/config"):  # fmt: skip
                aggregator.publish(topic, b"a", qos=1).wait_for_publish(TIMEOUT)
            sentinel = f"end-{uuid.uuid4().hex}".encode()
            aggregator.publish("site/ha/sensor/edvit/cam0/state", sentinel, qos=1)
            received = {t for t, _ in reader.until("site/ha/sensor/edvit/cam0/state", sentinel)}
        finally:
            aggregator.disconnect()
            aggregator.loop_stop()
            reader.stop()
    assert received == {"site/ha/sensor/edvit/cam0/config"}


@pytest.mark.parametrize("prefix", ["ha/#", "", "site//ha", "home assistant"])
def test_secure_init_names_a_bad_ha_prefix(prefix: str, tmp_path: Path, capsys) -> None:
    assert main(["secure", "init", str(tmp_path / "d"), "--ha-prefix", prefix]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid Home Assistant discovery prefix" in err[0], err
    assert not (tmp_path / "d").exists()  # refused before anything is written


@pytest.mark.broker  # through its `broker` fixture, by name
@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.parametrize(
    "case", ["anonymous", "wrong password", "no client certificate", "plain tcp"]
)
def test_the_broker_refuses(request: pytest.FixtureRequest, broker: str, case: str) -> None:
    secured: SecureBroker = request.getfixturevalue(broker)
    host, port = secured.address()
    client = {
        "anonymous": lambda: secured.client(None),
        "wrong password": lambda: secured.client("node-0", password="not-it"),
        "no client certificate": lambda: secured.client("node-0", cert=False),
        "plain tcp": lambda: secured.client("node-0", tls=False),
    }[case]()
    try:
        rc = _connect(client, host, port)
    except OSError:  # the TLS handshake itself failed (no client certificate)
        rc = None
    finally:
        client.loop_stop()
    assert rc is None or rc.is_failure, f"{case}: connected ({rc})"


def test_a_plain_listener_is_absent(secured: SecureBroker) -> None:
    config = (secured.dir / "broker" / "mosquitto.conf").read_text()
    assert [line for line in config.splitlines() if line.startswith("listener")] == [
        "listener 8883 0.0.0.0"
    ]
    assert "allow_anonymous false" in config and "require_certificate true" in config


def test_secret_files_are_owner_only_and_kept(tmp_path: Path) -> None:
    ids = secure.parse_identities(["node-0"], ["cam0"])
    secure.init(tmp_path, ids)
    secrets_ = [
        "ca.key", "broker/server.key", "broker/passwd", "broker/acl", "signing/plan.key",
        "clients/node-0/client.key", "clients/node-0/password",
    ]  # fmt: skip
    for name in secrets_:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    before = {name: (tmp_path / name).read_bytes() for name in secrets_[:1] + secrets_[4:]}
    assert secure.init(tmp_path, ids) == []  # nothing new, nothing replaced
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    # One more node: its files appear, the others stay.
    created = secure.init(tmp_path, secure.parse_identities(["node-0", "node-1"], ["cam0"]))
    assert sorted(created) == [f"clients/node-1/{f}" for f in ("client.crt", "client.key",
                                                                "password")]  # fmt: skip
    assert "user node-1" in (tmp_path / "broker/acl").read_text()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert "ca.key" in secure.init(tmp_path, ids, force=True)


def test_password_lines_match_mosquitto_passwd(tmp_path: Path) -> None:
    line = secure.password_line("u", "p", salt=bytes.fromhex("bc0c4aceb1aa255e4195cb2f"))
    # What `mosquitto_passwd -b FILE u p` wrote with that salt (mosquitto 2.0.11).
    assert line == (
        "u:$7$101$vAxKzrGqJV5Blcsv$Nq/HN3YTZFvYtlrAe9QS9D/blTif26rNicTDPc1VAwudh6BhsEkS9NhNk6rk"
        "BU2KJN9wqprZUADmOHPpsa3LXQ=="
    )


@pytest.mark.parametrize("bad", ["u:x", "a b", "", "deploy"])
def test_bad_identities_are_refused(bad: str) -> None:
    with pytest.raises(secure.ConfigError):
        secure.parse_identities([bad], [])


# -- bad input on the command line: one line, exit 2 -------------------------------------


def _watch(sb: SecureBroker, capsys: pytest.CaptureFixture[str], url: str | None = None,
           **override: str) -> tuple[int, str]:  # fmt: skip
    home = sb.files("dashboard")
    options = {
        "--broker": url or f"mqtts://localhost:{sb.broker.port}",
        "--ca": str(sb.dir / "ca.crt"),
        "--cert": str(home / "client.crt"),
        "--key": str(home / "client.key"),
        "--username": "dashboard",
        "--password-file": str(home / "password"),
    } | {f"--{k.replace('_', '-')}": v for k, v in override.items()}
    argv = ["watch", "--count", "1", "--log-level", "ERROR"]
    for option, value in options.items():
        argv += [option, value]
    code = main(argv)
    return code, capsys.readouterr().err


def test_a_good_login_connects(secured: SecureBroker, capsys, monkeypatch) -> None:
    from edvit.fleet.ops import watch as watch_module

    monkeypatch.setattr(watch_module.PredictionStream, "stop", lambda self: self.client.stop())
    seen = []
    real = watch_module.PredictionStream.start

    def start_and_stop(self) -> None:
        real(self)
        seen.append(self.client.connected)
        self.client.stop()
        raise KeyboardInterrupt  # connected: no need to wait for a prediction

    monkeypatch.setattr(watch_module.PredictionStream, "start", start_and_stop)
    code, err = _watch(secured, capsys)
    assert seen == [True] and code == 130, err


@pytest.mark.parametrize("option", ["ca", "cert", "key", "password_file"])
def test_a_missing_file_is_named(secured: SecureBroker, capsys, option: str) -> None:
    code, err = _watch(secured, capsys, **{option: "/nonexistent/file"})
    assert code == 2
    assert err.strip().splitlines() == [
        f"edvit watch: error: --{option.replace('_', '-')} /nonexistent/file: no such file"
    ]


def test_an_unreadable_password_file_is_named(secured, capsys, tmp_path: Path) -> None:
    path = tmp_path / "password"
    if os.geteuid() == 0:
        path.mkdir()  # root reads any file: a folder is what it cannot read as one
    else:
        path.write_text("x\n")
        path.chmod(0)
    code, err = _watch(secured, capsys, password_file=str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--password-file {path}: " in err and "Traceback" not in err


def test_a_bad_key_is_named(secured: SecureBroker, capsys, tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("not a key\n")
    code, err = _watch(secured, capsys, key=str(key))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--key {key}" in err and "not a usable certificate and key pair" in err


def test_a_broker_from_another_ca_is_refused(secured, capsys, tmp_path: Path) -> None:
    secure.init(tmp_path, secure.parse_identities([], []))
    code, err = _watch(secured, capsys, ca=str(tmp_path / "ca.crt"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "failed TLS verification" in err and f"--ca {tmp_path / 'ca.crt'}" in err


def test_a_hostname_mismatch_is_refused(secured: SecureBroker, capsys) -> None:
    # The server certificate names localhost and 127.0.0.1; the same broker reached as
    # 127.0.0.2 (another loopback address) must not be trusted.
    other = LocalBroker(
        kind="mosquitto", host="127.0.0.2",
        secure_config=secured.dir / "broker" / "mosquitto.conf",
    )  # fmt: skip
    with other:
        code, err = _watch(secured, capsys, url=f"mqtts://127.0.0.2:{other.port}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "failed TLS verification" in err and "mismatch" in err


def test_tls_files_need_mqtts(secured: SecureBroker, capsys) -> None:
    code, err = _watch(secured, capsys, url="mqtt://localhost:1")
    assert code == 2 and "need an mqtts:// broker" in err


def test_the_embedded_broker_refuses_secure(secured: SecureBroker, capsys) -> None:
    code = main(["broker", "--kind", "embedded", "--secure", str(secured.dir)])
    err = capsys.readouterr().err
    assert code == 2 and "--secure needs mosquitto" in err


# -- a small fleet over TLS ------------------------------------------------------------------


def _login(sb: SecureBroker, identity: str) -> dict[str, str]:
    return secure.login_env(sb.dir, identity)


def _connection(sb: SecureBroker, identity: str) -> Connection:
    return secure.login(sb.dir, identity, f"mqtts://localhost:{sb.broker.port}")


@pytest.mark.fleet
@pytest.mark.slow
def test_a_fleet_answers_frames_over_tls(secured: SecureBroker, tmp_path: Path) -> None:
    """deploy, one node, the aggregator and a camera, each with its own identity, and the
    dashboard watching: every frame is answered, through the ACL."""
    from edvit.bundle import Bundle
    from edvit.fleet.ops.demo import DEFAULT_BUNDLE
    from edvit.fleet.ops.deploy import deploy
    from edvit.fleet.ops.local import LocalFleet
    from edvit.fleet.ops.watch import PredictionStream

    frames = 4
    plan = deploy(Bundle.load(DEFAULT_BUNDLE), _connection(secured, "deploy"), ["node-0"])
    dashboard = _connection(secured, "dashboard")
    with LocalFleet(dashboard, tmp_path / "logs") as fleet:
        fleet.spawn("node-0", "node", "--id", "node-0", env=_login(secured, "node-0"))
        fleet.spawn("aggregator", "aggregator", env=_login(secured, "aggregator"))
        stream = PredictionStream(dashboard, camera="cam0")
        stream.start()
        try:
            fleet.wait_ready(plan, timeout=90)
            fleet.spawn(
                "cam0", "camera", "--id", "cam0", "--source", "dataset:fashion-mnist",
                "--count", str(frames), "--fps", "5", env=_login(secured, "cam0"),
            )  # fmt: skip
            seqs = set()
            while len(seqs) < frames:
                fleet.check_alive()
                seqs.add(stream.queue.get(timeout=30).seq)
        finally:
            stream.stop()
        codes = fleet.stop()
    assert all(code == 0 for code in codes.values()), codes


# -- MQTT 5: refusals are reported, frames expire -------------------------------------------


def _service(sb: SecureBroker, identity: str, version: str) -> MqttClient:
    settings = dataclasses.replace(_connection(sb, identity), mqtt_version=version)
    return MqttClient(f"t-{identity}-{uuid.uuid4().hex[:6]}", settings)


def _eventually(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


DYNSEC_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")


@pytest.fixture(scope="module")
@tier("broker")
def refusing_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, LocalBroker]]:
    """mosquitto with its dynamic-security plugin, which (unlike an acl_file, which lets
    every subscription through and filters deliveries) refuses subscriptions in the SUBACK:
    node-0 may subscribe to the plan only."""
    if not DYNSEC_PLUGIN.is_file():
        pytest.skip(f"mosquitto's dynamic-security plugin is not installed ({DYNSEC_PLUGIN})")
    directory = tmp_path_factory.mktemp("dynsec")
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", b"node-secret", salt, 101, 64)
    (directory / "dynsec.json").write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True,
                             "subscribe": False, "unsubscribe": True},
        "clients": [{
            "username": "node-0", "password": base64.b64encode(digest).decode(),
            "salt": base64.b64encode(salt).decode(), "iterations": 101,
            "roles": [{"rolename": "node"}],
        }],
        "roles": [{"rolename": "node", "acls": [
            {"acltype": "subscribePattern", "topic": "edvit/plan", "allow": True},
        ]}],
        "groups": [],
    }))  # fmt: skip
    (directory / "password").write_text("node-secret\n")
    config = directory / "mosquitto.conf"
    config.write_text(
        "listener 0 127.0.0.1\nallow_anonymous false\nuser root\n"
        f"plugin {DYNSEC_PLUGIN}\nplugin_opt_config_file {directory / 'dynsec.json'}\n"
    )
    broker = LocalBroker(kind="mosquitto", log_path=directory / "broker.log", secure_config=config)
    broker.start()
    try:
        yield directory, broker
    finally:
        broker.stop()


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_a_refused_subscription_is_logged_and_counted(
    refusing_broker: tuple[Path, LocalBroker], caplog, version: str
) -> None:
    """The SUBACK says no (0x87 in MQTT 5, 0x80 in 3.1.1): the service logs it and counts it,
    instead of sitting `ready` with nothing arriving."""
    directory, broker = refusing_broker  # a plain listener: only the login and ACL matter
    settings = Connection(
        f"mqtt://127.0.0.1:{broker.port}", username="node-0",
        password_file=str(directory / "password"), mqtt_version=version,
    )  # fmt: skip
    client = MqttClient(f"t-sub-{uuid.uuid4().hex[:6]}", settings)
    plans: queue.Queue[bytes] = queue.Queue()
    client.route("edvit/predictions/#", lambda _t, _p: None)
    client.route("edvit/plan", lambda _t, payload: plans.put(payload))
    assert client.start(required=True)
    try:
        assert client.mqtt_version == version
        assert _eventually(lambda: client.counters["subscriptions_refused"] == 1)
        client.publish_and_wait("edvit/plan", b"{}", qos=1)
        assert plans.get(timeout=TIMEOUT) == b"{}"  # the allowed one works, and is not counted
        assert client.counters["subscriptions_refused"] == 1
    finally:
        client.stop()
    assert "refused the subscription to edvit/predictions/# as node-0" in caplog.text


def test_a_refused_publish_fails_under_mqtt_5(secured: SecureBroker, caplog) -> None:
    """A camera may not write the plan. MQTT 5's PUBACK says `Not authorized`: a waited
    publish raises, a fire-and-forget one is logged and counted. (3.1.1 has no way to say
    it: the publish looks delivered.)"""
    camera = _service(secured, "cam0", "5")
    assert camera.start(required=True)
    try:
        with pytest.raises(BrokerError, match="refused the publish to edvit/plan for cam0"):
            camera.publish_and_wait("edvit/plan", b"{}", qos=1, retain=True, timeout=TIMEOUT)
        camera.publish("edvit/models/sub0", b"x", qos=1)
        assert _eventually(lambda: camera.counters["publishes_refused"] == 2)
        camera.publish_and_wait("edvit/cameras/cam0/status", b"{}", qos=1, timeout=TIMEOUT)
        assert camera.counters["publishes_refused"] == 2
    finally:
        camera.stop()
    assert "Not authorized" in caplog.text

    old = _service(secured, "cam0", "3.1.1")
    assert old.start(required=True)
    try:
        old.publish_and_wait("edvit/plan", b"{}", qos=1, retain=True, timeout=TIMEOUT)
        assert old.counters["publishes_refused"] == 0
    finally:
        old.stop()


def test_frames_expire_in_the_broker(secured: SecureBroker) -> None:
    """A node away for longer than a frame's expiry gets no stale frames on its return; a
    message of a kind without expiry is still delivered."""
    away = secured.client("node-0")
    away._clean_session = False  # a persistent 3.1.1 session, queued for while it is away
    received: queue.Queue[str] = queue.Queue()
    away.on_message = lambda _c, _u, msg: received.put(msg.topic)
    assert _connect(away, "localhost", secured.broker.port) == 0
    away.subscribe([("edvit/cameras/+/frame", 1), ("edvit/plan", 1)])
    time.sleep(0.3)
    away.disconnect()
    away.loop_stop()
    while not received.empty():  # a plan retained by an earlier test
        received.get()

    camera = _service(secured, "cam0", "5")
    deploy = _service(secured, "deploy", "5")
    assert camera.start(required=True) and deploy.start(required=True)
    try:
        camera.publish_and_wait("edvit/cameras/cam0/frame", b"\x89PNG", qos=1)
        deploy.publish_and_wait("edvit/plan", b"{}", qos=1)
    finally:
        camera.stop()
        deploy.stop()
    time.sleep(MESSAGE_EXPIRY_S["frame"] + 1.0)
    assert _connect(away, "localhost", secured.broker.port) == 0
    try:
        assert received.get(timeout=TIMEOUT) == "edvit/plan"
        with pytest.raises(queue.Empty):
            received.get(timeout=0.5)
    finally:
        away.disconnect()
        away.loop_stop()


@pytest.mark.parametrize("will", [None, "edvit/nodes/t-auto/status"])
def test_auto_falls_back_to_3_1_1_and_5_says_why(
    embedded_broker: LocalBroker, will: str | None
) -> None:
    """amqtt answers an MQTT 5 CONNECT with `Unsupported protocol version`, or, when it
    carries a Will, not at all: --mqtt-version auto goes on with 3.1.1 either way."""
    auto = MqttClient("t-auto", Connection(embedded_broker.url), will_topic=will)
    assert auto.start(wait=TIMEOUT, required=True)
    try:
        assert auto.mqtt_version == "3.1.1"
        auto.publish_and_wait("edvit/plan", b"{}", qos=1)
    finally:
        auto.stop()
    strict = MqttClient("t-v5", Connection(embedded_broker.url, mqtt_version="5"))
    with pytest.raises(ConfigError, match=r"does not speak MQTT 5 \(--mqtt-version 3.1.1\)"):
        strict.start(wait=TIMEOUT, required=True)


@pytest.mark.parametrize(
    ("case", "cause"),
    [
        ("no client certificate", "certificate required"),
        ("wrong password", "not authorised (a wrong username or password"),
        ("unknown user", "not authorised (a wrong username or password"),
        ("a certificate from another CA", "TLS handshake failed: "),
    ],
)
def test_a_refused_client_is_told_why_and_stays_on_mqtt_5(
    secured: SecureBroker, tmp_path: Path, caplog, case: str, cause: str
) -> None:
    """A refusal is not a broker that lacks MQTT 5: no fall back to 3.1.1, and the error
    names the cause, not "no MQTT broker answered"."""
    caplog.set_level(logging.INFO, logger="edvit")
    good = _connection(secured, "node-0")
    (tmp_path / "password").write_text("not-it\n")
    if case == "a certificate from another CA":
        secure.init(tmp_path / "other", secure.parse_identities(["node-0"], []))
        other = tmp_path / "other" / "clients" / "node-0"
    settings = {
        "no client certificate": lambda: dataclasses.replace(good, cert=None, key=None),
        "wrong password": lambda: dataclasses.replace(
            good, password_file=str(tmp_path / "password")
        ),
        "unknown user": lambda: dataclasses.replace(good, username="nobody"),
        "a certificate from another CA": lambda: dataclasses.replace(
            good, cert=str(other / "client.crt"), key=str(other / "client.key")
        ),
    }[case]()
    client = MqttClient(f"t-refused-{uuid.uuid4().hex[:6]}", settings)
    with pytest.raises(ConfigError) as refused:
        client.start(wait=TIMEOUT, required=True)
    message = str(refused.value)
    assert message.startswith(f"the broker {good.address} refused the connection"), message
    assert cause in message, message
    assert client.mqtt_version == "5"
    assert "does not speak MQTT 5" not in caplog.text


@pytest.mark.broker
@pytest.mark.fleet
@pytest.mark.slow
def test_the_demo_runs_over_tls_and_compares_with_plain(tmp_path: Path, capsys) -> None:
    """`edvit demo --secure --compare-plain`: the same frames over a plain broker and over TLS
    with one account per process; both answer every frame, and the table says so."""
    code = main([
        "demo", "--secure", "--compare-plain", "--frames", "6", "--fps", "10",
        "--log-dir", str(tmp_path),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mqtts://127.0.0.1:" in out and "(TLS, one account per process, the ACL)" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-2:]}
    assert rows["plain"][:2] == rows["TLS"][:2] == ["6", "6"]
    assert (tmp_path / "tls" / "secrets" / "broker" / "acl").is_file()


def test_compare_plain_needs_secure(capsys) -> None:
    assert main(["demo", "--compare-plain"]) == 2
    assert "add --secure" in capsys.readouterr().err


@pytest.mark.broker
def test_a_client_on_a_killed_tls_node_goes_on_through_another(tmp_path: Path) -> None:
    """A node logs in to node n0 of the secured cluster (the brokers listed n0, n1, n2); n0
    is killed: the node fails over, over TLS with its own login, still reads the plan deploy
    publishes on n2, and its status reaches an observer on n2. The node is `board.lan`: a
    dot in its id, so in its client id and topics (NATS refuses client ids with dots)."""
    directory, board = tmp_path / "fleet", "board.lan"
    secure.init(directory, secure.parse_identities((*NODES, board), CAMERAS))
    _add_observer(directory, nodes=(*NODES, board))
    cluster = _secure_cluster(directory)
    cluster.start()
    sb = SecureBroker(directory, None, cluster)
    plans: queue.Queue[bytes] = queue.Queue()
    node = _service_on(directory, board, cluster.urls(0))
    node.route("edvit/plan", lambda _t, payload: plans.put(payload), qos=1)
    deploy = _service_on(directory, "deploy", cluster.urls(2))
    observer = Observer(sb, node=2)
    try:
        observer.subscribe("edvit/nodes/+/status")
        assert node.start(required=True) and deploy.start(required=True)
        assert _eventually(lambda: node.subscribed("edvit/plan"), timeout=10)
        deploy.publish_and_wait("edvit/plan", b"before", qos=1)
        assert plans.get(timeout=TIMEOUT) == b"before"
        cluster.kill(cluster.nodes[0])
        # A plan a second until one arrives: the cluster elects new JetStream leaders for
        # what n0 led before it takes QoS 1 subscriptions again.
        deadline, got = time.monotonic() + 45, b""
        while not got.startswith(b"after") and time.monotonic() < deadline:
            with contextlib.suppress(BrokerError):
                deploy.publish_and_wait("edvit/plan", b"after", qos=1, timeout=TIMEOUT)
            with contextlib.suppress(queue.Empty):
                got = plans.get(timeout=1.0)
        assert got == b"after", "no plan reached the node after its NATS node was killed"
        assert node.counters["broker_failovers"] >= 1
        assert node.address.port != cluster.nodes[0].mqtt_port and node.address.tls
        status = f"up-{uuid.uuid4().hex}".encode()
        node.publish_and_wait(f"edvit/nodes/{board}/status", status, qos=1, timeout=TIMEOUT)
        assert observer.until(f"edvit/nodes/{board}/status", status) == []
    finally:
        observer.stop()
        node.stop()
        deploy.stop()
        cluster.stop()


def _service_on(directory: Path, identity: str, urls: str) -> MqttClient:
    """An edvit client logged in as `identity` to the brokers `urls`, in that order."""
    settings = dataclasses.replace(secure.login(directory, identity, urls), mqtt_version="3.1.1")
    return MqttClient(unique_client_id(identity), settings)
