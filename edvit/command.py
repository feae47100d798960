"""What the command modules share: the options every command takes (broker, TLS, login,
protocol, prefix, logging), the ones several take (metrics, plan keys), argument types, and
turning those options into a connection, keys and a running service.

A command module exports `add_arguments(parser)` and `run(args) -> int`; edvit/cli.py lists
them. Errors a user can fix are ConfigError: the CLI prints them on one line and exits 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edvit.errors import ConfigError
from edvit.metrics import STATS_INTERVAL_S, Metrics
from edvit.mqtt import DEFAULT_BROKER, MAX_QOS, MQTT_VERSIONS, Connection
from edvit.service import ignore_stop_signals, wait_for_stop_signal
from edvit.topics import DEFAULT_PREFIX

if TYPE_CHECKING:
    from edvit.signing import SigningKey, TrustKey

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


class Service(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def frame_size(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT, like 224x224, as (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT, like 224x224, not {text!r}"
        ) from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"expected positive sides, not {text!r}")
    return width, height


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def shared_options() -> argparse.ArgumentParser:
    """A parent parser with the options every command takes: the broker, its TLS and login,
    the MQTT version, the topic prefix and the log level."""
    # A new parser per subcommand: argparse parents share their Action objects, so one
    # subcommand's set_defaults would otherwise change every subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--broker",
        default=os.environ.get("EDVIT_BROKER", DEFAULT_BROKER),
        help="MQTT broker address, mqtt://HOST:PORT or mqtts://HOST:PORT for TLS; several, "
        "comma-separated, for a cluster: the first that answers, the next when it is lost "
        "(env EDVIT_BROKER; default %(default)s)",
    )
    # The login and TLS files (README, "Security"); a password only ever comes from a file.
    for option, env, text in (
        ("--ca", "EDVIT_CA", "CA certificate the broker's certificate must chain to"),
        ("--cert", "EDVIT_CERT", "this client's certificate (with --key)"),
        ("--key", "EDVIT_KEY", "this client's private key"),
        ("--username", "EDVIT_USERNAME", "MQTT username (a node's or camera's is its id)"),
        ("--password-file", "EDVIT_PASSWORD_FILE", "file holding the MQTT password"),
    ):
        common.add_argument(option, default=os.environ.get(env) or None, help=f"{text} (env {env})")
    common.add_argument(
        "--mqtt-version", choices=MQTT_VERSIONS,
        default=os.environ.get("EDVIT_MQTT_VERSION") or "auto",
        help="MQTT protocol: 5, 3.1.1, or auto: 5 unless the broker refuses it "
        "(env EDVIT_MQTT_VERSION; default %(default)s)",
    )  # fmt: skip
    common.add_argument(
        "--max-qos", type=int, choices=MAX_QOS,
        default=int(os.environ.get("EDVIT_MAX_QOS") or 1),
        help="the highest QoS this client publishes and subscribes with: 0 on a NATS "
        "cluster, where QoS 1 needs JetStream, which stalls for seconds while it elects "
        "leaders after a node is lost (env EDVIT_MAX_QOS; default %(default)s)",
    )  # fmt: skip
    common.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help="topic prefix (default %(default)s)"
    )
    common.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    return common


def metrics_options(parser: argparse.ArgumentParser) -> None:
    """--metrics-port, --metrics-host and --stats-interval-s, for the services."""
    parser.add_argument(
        "--metrics-port", type=int, metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)",
    )  # fmt: skip
    parser.add_argument(
        "--metrics-host", default="0.0.0.0", help="address for --metrics-port (default %(default)s)"
    )
    parser.add_argument(
        "--stats-interval-s", type=non_negative_float, default=STATS_INTERVAL_S,
        help="publish counters and stage times on the retained {prefix}/stats/... topic this "
        "often (0: never; default %(default)s)",
    )  # fmt: skip


def trust_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-key", default=os.environ.get("EDVIT_TRUST_KEY") or None, metavar="FILE",
        help="serve only plans signed by this Ed25519 public key (PEM, `secure init`'s "
        "signing/plan.pub); others are refused and the old plan keeps serving "
        "(env EDVIT_TRUST_KEY)",
    )  # fmt: skip


def state_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir", default=os.environ.get("EDVIT_STATE_DIR") or None, metavar="DIR",
        help="folder for what the service keeps across restarts: with --trust-key, the "
        "newest signed plan it followed, so a replayed older plan is refused (env "
        "EDVIT_STATE_DIR; default $XDG_STATE_HOME/edvit/SERVICE-ID, else "
        "~/.local/state/edvit/SERVICE-ID)",
    )  # fmt: skip


def state_dir(args: argparse.Namespace, service: str, instance: str) -> Path:
    """The --state-dir given, or the service's default one (edvit/replay.py)."""
    from edvit.replay import check_state_dir, default_state_dir

    if args.state_dir:
        return check_state_dir(args.state_dir)
    return default_state_dir(service, instance)


def sign_key_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument(
        "--sign-key", default=os.environ.get("EDVIT_SIGN_KEY") or None, metavar="FILE",
        help=f"{text} (PEM, `secure init`'s signing/plan.key; env EDVIT_SIGN_KEY)",
    )  # fmt: skip


def connection(args: argparse.Namespace) -> Connection:
    """The broker address and login a command's --broker and friends describe."""
    settings = Connection(
        args.broker, ca=args.ca, cert=args.cert, key=args.key, username=args.username,
        password_file=args.password_file, mqtt_version=args.mqtt_version,
        max_qos=args.max_qos,
    )  # fmt: skip
    settings.check()
    return settings


def plan_keys(args: argparse.Namespace) -> tuple[TrustKey | None, SigningKey | None]:
    """The plan keys a command was given (README, "Security"): ConfigError names a bad file.
    Holding the sign key means trusting its public half."""
    from edvit.signing import SigningKey, TrustKey

    sign = SigningKey.load(args.sign_key) if getattr(args, "sign_key", None) else None
    trust = TrustKey.load(args.trust_key) if getattr(args, "trust_key", None) else None
    if sign is not None and trust is not None and sign.key_id != trust.key_id:
        raise ConfigError(
            f"--sign-key {args.sign_key} is not the pair of --trust-key {args.trust_key}: "
            "the plans it signs would be refused"
        )
    return trust or (sign.trust if sign is not None else None), sign


def serve_metrics(metrics: Metrics, args: argparse.Namespace) -> None:
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port, args.metrics_host)


def run_services(*services: Service) -> int:
    """Start the services in order, wait for a stop signal, stop them in reverse order."""
    for service in services:
        service.start()
    try:
        wait_for_stop_signal()
    finally:
        for service in reversed(services):
            service.stop()
        ignore_stop_signals()  # stopped: a late stop signal must not turn exit 0 into -2
    return 0
