"""What every long-running command shares: logging setup and stopping on a signal."""

from __future__ import annotations

import logging
import signal
import threading


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM (call from the main thread)."""
    stop = threading.Event()

    def handle(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def wait_for_stop_signal() -> None:
    stop = stop_on_signals()
    while not stop.wait(0.5):
        pass
