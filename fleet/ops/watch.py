"""`edvit watch`: print live predictions, for people and for scripts (--json)."""

from __future__ import annotations

import argparse
import logging
import queue
import threading

from edvit.command import connection, positive_int
from edvit.mqtt import Connection, MqttClient, unique_client_id
from edvit.schemas import STAGES, PlanMsg, PredictionMsg, decode
from edvit.service import stop_on_signals
from edvit.topics import Topics

log = logging.getLogger("edvit.fleet.ops.watch")


def format_timings(p: PredictionMsg) -> str:
    """`to_node 0.3 decode 0.1 queue 0.0 infer 0.6 ...` (ms, schemas.STAGES order)."""
    known = [s for s in STAGES if s in p.timings]
    return " ".join(f"{s} {p.timings[s]:.2f}" for s in known) or "(no timings)"


def format_prediction(
    p: PredictionMsg, timings: bool = False, classes: tuple[str, ...] = ()
) -> str:
    """One line per answer; a miss names the true class from `classes` (the plan's), or
    gives its index when the plan is not known."""
    truth = ""
    if p.true_label is not None and p.true_label == p.label:
        truth = "  ok "
    elif p.true_label is not None:
        known = 0 <= p.true_label < len(classes)
        truth = f"  MISS (true {classes[p.true_label] if known else p.true_label})"
    degraded = f"  degraded, missing {','.join(p.missing)}" if p.degraded else ""
    untrained = "  UNTRAINED (random weights)" if p.untrained else ""
    stages = f"\n    {format_timings(p)}" if timings else ""
    return (
        f"{p.camera} #{p.seq:<5d} {p.class_name:<14s} {p.score:5.3f}  "
        f"{p.latency_ms:7.1f} ms{truth}{degraded}{untrained}{stages}"
    )


class PredictionStream:
    """Subscribes to predictions and hands them out in arrival order."""

    def __init__(
        self, broker: str | Connection, camera: str = "+", topics: Topics | None = None
    ) -> None:
        self.topics = topics or Topics()
        self.queue: queue.Queue[PredictionMsg] = queue.Queue()
        self.client = MqttClient(unique_client_id("watch"), broker, logger=log)
        # The plans' class names, by plan id: what a true label (an index) is called. The
        # plan is subscribed first, so its retained message comes before any prediction.
        self.classes: dict[str, tuple[str, ...]] = {}
        self.client.route(self.topics.plan(), self._on_plan, qos=1)
        self.client.route(self.topics.predictions(camera), self._on_prediction, qos=1)

    def _on_prediction(self, _topic: str, payload: bytes) -> None:
        prediction = decode(PredictionMsg, payload)
        if prediction is not None:
            self.queue.put(prediction)

    def _on_plan(self, _topic: str, payload: bytes) -> None:
        plan = decode(PlanMsg, payload)  # None for a cleared plan
        if plan is not None:
            self.classes[plan.plan_id] = plan.classes

    def start(self) -> None:
        self.client.start(required=True)

    def stop(self) -> None:
        self.client.stop()


def watch(
    broker: str | Connection,
    *,
    camera: str = "+",
    count: int | None = None,
    as_json: bool = False,
    timings: bool = False,
    topics: Topics | None = None,
    stop: threading.Event | None = None,
) -> int:
    stop = stop or threading.Event()
    stream = PredictionStream(broker, camera, topics)
    stream.start()
    shown = 0
    try:
        while not stop.is_set() and (count is None or shown < count):
            try:
                prediction = stream.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            line = (
                prediction.model_dump_json(by_alias=True)
                if as_json
                else format_prediction(
                    prediction, timings, stream.classes.get(prediction.plan_id, ())
                )
            )
            print(line, flush=True)
            shown += 1
    finally:
        stream.stop()
    return shown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--camera", default="+", help="only this camera")
    parser.add_argument("--count", type=positive_int, help="exit after this many predictions")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--timings", action="store_true",
        help="under each prediction, where its milliseconds went (ms per stage)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    watch(
        connection(args), camera=args.camera, count=args.count, as_json=args.json,
        timings=args.timings, topics=Topics(args.prefix), stop=stop_on_signals(),
    )  # fmt: skip
    return 0
