"""`edvit secure init`: the files a fleet needs to stop trusting whoever reaches the broker.

One run writes, under DIR (README, "Security"):

    ca.crt, ca.key                       a local certificate authority (keep ca.key offline)
    broker/server.crt, server.key        the broker's TLS certificate (SAN: --hostname,
                                         localhost, 127.0.0.1)
    broker/passwd                        mosquitto_passwd format, one line per identity
    broker/acl                           what each identity may read and write
    broker/mosquitto.conf                TLS listener, no anonymous access, packet limit
    nats/users.conf, mqtt-tls.conf,      the same users and rules for a NATS cluster, MQTT
      cluster-tls.conf, route.crt/key,   over TLS, TLS between its nodes, and one node's
      node.conf.example                  config that includes them
    clients/<identity>/client.crt, client.key, password
    signing/plan.key, plan.pub           Ed25519 plan-signing key pair (used by a later step)

Identities are `deploy`, `aggregator`, `dashboard`, `homeassistant` (Home Assistant's MQTT
integration, for `edvit aggregator --ha-discovery`), every node and every camera; a node's or
camera's identity is its id, and the ACL grants it its own topics only.

Keys, certificates and passwords are never overwritten unless `force`: running again with
one more node adds that node's files and leaves the others. The password file, the ACL and
the broker configs are derived from the identities and are rewritten on every run.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import ipaddress
import logging
import os
import pwd
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edvit.aggregator.ha import acl_topics, check_ha_prefix
from edvit.broker.local import secure_mosquitto_config
from edvit.broker.nats_cluster import SecureNatsFiles, nats_authorization
from edvit.errors import ConfigError
from edvit.mqtt import Connection
from edvit.topics import DEFAULT_HA_PREFIX, Topics

log = logging.getLogger("edvit.fleet.ops.secure")

FIXED_IDENTITIES = ("deploy", "aggregator", "dashboard", "homeassistant")
DEFAULT_TLS_PORT = 8883
# mosquitto_passwd's own format (mosquitto 2.x): $7$ = PBKDF2-HMAC-SHA512, 101 iterations,
# a 12-byte salt; salt and hash in standard base64.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
CA_DAYS, LEAF_DAYS = 3650, 825
# A username becomes an ACL topic level and a passwd line: letters, digits, '.', '_', '-'.
IDENTITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# nats/node.conf.example: NATS's usual route and client ports, three made-up node names.
NATS_ROUTE_PORT, NATS_CLIENT_PORT = 6222, 4222
NATS_EXAMPLE_NODES = ("nats-0.lan", "nats-1.lan", "nats-2.lan")
NATS_EXAMPLE_HEADER = """\
# One node of a secured NATS cluster (docs/operations/brokers.md, "NATS cluster"): copy it
# per node, next to the files it includes (their paths are relative to this file's folder),
# change server_name, the store, the listen addresses and the routes (every node's name must
# be in the certificates: `edvit secure init --hostname NAME`). The TLS files name DIR's
# certificates and keys by absolute path: give each node DIR at the same path. The client
# port (`listen`) has no TLS: keep it on loopback. Run: nats-server -c node.conf
"""


@dataclass(frozen=True)
class Identities:
    nodes: tuple[str, ...]
    cameras: tuple[str, ...]

    def all(self) -> tuple[str, ...]:
        return (*FIXED_IDENTITIES, *self.nodes, *self.cameras)


def parse_identities(nodes: Iterable[str], cameras: Iterable[str]) -> Identities:
    """Validated, de-duplicated node and camera ids; ConfigError naming the bad one."""
    found = Identities(tuple(nodes), tuple(cameras))
    seen: set[str] = set()
    for name in found.all():
        if not IDENTITY_RE.match(name):
            raise ConfigError(
                f"identity {name!r}: use letters, digits, '.', '_' and '-' (it becomes a "
                "username and a topic level)"
            )
        if name in seen:
            raise ConfigError(f"identity {name!r} is given twice (or is a reserved name)")
        seen.add(name)
    return found


def password_line(username: str, password: str, salt: bytes | None = None) -> str:
    """A mosquitto_passwd line: `user:$7$101$<b64 salt>$<b64 PBKDF2-SHA512 hash>`."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"{username}:$7${PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


Rules = dict[str, list[tuple[str, str]]]
"""identity -> [(access, topic filter)], access one of `read`, `write`, `readwrite`."""


def acl_rules(
    identities: Identities, topics: Topics, dashboard_sees_frames: bool = False,
    ha_prefix: str = DEFAULT_HA_PREFIX,
) -> Rules:  # fmt: skip
    """What each identity may read and write (README, "Security"): one set of rules, which
    `acl_text` writes for mosquitto and `nats_authorization` for a NATS cluster; `ha_prefix`
    is Home Assistant's discovery prefix (the aggregator's --ha-prefix).

    Node and camera rules name their own id, not a `%u` pattern: mosquitto applies a
    `pattern` line to every user, so `pattern write .../nodes/%u/status` would let a camera
    or the dashboard publish the status of a phantom node named after itself, and the
    planner would place sub-models on it. The rules are written by this function, so adding
    a node is running `edvit secure init` again, not editing the ACL.
    """
    t = topics.prefix
    rules: Rules = {}
    # deploy publishes the plan and model files; reads them back (`--clear`, checks).
    rules["deploy"] = [("readwrite", f"{t}/plan"), ("readwrite", f"{t}/models/#")]
    # The aggregator follows the plan and fusion model, every node's status and feature, the
    # serving aggregator's status and lease, and predictions (a standby learns of answers);
    # it publishes predictions, its statuses, the lease, and - its planner - the fleet
    # health and a re-placed plan when nodes go down (aggregator/planner.py); with
    # --ha-discovery, its cameras' Home Assistant configs and states (outside the prefix,
    # under this fleet's node id only, write only).
    rules["aggregator"] = [
        ("readwrite", f"{t}/plan"),
        ("read", f"{t}/models/#"),
        ("read", f"{t}/nodes/+/status"),
        ("read", f"{t}/features/#"),
        ("readwrite", f"{t}/predictions/#"),
        ("readwrite", f"{t}/aggregator/#"),
        ("readwrite", f"{t}/aggregators/#"),
        ("readwrite", f"{t}/fleet/#"),
        ("write", f"{t}/stats/aggregators/#"),
        ("write", acl_topics(ha_prefix, topics)),
    ]
    dashboard = [
        ("read", f"{t}/predictions/#"),
        ("read", f"{t}/plan"),
        ("read", f"{t}/nodes/+/status"),
        ("read", f"{t}/cameras/+/status"),
        ("read", f"{t}/aggregator/#"),
        ("read", f"{t}/aggregators/#"),
        ("read", f"{t}/fleet/#"),
        ("read", f"{t}/stats/#"),
    ]
    if dashboard_sees_frames:
        dashboard += [("read", f"{t}/cameras/+/frame"), ("read", f"{t}/cameras/+/tokens")]
    rules["dashboard"] = dashboard
    # Home Assistant's MQTT integration: discovery configs and the sensors' states under the
    # discovery prefix, the serving aggregator's status (availability), and its own birth
    # and last-will messages on {ha_prefix}/status.
    rules["homeassistant"] = [
        ("read", f"{ha_prefix}/#"),
        ("write", f"{ha_prefix}/status"),
        ("read", f"{t}/aggregator/status"),
    ]
    for node in identities.nodes:
        # features/{camera}/{sub-model}/{node}: which sub-models a node serves changes with
        # the plan, so the ACL pins the node and the aggregator checks the sub-model against
        # the plan the features name.
        rules[node] = [
            ("read", f"{t}/plan"),
            ("read", f"{t}/models/#"),
            ("read", f"{t}/cameras/+/frame"),
            ("read", f"{t}/cameras/+/tokens"),
            ("write", f"{t}/features/+/+/{node}"),
            ("write", f"{t}/nodes/{node}/status"),
            ("write", f"{t}/stats/nodes/{node}"),
        ]
    for camera in identities.cameras:
        # A camera with head slices follows the plan and loads the shared stem.
        rules[camera] = [
            ("read", f"{t}/plan"),
            ("read", f"{t}/models/#"),
            ("write", f"{t}/cameras/{camera}/frame"),
            ("write", f"{t}/cameras/{camera}/tokens"),
            ("write", f"{t}/cameras/{camera}/status"),
            ("write", f"{t}/stats/cameras/{camera}"),
        ]
    return rules


def acl_text(
    identities: Identities, topics: Topics, dashboard_sees_frames: bool = False,
    ha_prefix: str = DEFAULT_HA_PREFIX,
) -> str:  # fmt: skip
    """The rules of `acl_rules` as a mosquitto ACL file, one `user` section per identity."""
    out = ["# Written by `edvit secure init`; rewritten on every run.", ""]
    for user, lines in acl_rules(identities, topics, dashboard_sees_frames, ha_prefix).items():
        out += [f"user {user}", *(f"topic {access} {topic}" for access, topic in lines), ""]
    return "\n".join(out)


def _write_secret(path: Path, data: bytes) -> None:
    """Create `path` owner-only (0600) from the start: no moment when others can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edvit fleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class _Authority:
    """The local CA: loaded from DIR when there, else made (and written) now."""

    def __init__(self, directory: Path, force: bool) -> None:
        cert_path, key_path = directory / "ca.crt", directory / "ca.key"
        self.created = force or not (cert_path.exists() and key_path.exists())
        if self.created:
            self.key = ec.generate_private_key(ec.SECP256R1())
            now = datetime.datetime.now(datetime.timezone.utc)
            # A name of its own per fleet: a certificate from another fleet's CA is then
            # reported as "unable to get local issuer certificate", not a signature failure.
            name = _name(f"edvit fleet CA {secrets.token_hex(4)}")
            self.cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(self.key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=False,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )  # fmt: skip
                .sign(self.key, hashes.SHA256())
            )
            _write_secret(key_path, _pem_key(self.key))
            _write_public(cert_path, self.cert.public_bytes(serialization.Encoding.PEM))
            return
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            self.cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the CA from {directory}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path}: not the EC key `edvit secure init` writes")
        self.key = key

    def issue(
        self, cert_path: Path, key_path: Path, common_name: str, *, server_names: list[str],
        also_client: bool = False,
    ) -> bool:  # fmt: skip
        """Write a certificate and key signed by this CA unless both exist (and the CA is
        the one that was there). A server certificate gets the names as SANs; `also_client`
        lets it prove itself as a client too (a NATS node opening a route to another)."""
        if not self.created and cert_path.exists() and key_path.exists():
            return False
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server_names else []
        if also_client or not server_names:
            usage.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        )
        if server_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in server_names]),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        _write_secret(key_path, _pem_key(key))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return True


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def init(
    directory: Path,
    identities: Identities,
    *,
    hostnames: Iterable[str] = (),
    topics: Topics | None = None,
    port: int = DEFAULT_TLS_PORT,
    listen: str = "0.0.0.0",
    broker_user: str | None = None,
    dashboard_sees_frames: bool = False,
    ha_prefix: str = DEFAULT_HA_PREFIX,
    force: bool = False,
) -> list[str]:
    """Write (or complete) DIR; return the files it created, relative to DIR."""
    topics = topics or Topics()
    check_ha_prefix(ha_prefix)
    broker_user = broker_user or current_user()
    created: list[str] = []
    directory.mkdir(parents=True, exist_ok=True)
    ca = _Authority(directory, force)
    if ca.created:
        created += ["ca.crt", "ca.key"]
    names = list(dict.fromkeys([*hostnames, "localhost", "127.0.0.1"]))
    broker = directory / "broker"
    if ca.issue(broker / "server.crt", broker / "server.key", names[0], server_names=names):
        created += ["broker/server.crt", "broker/server.key"]
    nats = SecureNatsFiles(directory)
    if ca.issue(
        nats.nats / "route.crt", nats.nats / "route.key", names[0], server_names=names,
        also_client=True,
    ):  # fmt: skip
        created += ["nats/route.crt", "nats/route.key"]
    passwd, passwords = [], {}
    for identity in identities.all():
        home = directory / "clients" / identity
        if ca.issue(home / "client.crt", home / "client.key", identity, server_names=[]):
            created += [f"clients/{identity}/client.crt", f"clients/{identity}/client.key"]
        password_path = home / "password"
        if force or not password_path.exists():
            _write_secret(password_path, (secrets.token_urlsafe(24) + "\n").encode())
            created.append(f"clients/{identity}/password")
        password = password_path.read_text(encoding="utf-8").rstrip("\r\n")
        passwd.append(password_line(identity, password))
        passwords[identity] = password
    signing = directory / "signing"
    if force or not (signing / "plan.key").exists():
        key = ed25519.Ed25519PrivateKey.generate()
        _write_secret(signing / "plan.key", _pem_key(key))
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        _write_public(signing / "plan.pub", public)
        created += ["signing/plan.key", "signing/plan.pub"]
    # Derived files: rewritten every run, so they always match the identities given.
    _write_secret(broker / "passwd", ("\n".join(passwd) + "\n").encode())
    rules = acl_rules(identities, topics, dashboard_sees_frames, ha_prefix)
    _write_secret(broker / "acl", acl_text(identities, topics, dashboard_sees_frames,
                                           ha_prefix).encode())  # fmt: skip
    config = secure_mosquitto_config(directory, listen, port, broker_user)
    _write_public(broker / "mosquitto.conf", config.encode())
    _write_secret(nats.nats / "users.conf", nats_authorization(rules, passwords).encode())
    _write_public(nats.nats / "mqtt-tls.conf", nats.mqtt_tls().encode())
    _write_public(nats.nats / "cluster-tls.conf", nats.cluster_tls().encode())
    example = nats.node_config(
        "n0", mqtt_listen=f"{listen}:{port}", cluster_listen=f"{listen}:{NATS_ROUTE_PORT}",
        routes=[f"{name}:{NATS_ROUTE_PORT}" for name in NATS_EXAMPLE_NODES],
        client_listen=f"127.0.0.1:{NATS_CLIENT_PORT}", store_dir="/var/lib/nats/jetstream",
        config_dir=nats.nats,
    )  # fmt: skip
    _write_public(nats.nats / "node.conf.example", (NATS_EXAMPLE_HEADER + example).encode())
    _hand_broker_files_to(broker, broker_user)
    stale = sorted(
        p.name for p in (directory / "clients").iterdir() if p.name not in identities.all()
    )
    if stale:
        log.warning("not in the passwd file any more (cannot log in): %s", ", ".join(stale))
    return created


def login_env(directory: Path, identity: str) -> dict[str, str]:
    """The EDVIT_* variables that log `identity` in with DIR's files (the password stays in
    its file): what a board's service unit or `edvit demo --secure` sets."""
    home = directory / "clients" / identity
    return {
        "EDVIT_CA": str(directory / "ca.crt"),
        "EDVIT_CERT": str(home / "client.crt"),
        "EDVIT_KEY": str(home / "client.key"),
        "EDVIT_USERNAME": identity,
        "EDVIT_PASSWORD_FILE": str(home / "password"),
    }


def login(directory: Path, identity: str, url: str) -> Connection:
    """The same login as a Connection, for code that connects in this process."""
    env = login_env(directory, identity)
    return Connection(
        url, ca=env["EDVIT_CA"], cert=env["EDVIT_CERT"], key=env["EDVIT_KEY"],
        username=identity, password_file=env["EDVIT_PASSWORD_FILE"],
    )  # fmt: skip


def _hand_broker_files_to(broker: Path, user: str) -> None:
    """mosquitto started as root drops to `user` before reading its key, password and ACL
    files: make that user their owner (they stay 0600). Only root can, and must."""
    if os.geteuid() != 0 or user == "root":
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"--broker-user {user}: no such user on this machine") from None
    for path in (broker, *broker.iterdir()):
        os.chown(path, entry.pw_uid, entry.pw_gid)


# -- the `edvit secure` command ----------------------------------------------------------


def _ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["init"], help="init: write or complete DIR")
    parser.add_argument("dir", metavar="DIR", help="where the CA, keys and broker files go")
    parser.add_argument(
        "--nodes", type=_ids, default=[], help="comma-separated node ids (each an identity)"
    )
    parser.add_argument(
        "--cameras", type=_ids, default=[], help="comma-separated camera ids (each an identity)"
    )
    parser.add_argument(
        "--hostname", action="append", default=[],
        help="a name or address clients use for the broker, put in its certificate (repeat "
        "for several; localhost and 127.0.0.1 are always there)",
    )  # fmt: skip
    parser.add_argument(
        "--port", type=int, default=DEFAULT_TLS_PORT,
        help="the TLS listener's port in mosquitto.conf (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--broker-user",
        help="the user mosquitto runs as, owner of DIR/broker (default: you; as root, "
        "mosquitto then keeps root - pass `mosquitto` to have it drop privileges)",
    )
    parser.add_argument(
        "--dashboard-sees-frames", action="store_true",
        help="let the dashboard identity read camera frames and tokens",
    )  # fmt: skip
    parser.add_argument(
        "--ha-prefix", default=DEFAULT_HA_PREFIX,
        help="Home Assistant's discovery prefix, as the aggregator's --ha-prefix: the "
        "aggregator writes and the homeassistant identity reads under it (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--force", action="store_true", help="replace existing keys, certificates and passwords"
    )


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is out of range 1-65535")
    identities = parse_identities(args.nodes, args.cameras)
    directory = Path(args.dir)
    try:
        created = init(
            directory, identities, hostnames=args.hostname, topics=Topics(args.prefix),
            port=args.port, broker_user=args.broker_user,
            dashboard_sees_frames=args.dashboard_sees_frames, ha_prefix=args.ha_prefix,
            force=args.force,
        )  # fmt: skip
    except PermissionError as exc:
        raise ConfigError(f"{exc.filename}: permission denied") from None
    print(f"{directory}: {len(created)} new files, {len(identities.all())} identities")
    for name in created:
        print(f"  {name}")
    print(f"start the broker: edvit broker --secure {directory}")
    print(f"or a NATS cluster: one node per {directory / 'nats' / 'node.conf.example'}")
    return 0
