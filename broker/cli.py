"""`edvit broker`: run a local MQTT broker in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from edvit.errors import BrokerError, ConfigError

from .local import LocalBroker, port_is_free

log = logging.getLogger(__name__)

# The port every edvit service connects to by default (edvit.mqtt.DEFAULT_BROKER).
DEFAULT_PORT = 1883
KINDS = ("auto", "mosquitto", "embedded")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `edvit broker` options to a (sub)parser."""
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="TCP port (default %(default)s)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="auto",
        help="mosquitto, embedded (amqtt), or auto: mosquitto when installed (default)",
    )


def check_arguments(host: str, port: int) -> None:
    """ConfigError with a one-line message for a port the broker cannot use."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is out of range 1-65535")
    if not port_is_free(host, port):
        raise ConfigError(f"{host}:{port} is already in use (another broker?); try another --port")


def run(args: argparse.Namespace) -> int:
    """Start the broker, print one line, block until SIGINT/SIGTERM, stop it; return 0."""
    check_arguments(args.host, args.port)
    stop = threading.Event()
    restore = _install_stop_handlers(stop)
    died = False
    try:
        with LocalBroker(port=args.port, host=args.host, kind=args.kind) as broker:
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
