"""A fleet of edvit services as local processes: what `edvit demo` and the integration
tests start, so both exercise the same real processes talking over a real broker."""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from edvit.errors import EdvitError
from edvit.mqtt import Connection, MqttClient, unique_client_id
from edvit.process import edvit_command, stop_processes
from edvit.schemas import PlanMsg, StatusMsg, decode
from edvit.topics import Topics

log = logging.getLogger("edvit.fleet")


class LocalFleet:
    """Starts `python -m edvit <service> ...` processes with their logs in `log_dir`."""

    def __init__(
        self, broker_url: str | Connection, log_dir: Path, topics: Topics | None = None
    ) -> None:
        """`broker_url` with a login (a Connection) is this process's own, for its probe;
        each spawned service gets its login through `spawn(env=...)`."""
        self.broker_url = broker_url
        self.log_dir = log_dir
        self.topics = topics or Topics()
        self.processes: dict[str, subprocess.Popen] = {}
        self.exit_codes: dict[str, int] = {}  # filled by stop()
        log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spawn(
        self, name: str, *args: str, broker_url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen:  # fmt: skip
        """Start `edvit ARGS` as `name`, on this fleet's broker (or `broker_url`, e.g. a
        proxy in front of it), with `env` added (e.g. EDVIT_USERNAME and the other login
        variables: the password stays in its file, off the command line)."""
        command = edvit_command(
            *args, "--broker", str(broker_url or self.broker_url), "--prefix", self.topics.prefix
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        with open(self.log_path(name), "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.processes[name] = process
        log.info("started %s (pid %d): %s", name, process.pid, " ".join(command[2:]))
        return process

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path(name).read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None and process.returncode != 0:
                raise EdvitError(
                    f"{name} exited with code {process.returncode}:\n{self.log_tail(name)}"
                )

    def wait_ready(
        self, plan: PlanMsg, timeout: float = 60.0, include_aggregator: bool = True,
        check: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        """Wait until every node in the plan (and the aggregator) report ready for this plan.
        `check` is called while waiting, to raise when a process started elsewhere (an
        emulated board's node) has died."""
        statuses: queue.Queue[tuple[str, StatusMsg]] = queue.Queue()

        def on_status(topic: str, payload: bytes) -> None:
            status = decode(StatusMsg, payload)
            if status is not None:
                statuses.put((topic, status))

        waiting = {self.topics.node_status(node) for node in plan.assignments}
        if include_aggregator:
            waiting.add(self.topics.aggregator_status())
        probe = MqttClient(unique_client_id("fleet-probe"), self.broker_url, logger=log)
        probe.route(self.topics.all_node_statuses(), on_status, qos=1)
        probe.route(self.topics.aggregator_status(), on_status, qos=1)
        probe.start(required=True)
        deadline = time.monotonic() + timeout
        try:
            while waiting:
                self.check_alive()
                if check is not None:
                    check()
                if time.monotonic() > deadline:
                    raise EdvitError(f"not ready after {timeout:.0f} s: {sorted(waiting)}")
                try:
                    topic, status = statuses.get(timeout=0.2)
                except queue.Empty:
                    continue
                if status.state == "ready" and status.plan_id == plan.plan_id:
                    waiting.discard(topic)
        finally:
            probe.stop()

    def stop(self, timeout: float = 10.0) -> dict[str, int]:
        """SIGINT to every process for a clean offline status, then escalate after `timeout`.

        Returns each process's exit code by name (0: a clean stop, -9: killed), also kept in
        `exit_codes`.
        """
        self.exit_codes = stop_processes(self.processes, grace_s=timeout, logger=log)
        return self.exit_codes
