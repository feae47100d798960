"""`edvit broker`: run a local MQTT broker in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from edvit.errors import BrokerError, ConfigError

from .local import LocalBroker, mosquitto_path, port_is_free

log = logging.getLogger(__name__)

# The port every edvit service connects to by default (edvit.mqtt.DEFAULT_BROKER).
DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
KINDS = ("auto", "mosquitto", "embedded")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `edvit broker` options to a (sub)parser."""
    parser.add_argument(
        "--port", type=int,
        help=f"TCP port (default {DEFAULT_PORT}, with --secure {DEFAULT_TLS_PORT})",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="auto",
        help="mosquitto, embedded (amqtt), or auto: mosquitto when installed (default)",
    )
    parser.add_argument(
        "--secure", metavar="DIR",
        help="run mosquitto with DIR/broker/mosquitto.conf from `edvit secure init`: a TLS "
        "listener on --port, logins and the ACL, no plain listener",
    )  # fmt: skip


def check_arguments(host: str, port: int) -> None:
    """ConfigError with a one-line message for a port the broker cannot use."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is out of range 1-65535")
    if not port_is_free(host, port):
        raise ConfigError(f"{host}:{port} is already in use (another broker?); try another --port")


def run(args: argparse.Namespace) -> int:
    """Start the broker, print one line, block until SIGINT/SIGTERM, stop it; return 0."""
    directory = getattr(args, "secure", None)
    secure = secure_config(directory, args.kind) if directory else None
    port = args.port if args.port is not None else DEFAULT_TLS_PORT if secure else DEFAULT_PORT
    check_arguments(args.host, port)
    stop = threading.Event()
    restore = _install_stop_handlers(stop)
    died = False
    try:
        with LocalBroker(
            port=port, host=args.host, kind="mosquitto" if secure else args.kind,
            secure_config=secure,
        ) as broker:  # fmt: skip
            print(f"edvit broker ({broker.kind}) listening on {broker.url}", flush=True)
            died = not _wait(stop, broker)
    except KeyboardInterrupt:
        pass
    except BrokerError as exc:
        # The port may have been taken between the check and the start.
        raise ConfigError(str(exc).splitlines()[0]) from None
    finally:
        restore()
    log.info("broker stopped")
    return 1 if died else 0


def secure_config(directory: str, kind: str) -> Path:
    """DIR/broker/mosquitto.conf, or ConfigError saying why it cannot be run."""
    if kind == "embedded":
        raise ConfigError(
            "--secure needs mosquitto: the embedded amqtt broker has no TLS listener, "
            "password file or ACL here; use --kind mosquitto"
        )
    if mosquitto_path() is None:
        raise ConfigError("--secure needs mosquitto, which is not installed")
    config = Path(directory) / "broker" / "mosquitto.conf"
    if not config.is_file():
        raise ConfigError(f"--secure {directory}: no {config}; run `edvit secure init` first")
    return config


def _wait(stop: threading.Event, broker: LocalBroker) -> bool:
    """Block until asked to stop (True), or the broker dies on its own (False, logged)."""
    while not stop.wait(0.5):
        if not broker.running:
            log.error("broker exited unexpectedly:\n%s", broker.log_tail())
            return False
    return True


def _install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
    """Route SIGINT and SIGTERM to `stop`; return a function that restores the old handlers.

    Signal handlers can only be set from the main thread; elsewhere (a test calling run() in a
    thread) the caller stops the broker by other means and nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
