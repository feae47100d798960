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


def ignore_stop_signals() -> None:
    """Call once a service has stopped: SIGINT and SIGTERM have nothing left to stop.

    While the interpreter shuts down, Python puts the default action back on the signals it
    handled (it leaves SIG_IGN alone), so a stop signal arriving then, such as a supervisor's
    SIGINT to a camera that has just sent its --count frames, would kill a process that was
    exiting 0 and make its exit code -2. Ignored, it exits 0.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def wait_for_stop_signal() -> None:
    stop = stop_on_signals()
    while not stop.wait(0.5):
        pass
