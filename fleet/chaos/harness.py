"""What every chaos scenario runs on: a fleet of three nodes, aggregators and cameras on a
local broker, and an observer that records everything the fleet says with this process's
receive time, on one clock."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edvit.broker.local import LocalBroker
from edvit.bundle import Bundle
from edvit.errors import BadPayload
from edvit.fleet.boards.proxy import CuttableProxy
from edvit.fleet.ops.deploy import deploy
from edvit.fleet.ops.local import LocalFleet
from edvit.lease import LeaseMsg
from edvit.mqtt import MqttClient, unique_client_id
from edvit.schemas import PlanMsg, PredictionMsg, StatusMsg, decode
from edvit.topics import Topics

NODES = ("node-0", "node-1", "node-2")
VICTIM = "node-1"
CUT_NODE = "node-2"
# After its camera exits, a scenario waits this long without a new answer before it counts
# the frames still unanswered as lost (an answer is due within the aggregator's 250 ms cap).
ANSWERS_QUIET_S = 3.0


@dataclass
class Observer:
    """Everything the fleet says, with this process's receive time."""

    topics: Topics
    predictions: list[tuple[float, PredictionMsg]] = field(default_factory=list)
    statuses: list[tuple[float, str, StatusMsg]] = field(default_factory=list)
    plans: list[tuple[float, PlanMsg]] = field(default_factory=list)
    leases: list[tuple[float, str]] = field(default_factory=list)
    # Each aggregator instance's newest status (its counters include its planner's).
    aggregators: dict[str, StatusMsg] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, client: MqttClient) -> None:
        t = self.topics
        client.route(t.all_predictions(), self._on_prediction, qos=1)
        client.route(t.all_node_statuses(), self._on_status, qos=1)
        client.route(t.plan(), self._on_plan, qos=1)
        client.route(t.aggregator_lease(), self._on_lease, qos=1)
        client.route(t.aggregator_instance_status("+"), self._on_aggregator, qos=1)

    def _on_aggregator(self, topic: str, payload: bytes) -> None:
        s = decode(StatusMsg, payload)
        if s is not None:
            with self.lock:
                self.aggregators[self.topics.parts(topic)[1]] = s

    def _on_prediction(self, _topic: str, payload: bytes) -> None:
        p = decode(PredictionMsg, payload)
        if p is not None:
            with self.lock:
                self.predictions.append((time.time(), p))

    def _on_status(self, topic: str, payload: bytes) -> None:
        s = decode(StatusMsg, payload)
        if s is not None:
            with self.lock:
                self.statuses.append((time.time(), self.topics.parts(topic)[1], s))

    def _on_plan(self, _topic: str, payload: bytes) -> None:
        p = decode(PlanMsg, payload)
        if p is not None:
            with self.lock:
                self.plans.append((time.time(), p))

    def _on_lease(self, _topic: str, payload: bytes) -> None:
        if payload:
            try:
                holder = LeaseMsg.model_validate_json(payload).holder
            except ValueError:
                raise BadPayload("not a lease") from None
            with self.lock:
                if not self.leases or self.leases[-1][1] != holder:
                    self.leases.append((time.time(), holder))

    def of_camera(self, camera: str) -> list[tuple[float, PredictionMsg]]:
        with self.lock:
            return [(t, p) for t, p in self.predictions if p.camera == camera]

    def first(self, items: list, predicate: Callable[..., bool]) -> float | None:
        with self.lock:
            return next((item[0] for item in items if predicate(*item)), None)


def p95_ms(values: list[float]) -> float | None:
    return round(float(np.percentile(values, 95)), 1) if values else None


def seconds_since(t: float | None, origin: float) -> float | None:
    return None if t is None else round(t - origin, 3)


def exactly_once(predictions: list[tuple[float, PredictionMsg]], count: int) -> dict[str, int]:
    seqs = [p.seq for _, p in predictions]
    return {
        "frames": count,
        "unanswered": len(set(range(count)) - set(seqs)),
        "answered_twice": len(seqs) - len(set(seqs)),
    }


class ChaosFleet:
    """Broker, nodes, aggregators and cameras for the scenarios, with an observer."""

    def __init__(
        self, bundle: Bundle, log_dir: Path, fps: float, hold_off_s: float,
        persistence: bool = False,
    ) -> None:  # fmt: skip
        """`persistence`: the broker keeps its retained messages across restarts."""
        self.bundle, self.fps, self.hold_off_s = bundle, fps, hold_off_s
        self.broker = LocalBroker(
            kind="mosquitto", log_path=log_dir / "broker.log",
            persistence_dir=log_dir / "broker-store" if persistence else None,
        )  # fmt: skip
        self.log_dir = log_dir
        self.topics = Topics(f"chaos{os.getpid()}")
        self.observer = Observer(self.topics)
        self.proxy: CuttableProxy | None = None

    def __enter__(self) -> ChaosFleet:
        self.broker.start()
        self.fleet = LocalFleet(self.broker.url, self.log_dir, self.topics)
        self.probe = MqttClient(unique_client_id("chaos"), self.broker.url)
        self.observer.attach(self.probe)
        self.probe.start(required=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proxy is not None:
            self.proxy.restore()
        self.fleet.stop()
        self.probe.stop()
        if self.proxy is not None:
            self.proxy.stop()
        self.broker.stop()

    def start(
        self, aggregators: tuple[str, ...] = ("agg-a",), proxied: tuple[str, ...] = ()
    ) -> PlanMsg:
        """Deploy, start the nodes and the aggregators (those in `proxied` behind a cuttable
        proxy); wait until the first aggregator and every node serve."""
        plan = deploy(self.bundle, self.broker.url, list(NODES), self.topics)
        if proxied:
            self.proxy = CuttableProxy(self.broker.host, self.broker.port).start()
        for node in NODES:
            via = self.proxy.url if self.proxy is not None and node in proxied else None
            self.fleet.spawn(node, "node", "--id", node, broker_url=via)
        for i, agg in enumerate(aggregators):
            via = self.proxy.url if self.proxy is not None and agg in proxied else None
            self.fleet.spawn(
                agg, "aggregator", "--id", agg, "--hold-off-s", str(self.hold_off_s),
                broker_url=via,
            )  # fmt: skip
            if i == 0:
                self.fleet.wait_ready(plan, timeout=60)
        return plan

    def camera(self, name: str, frames: int) -> None:
        self.fleet.spawn(
            name, "camera", "--id", name, "--source", f"dataset:{self.bundle.manifest.dataset}",
            "--loop", "--count", str(frames), "--fps", str(self.fps),
        )  # fmt: skip

    def kill(self, name: str, sig: int = signal.SIGKILL) -> float:
        process = self.fleet.processes[name]
        at = time.time()
        os.kill(process.pid, sig)
        if sig == signal.SIGKILL:
            process.wait(10)
            del self.fleet.processes[name]  # killed on purpose: not a failure of the fleet
        return at

    def wait_answers(self, camera: str, frames: int, timeout: float) -> None:
        """Until every frame of `camera` is answered, or the camera has exited and no answer
        came for ANSWERS_QUIET_S (frames lost in a fault are never answered), or `timeout`."""
        deadline = time.monotonic() + timeout
        answered, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            got = {p.seq for _, p in self.observer.of_camera(camera)}
            if len(got) >= frames:
                break
            if len(got) != answered:
                answered, last_change = len(got), time.monotonic()
            camera_done = self.fleet.processes[camera].poll() is not None
            if camera_done and time.monotonic() - last_change > ANSWERS_QUIET_S:
                break
            time.sleep(0.2)
        time.sleep(1.0)  # anything answered twice comes now
