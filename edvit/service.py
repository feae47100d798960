"""What every long-running command shares: logging setup and stopping on a signal."""

from __future__ import annotations

import logging
import signal
import threading
from collections import Counter
from collections.abc import Callable


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


class Worker:
    """A service's background loop: calls `step` until stopped, `interval_s` apart (0: back
    to back, for a step that blocks on its own). An exception in a step is counted under
    `{name}_errors` and logged with its traceback the first time of each kind (then every
    1000th), so a payload that keeps failing cannot flood the log; the loop goes on. A loop
    that dies anyway (BaseException) is restarted, counted under `{name}_restarts`."""

    LOG_EVERY = 1000

    def __init__(
        self,
        name: str,
        step: Callable[[], object],
        counters: Counter[str],
        log: logging.Logger,
        *,
        interval_s: float = 0.0,
    ) -> None:
        self.name, self.step, self.counters, self.log = name, step, counters, log
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self._kinds: Counter[str] = Counter()
        self._thread = self._new_thread()

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._wait():
                try:
                    self.step()
                except Exception as exc:
                    self._failed(exc)
        except BaseException as exc:  # the loop itself must come back
            if self.stopping.is_set():
                return
            self.counters[f"{self.name}_restarts"] += 1
            self.log.error("%s loop died (%s); restarting it", self.name, type(exc).__name__)
            self._thread = self._new_thread()
            self._thread.start()

    def _wait(self) -> bool:
        """True once stopping; waits `interval_s` first when there is one."""
        if self.interval_s:
            return self.stopping.wait(self.interval_s)
        return self.stopping.is_set()

    def _failed(self, exc: Exception) -> None:
        self.counters[f"{self.name}_errors"] += 1
        kind = type(exc).__name__
        self._kinds[kind] += 1
        seen = self._kinds[kind]
        if seen == 1 or seen % self.LOG_EVERY == 0:
            self.log.exception("%s failed (%s, %d times so far)", self.name, kind, seen)
