"""The one place that imports paho-mqtt.

Services see `MqttClient`: `route` a topic filter to a handler, `publish`, `set_status`,
`start`, `stop`. The client sets its Will (retained "offline" status) before connecting,
and on every (re)connect subscribes again and republishes its retained status, so a
broker restart loses nothing but the messages in flight.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edvit.errors import BadPayload, BrokerError, ConfigError
from edvit.limits import (
    MAX_PACKET_BYTES,
    MESSAGE_EXPIRY_S,
    PayloadKind,
    max_payload_bytes,
    topic_kind,
)
from edvit.schemas import OFFLINE_STATUS, StatusMsg, encode

Handler = Callable[[str, bytes], None]

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_PORTS = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}
# Fleet timing (README, "Failure behaviour"): a client pings the broker after KEEPALIVE_S
# of silence and the broker gives up on it (and sends its Will) after 1.5x that, so a board
# that loses power or network is declared offline within ~8 s; a frozen node is caught
# sooner by the aggregator, from its missing features. Reconnects retry every 1..5 s
# (every 1 s for a client given several brokers).
KEEPALIVE_S = 5
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 5
# Model files travel as retained messages; paho's default of unlimited in-flight bytes is
# fine, but the broker must accept messages this large (mosquitto's default is 256 MB).
PUBLISH_TIMEOUT_S = 30.0
MAX_INFLIGHT = 1000
# --mqtt-version: "auto" speaks MQTT 5 and falls back to 3.1.1 when the broker refuses 5
# (the embedded amqtt broker, NATS).
MQTT_VERSIONS = ("auto", "5", "3.1.1")
# CONNACK codes meaning "not this protocol version": 3.1.1's 1 and MQTT 5's 0x84.
_UNSUPPORTED_VERSION = (1, 0x84)
# CONNACK refusals (MQTT 5 reason codes; paho maps 3.1.1's return codes 4 and 5 onto them)
# named by their cause. mosquitto answers a wrong password with "not authorised".
_REFUSALS = {
    0x86: "login refused (bad username or password)",
    0x87: "not authorised (a wrong username or password, or an identity the broker does "
    "not let in)",
    0x8C: "login refused (the broker does not take this authentication method)",
}
# --mqtt-version auto: how long an MQTT 5 CONNECT may go unanswered before 3.1.1 is tried.
CONNACK_WAIT_S = 2.0
_PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}
# --max-qos: the highest QoS a client publishes and subscribes with. Every edvit client
# starts a clean session, so no broker redelivers a QoS 1 message lost with a connection.
# NATS keeps each QoS 1 subscription as a JetStream consumer and stores each QoS 1 publish in
# a JetStream stream before it acknowledges it; while JetStream elects new leaders after
# losing a cluster node (4-9 s) those stall and fail, where QoS 0 goes on: 0 on NATS
# (docs/operations/brokers.md).
MAX_QOS = (0, 1)
# With several brokers (a NATS cluster), a refused subscription may be the cluster still
# electing the JetStream leaders that QoS 1 subscriptions need after losing a node: it is
# tried again, SUBSCRIBE_RETRIES times at most, SUBSCRIBE_RETRY_S apart. One broker: never
# (a refusal there is the ACL, README "Security").
SUBSCRIBE_RETRY_S = 5.0
SUBSCRIBE_RETRIES = 3


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Accept mqtt://host:port, mqtts://host:port (TLS, default port 8883), host:port or
        host (port 1883)."""
        text = url if "://" in url else f"mqtt://{url}"
        try:
            parsed = urlparse(text)
            port = parsed.port or DEFAULT_PORTS.get(parsed.scheme, 1883)
        except ValueError as exc:
            raise ConfigError(f"bad broker address {url!r}: {exc}") from None
        if parsed.scheme not in DEFAULT_PORTS or not parsed.hostname:
            raise ConfigError(
                f"bad broker address {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT"
            )
        return cls(parsed.hostname, port, tls=parsed.scheme in ("mqtts", "ssl"))

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_brokers(urls: str) -> tuple[BrokerAddress, ...]:
    """A comma-separated list of broker addresses (a cluster, or brokers bridged together),
    in the order a client tries them."""
    addresses = tuple(BrokerAddress.parse(url.strip()) for url in urls.split(",") if url.strip())
    if not addresses:
        raise ConfigError(f"bad broker address {urls!r}: no address given")
    return addresses


@dataclass(frozen=True)
class Connection:
    """Where the broker is and how to log in: the `--broker`, `--ca`, `--cert`, `--key`,
    `--username` and `--password-file` options (README, "Security"). The password is read
    from a file, never given on a command line, where `ps` would show it.

    `url` may list several brokers, comma-separated (README, "Which broker"): the client
    connects to the first that answers and moves on to the next when it loses that one.
    TLS and the login apply to all of them."""

    url: str = DEFAULT_BROKER
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password_file: str | None = None
    mqtt_version: str = "auto"
    max_qos: int = 1

    @property
    def addresses(self) -> tuple[BrokerAddress, ...]:
        return parse_brokers(self.url)

    @property
    def address(self) -> BrokerAddress:
        """The first broker of the list (the only one, usually)."""
        return self.addresses[0]

    def __str__(self) -> str:
        """Every broker, in order: what `--broker` takes back (a child process's option)."""
        return ",".join(str(address) for address in self.addresses)

    def check(self) -> None:
        """ConfigError, naming the option or file, for settings that cannot work: TLS files
        without mqtts://, a certificate without its key, a file that is missing or
        unreadable, a password file without a username."""
        addresses = self.addresses
        if len({address.tls for address in addresses}) > 1:
            # One TLS setting per client: a paho client cannot drop TLS for the next broker.
            raise ConfigError(f"--broker {self}: use mqtts:// for all brokers or for none")
        address = addresses[0]
        if not address.tls and (self.ca or self.cert or self.key):
            raise ConfigError(f"--ca/--cert/--key need an mqtts:// broker, not {self}")
        if bool(self.cert) != bool(self.key):
            raise ConfigError("--cert and --key go together: give both or neither")
        if self.password_file and not self.username:
            raise ConfigError("--password-file needs --username")
        if self.mqtt_version not in MQTT_VERSIONS:
            raise ConfigError(
                f"--mqtt-version {self.mqtt_version!r}: expected one of {', '.join(MQTT_VERSIONS)}"
            )
        if self.max_qos not in MAX_QOS:
            raise ConfigError(f"--max-qos {self.max_qos!r}: expected 0 or 1")
        for option, path in (
            ("--ca", self.ca), ("--cert", self.cert), ("--key", self.key),
            ("--password-file", self.password_file),
        ):  # fmt: skip
            if path is not None:
                _read_file(option, path)

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        text = _read_file("--password-file", self.password_file).decode("utf-8", "replace")
        password = text.rstrip("\r\n")
        if not password:
            raise ConfigError(f"--password-file {self.password_file}: the file is empty")
        return password

    def ssl_context(self) -> ssl.SSLContext:
        """Server certificate checked against --ca (else the system's CAs) and its hostname
        checked: both on, always. The client certificate is presented when given."""
        try:
            context = ssl.create_default_context(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--ca {self.ca}: not a usable CA certificate ({exc})") from None
        if self.cert and self.key:
            try:
                context.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"--cert {self.cert} / --key {self.key}: not a usable certificate and "
                    f"key pair ({exc})"
                ) from None
        return context


def _read_file(option: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{option} {path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{option} {path}: not readable by this user") from None
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot read it ({exc.strerror})") from None


def as_connection(broker: str | BrokerAddress | Connection) -> Connection:
    """A bare address is a connection without TLS files or login."""
    return broker if isinstance(broker, Connection) else Connection(str(broker))


class Transport(Protocol):
    """What a service needs of its MQTT client. `MqttClient` is the real one; tests hand a
    service an in-memory one to exercise its logic without a broker."""

    counters: Counter[str]

    def route(self, topic_filter: str, handler: Handler, qos: int = 0) -> None: ...
    def unroute(self, topic_filter: str, handler: Handler | None = None) -> None: ...
    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False
                ) -> object: ...  # fmt: skip
    def set_status(self, status: StatusMsg) -> None: ...
    def publish_now(self, topic: str, payload: bytes | str, *, retain: bool = False,
                    epoch: int | None = None) -> bool: ...  # fmt: skip
    def mirror_status(self, topic: str | None) -> None: ...
    def start(self, wait: float | None = 10.0, required: bool = False) -> bool: ...
    def stop(self, timeout: float = 5.0) -> None: ...
    @property
    def shared_subscriptions(self) -> bool: ...
    @property
    def connected(self) -> bool: ...
    @property
    def connection_epoch(self) -> int: ...
    def subscribed(self, topic_filter: str) -> bool: ...


def kind_of(topic: str) -> PayloadKind | None:
    """The contract's payload kind of a full topic. The prefix may have several levels, so
    the contract's topic is found from the end."""
    levels = topic.split("/")
    for size in (4, 3, 2, 1):
        kind = topic_kind(levels[-size:]) if len(levels) > size else None
        if kind is not None:
            return kind
    return None


def payload_limit(topic: str) -> int:
    """The largest payload the contract accepts on this topic (edvit/limits.py)."""
    kind = kind_of(topic)
    return MAX_PACKET_BYTES if kind is None else max_payload_bytes(kind)


def _expiry_properties() -> dict[str, Properties]:
    properties = {}
    for kind, seconds in MESSAGE_EXPIRY_S.items():
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = seconds
        properties[kind] = props
    return properties


_EXPIRY = _expiry_properties()


def drop_bad_payload(
    topic: str, size: int, reason: object, counters: Counter[str], log: logging.Logger
) -> None:
    """The one line and the count of a message dropped as bad: in `deliver`, or later where
    a service finds a queued message bad (a node decodes a frame's image when it serves it)."""
    counters["bad_payloads"] += 1
    log.warning(
        "dropped message on %s (%d bytes): %s [bad_payloads=%d]",
        topic, size, reason, counters["bad_payloads"],
    )  # fmt: skip


def deliver(
    handlers: Sequence[Handler],
    topic: str,
    payload: bytes,
    counters: Counter[str],
    log: logging.Logger,
) -> None:
    """Call a message's handlers the way every transport must: a BadPayload drops the
    message with one log line and a count (the other handlers would find it bad too); any
    other exception is a bug, logged and counted, and never reaches the thread that
    delivered the message."""

    def drop(reason: object) -> None:
        drop_bad_payload(topic, len(payload), reason, counters, log)

    counters["messages_in"] += 1
    limit = payload_limit(topic)
    if len(payload) > limit:
        counters["payloads_too_large"] += 1
        drop(f"over this topic's limit of {limit} bytes")
        return
    for handler in handlers:
        try:
            handler(topic, payload)
        except BadPayload as exc:
            drop(exc)
            return
        except Exception:
            counters["handler_errors"] += 1
            log.exception("handler for %s failed", topic)


SHARE_PREFIX = "$share/"


def shared_filter(group: str, topic_filter: str) -> str:
    """An MQTT shared subscription: the broker hands each matching message to one of the
    clients subscribed with the same group and filter (MQTT 5; mosquitto also over 3.1.1)."""
    if not group or any(c in group for c in "/+#"):
        raise ValueError(f"share group {group!r} must be non-empty and contain no '/', '+', '#'")
    return f"{SHARE_PREFIX}{group}/{topic_filter}"


def matching_filter(topic_filter: str) -> str:
    """The filter a received topic is matched against: a shared subscription's messages
    arrive on their own topic, without `$share/{group}/`."""
    if topic_filter.startswith(SHARE_PREFIX):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def unique_client_id(kind: str) -> str:
    """A client id no other process uses: a second instance must not take over the first's
    session (the broker disconnects the older of two clients with the same id). Dots become
    `_`: NATS refuses an MQTT client id with a dot, as a host name or a node id may have."""
    raw = f"edvit-{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return raw.replace(".", "_")


_RECV_FAILED = "failed to receive on socket: "


def _tls_failure_text(error: str) -> str:
    """A TLS error's text (`[SSL: CODE] reason (_ssl.c:N)`) as its cause, in words."""
    if "CERTIFICATE_REQUIRED" in error.upper().replace(" ", "_"):
        return "certificate required: the broker wants this client's certificate (--cert, --key)"
    reason = error.split("]", 1)[-1].split(" (_ssl.c", 1)[0].strip() or error
    return f"TLS handshake failed: {reason}"


def _tls_failure(exc: ssl.SSLError) -> str:
    return _tls_failure_text(f"[SSL: {exc.reason}] {exc.reason}" if exc.reason else str(exc))


def _disable_nagle(_client: paho.Client, _userdata: object, sock: object) -> None:
    # paho leaves Nagle on; small messages (features, predictions) then wait for the
    # peer's delayed ACK, adding up to ~40 ms per hop even on loopback.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttClient:
    """A paho client with a retained status topic, a Will, routing and counters."""

    def __init__(
        self,
        client_id: str,
        broker: str | BrokerAddress | Connection,
        *,
        status_topic: str | None = None,
        will_topic: str | None = None,
        logger: logging.Logger | None = None,
        keepalive: int = KEEPALIVE_S,
        status_interval_s: float = 15.0,
    ) -> None:
        self.client_id = client_id
        self.connection = as_connection(broker)
        self.connection.check()
        # --broker may list several brokers: `address` is the one this client is on (or
        # trying), `_last_connected` the one it was last connected to.
        self.addresses = self.connection.addresses
        self._broker_index = 0
        self._last_connected: BrokerAddress | None = None
        self._subscribe_retries: Counter[str] = Counter()
        self.log = logger or logging.getLogger(f"edvit.mqtt.{client_id}")
        self.counters: Counter[str] = Counter()
        self._status_topic = status_topic
        self._mirror_topic: str | None = None
        self._status: StatusMsg | None = None
        self._routes: dict[str, tuple[list[Handler], int]] = {}
        self._handlers: dict[str, tuple[Handler, ...]] = {}  # see _index_handlers
        self._status_interval_s = status_interval_s
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._keepalive = keepalive
        self._lock = threading.Lock()
        self._refused: str | None = None
        # Every connection is a session of its own: its statuses carry when it began and a
        # sequence number, and its Will is stamped with the same session (StatusMsg.session).
        self._session = 0.0
        self._status_seq = 0
        self._status_lock = threading.Lock()
        self._epoch = 0  # connections made so far; see connection_epoch
        self._epoch_lock = threading.Lock()  # the epoch and `_connected` change together
        self._granted: set[str] = set()  # filters the broker granted on this connection
        self._will_topic = will_topic
        self._ever_connected = False
        self._socket_opened = False
        self._falling_back = False
        self._shared_available = False
        self._socket_error: str | None = None  # why the socket failed before any CONNACK

        # mid -> topic of QoS>0 publishes awaiting their ack, mid -> filters of subscribes
        # awaiting theirs; mid -> reason of publishes the broker refused (MQTT 5 only).
        self._pending_publishes: dict[int, str] = {}
        self._pending_subscribes: dict[int, list[str]] = {}
        self._refused_publishes: dict[int, str] = {}
        self._acks_lock = threading.Lock()
        first = "3.1.1" if self.connection.mqtt_version == "3.1.1" else "5"
        self._client = self._new_paho(_PROTOCOLS[first])

    def _new_paho(self, protocol: MQTTProtocolVersion) -> paho.Client:
        v5 = protocol == MQTTProtocolVersion.MQTTv5
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            # MQTT 5 has clean_start on connect instead; nothing keeps a session either way.
            clean_session=None if v5 else True,
        )
        # With several brokers (a cluster), a node that refuses a CONNECT while it elects
        # leaders (NATS: "loading session record: timeout") is tried again every second.
        slowest = RECONNECT_MAX_S if len(self.addresses) == 1 else RECONNECT_MIN_S
        client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=slowest)
        client.max_queued_messages_set(1000)
        # QoS 1 messages awaiting their ack (paho's default is 20): an answering aggregator
        # publishes a QoS 1 prediction per frame, and 20 in flight capped it near 20 per
        # broker round trip, so predictions overflowed the queue under load (bench scale).
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_connect_fail = self._on_connect_fail
        client.on_pre_connect = self._on_pre_connect
        # Until the first connection only: paho formats every log line once on_log is set.
        client.on_log = None if self._ever_connected else self._on_paho_log
        if self.connection.username:
            client.username_pw_set(self.connection.username, self.connection.password())
        if self.address.tls:
            client.tls_set_context(self.connection.ssl_context())
        self._set_will(client)
        with self._lock:
            filters = list(self._routes)
        for match in {matching_filter(f) for f in filters}:
            client.message_callback_add(match, self._dispatcher(match))
        return client

    def _set_will(self, client: paho.Client) -> None:
        will = self._will_topic or self._status_topic
        if will:
            offline = OFFLINE_STATUS.model_copy(update={"session": self._session or None})
            client.will_set(will, encode(offline), qos=self._qos(1), retain=True)

    def _on_pre_connect(self, client: paho.Client, _userdata: object) -> None:
        """Before every connection attempt: a new session, and a Will that names it."""
        with self._status_lock:
            self._session = max(time.time(), self._session + 1e-6)
            self._status_seq = 0
        self._set_will(client)

    @property
    def address(self) -> BrokerAddress:
        """The broker this client is connected to, or trying next."""
        return self.addresses[self._broker_index]

    def _qos(self, qos: int) -> int:
        """The QoS used for one asked for: at most --max-qos."""
        return min(qos, self.connection.max_qos)

    @property
    def mqtt_version(self) -> str:
        """The protocol this client speaks now: "5" or "3.1.1"."""
        return "5" if self._client.protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1"

    def _connect_args(self) -> dict[str, object]:
        args: dict[str, object] = {
            "host": self.address.host, "port": self.address.port, "keepalive": self._keepalive,
        }  # fmt: skip
        if self.mqtt_version == "5":
            args["clean_start"] = True
        return args

    # -- wiring -----------------------------------------------------------------------
    def route(self, topic_filter: str, handler: Handler, qos: int = 0) -> None:
        """Call handler(topic, payload) for messages matching topic_filter; subscribed on every
        connect. Several handlers may share a filter (services sharing a client). A handler
        raising BadPayload has the message dropped with one log line."""
        match = matching_filter(topic_filter)
        with self._lock:
            first = not any(matching_filter(f) == match for f in self._routes)
            handlers, _ = self._routes.get(topic_filter, ([], qos))
            self._routes[topic_filter] = ([*handlers, handler], qos)
            self._index_handlers()
        if first:
            self._client.message_callback_add(match, self._dispatcher(match))
        if self._connected.is_set():
            # Also for a filter already subscribed: subscribing again makes the broker send
            # its retained messages again, which a handler added now has not seen.
            self._subscribe(self._client, topic_filter, qos)

    def unroute(self, topic_filter: str, handler: Handler | None = None) -> None:
        """Stop calling `handler` (default: every handler) for topic_filter; unsubscribe when
        no handler is left."""
        with self._lock:
            handlers, qos = self._routes.get(topic_filter, ([], 0))
            kept = [h for h in handlers if handler is not None and h != handler]
            if not handlers or len(kept) == len(handlers):
                return
            if kept:
                self._routes[topic_filter] = (kept, qos)
                self._index_handlers()
                return
            del self._routes[topic_filter]
            self._index_handlers()
            match = matching_filter(topic_filter)
            last = not any(matching_filter(f) == match for f in self._routes)
        if last:
            self._client.message_callback_remove(match)
        if self._connected.is_set():
            self._client.unsubscribe(topic_filter)

    def _dispatcher(self, match: str) -> Callable[[paho.Client, object, paho.MQTTMessage], None]:
        """Calls the handlers of every route whose filter, `$share/{group}/` removed, is
        `match`: a shared and a plain subscription to one filter (a node moving between share
        groups) must not call a handler twice for one message."""

        def dispatch(_client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
            handlers = self._handlers.get(match, ())
            deliver(handlers, msg.topic, msg.payload, self.counters, self.log)

        return dispatch

    def _index_handlers(self) -> None:
        """Rebuild `_handlers` (matching filter -> its handlers, each once) from the routes;
        called with the lock held whenever they change. Replaced whole, so dispatch reads it
        without the lock, once per message."""
        index: dict[str, dict[Handler, None]] = {}
        for topic_filter, (handlers, _) in self._routes.items():
            index.setdefault(matching_filter(topic_filter), {}).update(dict.fromkeys(handlers))
        self._handlers = {match: tuple(handlers) for match, handlers in index.items()}

    # -- lifecycle --------------------------------------------------------------------
    def start(self, wait: float | None = 10.0, required: bool = False) -> bool:
        """Connect in the background (paho reconnects on its own). Wait up to `wait` seconds
        for the first connection; if `required`, raise BrokerError when it does not come, and
        ConfigError when the broker refuses the login. Over TLS, a certificate that fails
        verification (wrong CA, hostname mismatch) is a ConfigError at once: retrying cannot
        fix it."""
        try:
            if not (self.address.tls and self._connect_tls_now()):
                self._client.connect_async(**self._connect_args())
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot connect to {self.address}: {exc}") from None
        self._client.loop_start()
        if self._status_topic and self._status_interval_s > 0:
            threading.Thread(target=self._heartbeat, name="status", daemon=True).start()
        if wait is None:
            return False
        deadline = time.monotonic() + wait
        while not self._connected.wait(0.05):
            if required and self._refused is not None:
                self._client.loop_stop()
                who = f" as {self.connection.username}" if self.connection.username else ""
                raise ConfigError(
                    f"the broker {self.address} refused the connection{who}: {self._refused}"
                )
            if time.monotonic() >= deadline:
                break
        if self._connected.is_set():
            return True
        if required:
            self._client.loop_stop()
            if self._refused is not None:  # refused at the last moment
                raise ConfigError(f"the broker {self.address} refused the connection: "
                                  f"{self._refused}")  # fmt: skip
            raise BrokerError(f"no MQTT broker answered at {self.connection} within {wait:.0f} s")
        self.log.warning("broker %s not reachable yet; retrying in the background", self.connection)
        return False

    def _connect_tls_now(self) -> bool:
        """Open the TLS connection in this thread, so that a certificate the broker or this
        client rejects is reported here, once, instead of retried forever in paho's thread.
        False when no broker is reachable yet (connect in the background then)."""
        for index in range(len(self.addresses)):
            self._broker_index = index
            if self._connect_tls_to_current():
                return True
        self._broker_index = 0
        return False

    def _connect_tls_to_current(self) -> bool:
        try:
            self._client.connect(**self._connect_args())
        except ssl.SSLCertVerificationError as exc:
            raise ConfigError(
                f"the broker {self.address} failed TLS verification: {exc.verify_message}"
                f" (--ca {self.connection.ca or '(system CAs)'})"
            ) from None
        except ssl.SSLError as exc:
            raise ConfigError(
                f"the broker {self.address} refused the connection: {_tls_failure(exc)}"
            ) from None
        except OSError:
            return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the offline status (if any), then disconnect cleanly."""
        self._stopping.set()
        if self._status_topic and self._connected.is_set():
            offline = encode(self._stamped(self._status or OFFLINE_STATUS, state="offline"))
            for topic in filter(None, (self._mirror_topic, self._status_topic)):
                info = self._client.publish(topic, offline, self._qos(1), True)
            # If the connection drops meanwhile, the broker sends the Will instead.
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def shared_subscriptions(self) -> bool:
        """Whether the broker this client is connected to takes shared subscriptions."""
        return self._shared_available

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def connection_epoch(self) -> int:
        """How many connections this client has made: it changes with every reconnect, so a
        caller can tell whether the connection it decided on is the one it publishes on."""
        return self._epoch

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # -- publishing -------------------------------------------------------------------
    def publish(
        self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False
    ) -> paho.MQTTMessageInfo:
        """Publish; frames and tokens carry their message expiry (MQTT 5). A QoS 1/2 publish
        the broker refuses (MQTT 5: not authorised, quota...) is logged and counted as
        `publishes_refused` when its ack comes back."""
        client, qos = self._client, self._qos(qos)
        expiry = _EXPIRY.get(kind_of(topic) or "") if self.mqtt_version == "5" else None
        info = client.publish(topic, payload, qos, retain, properties=expiry)
        if qos > 0 and info.rc == paho.MQTT_ERR_SUCCESS:
            with self._acks_lock:
                if len(self._pending_publishes) > 10_000:  # acks lost with a connection
                    self._pending_publishes.clear()
                self._pending_publishes[info.mid] = topic
        if info.rc == paho.MQTT_ERR_SUCCESS:
            self.counters["messages_out"] += 1
        else:
            self.counters["publish_failed"] += 1
        return info

    def subscribed(self, topic_filter: str) -> bool:
        """Whether the broker granted the subscription to `topic_filter` on this connection:
        only then does the absence of a retained message mean the broker has none."""
        return self._connected.is_set() and topic_filter in self._granted

    def publish_now(
        self, topic: str, payload: bytes | str, *, retain: bool = False, epoch: int | None = None
    ) -> bool:
        """Publish at QoS 0 on the current connection, or not at all: False when this client
        is not connected, or has reconnected since `epoch` (connection_epoch when the caller
        decided). Nothing is queued for a later connection, so what was decided before a
        disconnect is never published after it."""
        with self._epoch_lock:
            if not self._connected.is_set() or (epoch is not None and epoch != self._epoch):
                return False
            info = self._client.publish(topic, payload, 0, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.counters["publish_failed"] += 1
            return False
        self.counters["messages_out"] += 1
        return True

    def publish_and_wait(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
        timeout: float = PUBLISH_TIMEOUT_S,
    ) -> None:  # fmt: skip
        info = self.publish(topic, payload, qos, retain)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise BrokerError(f"publish to {topic} failed: {exc}") from None
        if not info.is_published():
            raise BrokerError(f"publish to {topic} not acknowledged within {timeout:.0f} s")
        with self._acks_lock:
            refused = self._refused_publishes.pop(info.mid, None)
        if refused is not None:
            who = f" for {self.connection.username}" if self.connection.username else ""
            raise BrokerError(f"the broker refused the publish to {topic}{who}: {refused}")

    def set_status(self, status: StatusMsg) -> None:
        """Publish a retained status now, after every reconnect, and every status interval
        (with fresh counters, so a dashboard sees dropped payloads without reading logs)."""
        if not self._status_topic:
            raise ValueError("this client has no status topic")
        self._status = status
        self._publish_status()

    def _stamped(self, status: StatusMsg, **update: object) -> StatusMsg:
        with self._status_lock:
            self._status_seq += 1
            session, seq = self._session or None, self._status_seq
        return status.model_copy(
            update={"ts": time.time(), "counters": dict(self.counters), "session": session,
                    "seq": seq, **update}
        )  # fmt: skip

    def mirror_status(self, topic: str | None) -> None:
        """Also publish the status on `topic` (None: stop), e.g. the serving aggregator's
        shared status topic while this instance is the one serving. The topic left behind
        gets an offline status: whoever mirrors there next overwrites it."""
        previous, self._mirror_topic = self._mirror_topic, topic
        if previous and previous != topic and self._connected.is_set():
            offline = self._stamped(self._status or OFFLINE_STATUS, state="offline")
            self._client.publish(previous, encode(offline), qos=self._qos(1), retain=True)
        self._publish_status()

    def _publish_status(self) -> None:
        if self._status_topic and self._status is not None and self._connected.is_set():
            payload = encode(self._stamped(self._status))
            for topic in filter(None, (self._status_topic, self._mirror_topic)):
                self._client.publish(topic, payload, qos=self._qos(1), retain=True)

    def _heartbeat(self) -> None:
        while not self._stopping.wait(self._status_interval_s):
            self._publish_status()

    # -- paho callbacks -----------------------------------------------------------------
    def _on_connect(self, client: paho.Client, _userdata, _flags, reason_code, props) -> None:
        if reason_code.is_failure:
            wrong_version = reason_code.value in _UNSUPPORTED_VERSION
            if wrong_version and self.mqtt_version == "5":
                if self._may_fall_back():
                    self._start_fall_back()
                    return
                reason = f"{reason_code}: the broker does not speak MQTT 5 (--mqtt-version 3.1.1)"
            else:
                reason = _REFUSALS.get(reason_code.value, str(reason_code))
            if reason != self._refused:  # paho retries: say it once
                self.log.error("broker %s refused the connection: %s", self.address, reason)
            self._refused = reason
            return
        self.counters["connects"] += 1
        self._ever_connected = True
        client.on_log = None
        self._socket_error = None
        with self._epoch_lock:
            self._epoch += 1
        # MQTT 5's CONNACK says whether the broker takes `$share/...` (absent: it does). Over
        # 3.1.1 nothing says so, and a broker without them (amqtt, NATS) may grant the
        # subscription and deliver nothing: shared subscriptions are used over MQTT 5 only.
        self._shared_available = self.mqtt_version == "5" and bool(
            getattr(props, "SharedSubscriptionAvailable", 1)
        )
        if self._last_connected is not None and self._last_connected != self.address:
            self.counters["broker_failovers"] += 1
            self.log.warning(
                "failed over from broker %s to %s [broker_failovers=%d]",
                self._last_connected, self.address, self.counters["broker_failovers"],
            )  # fmt: skip
        self._last_connected = self.address
        self._subscribe_retries.clear()
        self._granted = set()
        with self._lock:
            routes = list(self._routes.items())
        self._subscribe_all(client, [(topic_filter, qos) for topic_filter, (_, qos) in routes])
        self._connected.set()
        self._publish_status()
        self.log.info("connected to %s as %s", self.address, self.client_id)

    def _subscribe(self, client: paho.Client, topic_filter: str, qos: int) -> None:
        self._subscribe_all(client, [(topic_filter, qos)])

    def _subscribe_all(self, client: paho.Client, filters: list[tuple[str, int]]) -> None:
        """Subscribe to every (filter, QoS) in one SUBSCRIBE. A broker may do per SUBSCRIBE
        what takes time: NATS looks up the filters' retained messages in JetStream with one
        request per SUBSCRIBE, and while JetStream elects leaders after losing a node each
        request waits out its timeout, holding this client's packets behind it."""
        if not filters:
            return
        _rc, mid = client.subscribe([(f, self._qos(qos)) for f, qos in filters])
        if mid is not None:
            with self._acks_lock:
                self._pending_subscribes[mid] = [f for f, _ in filters]

    def _on_subscribe(
        self, _client, _userdata, mid: int, reason_codes: list[ReasonCode], _props
    ) -> None:
        """A refused subscription (the ACL) would otherwise leave a service `ready` that never
        receives a message: say so once per subscribe, and count it."""
        with self._acks_lock:
            filters = self._pending_subscribes.pop(mid, ["?"])
        if not reason_codes:
            return
        if len(reason_codes) != len(filters):  # one code for all (not what MQTT says)
            reason_codes = reason_codes[:1] * len(filters)
        for topic_filter, reason in zip(filters, reason_codes, strict=True):
            if not reason.is_failure:
                self._subscribe_retries.pop(topic_filter, None)
                self._granted = self._granted | {topic_filter}
            else:
                self.counters["subscriptions_refused"] += 1
                who = f" as {self.connection.username}" if self.connection.username else ""
                retry = self._retry_later(topic_filter)
                self.log.error(
                    "the broker refused the subscription to %s%s: %s; %s "
                    "[subscriptions_refused=%d]",
                    topic_filter, who, reason,
                    f"trying again in {SUBSCRIBE_RETRY_S:g} s" if retry
                    else "nothing will arrive on it (check the ACL)",
                    self.counters["subscriptions_refused"],
                )  # fmt: skip

    def _retry_later(self, topic_filter: str) -> bool:
        """Subscribe to topic_filter again in SUBSCRIBE_RETRY_S, if this client has several
        brokers and retries left; False if not."""
        if len(self.addresses) == 1 or self._subscribe_retries[topic_filter] >= SUBSCRIBE_RETRIES:
            return False
        self._subscribe_retries[topic_filter] += 1
        timer = threading.Timer(SUBSCRIBE_RETRY_S, self._resubscribe, args=(topic_filter,))
        timer.daemon = True
        timer.start()
        return True

    def _resubscribe(self, topic_filter: str) -> None:
        with self._lock:
            route = self._routes.get(topic_filter)
        # Not connected: the next connect subscribes to every route anyway.
        if route is not None and self._connected.is_set() and not self._stopping.is_set():
            self._subscribe(self._client, topic_filter, route[1])

    def _on_publish(self, _client, _userdata, mid: int, reason: ReasonCode, _props) -> None:
        with self._acks_lock:
            topic = self._pending_publishes.pop(mid, None)
            if not reason.is_failure:
                return
            self._refused_publishes[mid] = str(reason)
            if len(self._refused_publishes) > 1000:
                self._refused_publishes.pop(next(iter(self._refused_publishes)))
        self.counters["publishes_refused"] += 1
        who = f" as {self.connection.username}" if self.connection.username else ""
        self.log.error(
            "the broker refused the publish to %s%s: %s [publishes_refused=%d]",
            topic or f"(message {mid})", who, reason, self.counters["publishes_refused"],
        )  # fmt: skip

    def _fall_back_to_311(self) -> None:
        """The broker does not speak MQTT 5: go on with a 3.1.1 client (--mqtt-version auto)."""
        old = self._client
        old.loop_stop()
        old.disconnect()
        self._client = self._new_paho(MQTTProtocolVersion.MQTTv311)
        self.log.info("the broker %s does not speak MQTT 5; using 3.1.1", self.address)
        try:
            self._client.connect_async(**self._connect_args())
        except (OSError, ValueError) as exc:
            self._refused = f"cannot reconnect with MQTT 3.1.1: {exc}"
            return
        self._client.loop_start()

    def _on_socket_open(self, client: paho.Client, userdata: object, sock: object) -> None:
        self._socket_opened = True
        _disable_nagle(client, userdata, sock)
        if not self._ever_connected and self._may_fall_back():
            # Some 3.1.1-only brokers (amqtt) neither answer nor close on an MQTT 5 CONNECT.
            timer = threading.Timer(CONNACK_WAIT_S, self._no_connack)
            timer.daemon = True
            timer.start()

    def _no_connack(self) -> None:
        if not self._ever_connected and self._refused is None and self._may_fall_back():
            self._start_fall_back()

    def _may_fall_back(self) -> bool:
        return self.connection.mqtt_version == "auto" and self.mqtt_version == "5"

    def _start_fall_back(self) -> None:
        with self._acks_lock:
            if self._falling_back:
                return
            self._falling_back = True
        # paho's loop thread cannot stop itself: switch clients from another thread.
        threading.Thread(target=self._fall_back_to_311, daemon=True).start()

    def _on_connect_fail(self, client: paho.Client, _userdata: object) -> None:
        """A connect attempt failed (refused, timed out): with several brokers, aim paho's
        next attempt at the next one. paho itself retries one host only; a dropped connection
        is retried on the same broker first, so a broker restart keeps its clients."""
        if len(self.addresses) == 1 or self._stopping.is_set():
            return
        failed = self.address
        self._broker_index = (self._broker_index + 1) % len(self.addresses)
        self.log.info("broker %s unreachable; trying %s next", failed, self.address)
        try:
            # connect_async only records where to connect; paho's loop makes the attempt.
            client.connect_async(**self._connect_args())
        except (OSError, ValueError) as exc:
            self.log.error("cannot aim at broker %s: %s", self.address, exc)

    def _on_paho_log(self, _client: paho.Client, _userdata: object, level: int, text: str) -> None:
        """Before the first connection: keep why the socket failed (paho only logs it), so
        that a TLS alert (the broker wants a client certificate) is named, not taken for a
        broker that does not speak MQTT 5."""
        if level == paho.MQTT_LOG_ERR and text.startswith(_RECV_FAILED):
            self._socket_error = text.removeprefix(_RECV_FAILED)

    def _refusal_from_socket(self) -> str | None:
        """A refusal told by the socket's TLS error before any CONNACK: an alert (the broker
        wants a client certificate, or refused this one), or a TLS connection cut without a
        TLS close (what mosquitto does, too, when it refuses a certificate or lacks one). A
        broker that merely does not speak MQTT 5 closes cleanly or answers. None for
        anything else."""
        error = self._socket_error
        if error is None or not self.address.tls or "_ssl.c" not in error:
            return None
        if "EOF occurred" in error:  # cut without a TLS close: the TLS layer refused
            if self.connection.cert is not None:
                return (
                    "TLS handshake failed: the broker cut the TLS connection before "
                    "answering (does it accept this client's certificate, --cert?)"
                )
            return (
                "certificate required: the broker closed the TLS connection, as one that "
                "requires a client certificate does without one (--cert, --key)"
            )
        return _tls_failure_text(error)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        if not self._ever_connected and self._refused is None:
            refusal = self._refusal_from_socket()
            if refusal is not None:
                self._refused = refusal
                self.log.error("broker %s refused the connection: %s", self.address, refusal)
        if not self._ever_connected and self._refused is not None:
            # Refused (the login, a certificate): another protocol version cannot fix it.
            with self._epoch_lock:
                self._connected.clear()
            return
        if self._socket_opened and not self._ever_connected and self._may_fall_back():
            # Other 3.1.1-only brokers close the connection on an MQTT 5 CONNECT.
            self._start_fall_back()
            return
        was_connected = self._connected.is_set()
        with self._epoch_lock:
            self._connected.clear()
        if was_connected and reason_code != 0:
            self.counters["disconnects"] += 1
            self.log.warning("lost broker %s (%s); reconnecting", self.address, reason_code)
