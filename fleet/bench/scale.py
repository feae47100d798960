"""`edvit bench scale`: served frames per second of the whole pipeline (nodes, aggregator,
predictions) with R replicas of every node and S aggregator shards, under a camera load
that saturates one of each (README, "Scale-out").

Every process runs on this machine: replicas and shards share its cores with each other,
the broker and the load generator, so the figures show what scale-out costs and gains on
one box; on boards each replica has a CPU of its own.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from tempfile import mkdtemp

from edvit.broker.local import LocalBroker
from edvit.bundle import Bundle
from edvit.fleet.bench import WARMUP_S
from edvit.fleet.bench.common import (
    format_table,
    frame_samples,
    generate_load,
    load_test_split,
    percentile,
    write_json,
)
from edvit.fleet.ops.deploy import deploy
from edvit.fleet.ops.local import LocalFleet
from edvit.mqtt import MqttClient, unique_client_id
from edvit.schemas import PredictionMsg, decode
from edvit.topics import Topics


@dataclass(frozen=True)
class ScaleResult:
    replicas: int
    shards: int
    node_processes: int
    cameras: int
    offered_fps: float
    served_fps: float
    degraded_pct: float
    answered_twice: int
    p50_ms: float
    p95_ms: float


class _Predictions:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.degraded = 0
        self.seen: set[tuple[str, int, float]] = set()
        self.twice = 0

    def on_prediction(self, _topic: str, payload: bytes) -> None:
        msg = decode(PredictionMsg, payload)
        if msg is None:
            return
        key = (msg.camera, msg.seq, msg.ts)
        with self.lock:
            if key in self.seen:
                self.twice += 1
                return
            self.seen.add(key)
            self.latencies.append(msg.latency_ms)
            self.degraded += msg.degraded

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return len(self.latencies), self.degraded, self.twice


def run_one(broker: LocalBroker, bundle: Bundle, nodes: list[str], replicas: int, shards: int,
            cameras: int, fps: float, seconds: float, log_dir: Path) -> ScaleResult:  # fmt: skip
    topics = Topics(f"bench-scale-{replicas}r-{shards}s-{os.getpid()}")
    plan = deploy(bundle, broker.url, nodes=nodes, topics=topics, replicas=replicas)
    predictions = _Predictions()
    samples = frame_samples(load_test_split(bundle))
    with LocalFleet(broker.url, log_dir / topics.prefix, topics) as fleet:
        for node in plan.assignments:
            fleet.spawn(node, "node", "--id", node)
        for shard in range(shards):
            shard_args = ("--shard", f"{shard}/{shards}") if shards > 1 else ()
            fleet.spawn(f"aggregator-{shard}", "aggregator", "--no-planner", *shard_args)
        probe = MqttClient(unique_client_id("bench-scale"), broker.url)
        probe.route(topics.all_predictions(), predictions.on_prediction, qos=1)
        probe.start(required=True)
        stop = multiprocessing.get_context("fork").Event()
        generator = multiprocessing.get_context("fork").Process(
            target=generate_load, args=(broker.url, topics.prefix, cameras, fps, [samples], stop)
        )
        try:
            fleet.wait_ready(plan, timeout=120)
            generator.start()
            time.sleep(WARMUP_S)
            before = predictions.snapshot()
            started = time.monotonic()
            time.sleep(seconds)
            after = predictions.snapshot()
            elapsed = time.monotonic() - started
            with predictions.lock:
                latencies = predictions.latencies[before[0] : after[0]]
        finally:
            stop.set()
            if generator.is_alive():
                generator.join(timeout=10)
            probe.stop()
    served = after[0] - before[0]
    return ScaleResult(
        replicas=replicas,
        shards=shards,
        node_processes=len(plan.assignments),
        cameras=cameras,
        offered_fps=cameras * fps,
        served_fps=round(served / elapsed, 1),
        degraded_pct=round(100.0 * (after[1] - before[1]) / max(1, served), 1),
        answered_twice=after[2],
        p50_ms=percentile(latencies, 50),
        p95_ms=percentile(latencies, 95),
    )


COLUMNS = ("replicas", "shards", "node_processes", "cameras", "offered_fps", "served_fps",
           "degraded_pct", "answered_twice", "p50_ms", "p95_ms")  # fmt: skip


def bench_scale(bundle_dir: Path, nodes: list[str], replicas: list[int], shards: list[int],
                cameras: int, fps: float, seconds: float,
                json_out: Path | None = None) -> list[ScaleResult]:  # fmt: skip
    bundle = Bundle.load(bundle_dir)
    log_dir = Path(mkdtemp(prefix="edvit-bench-scale-"))
    results = []
    with LocalBroker(kind="mosquitto") as broker:
        for shard_count in shards:
            for replica_count in replicas:
                result = run_one(broker, bundle, nodes, replica_count, shard_count, cameras,
                                 fps, seconds, log_dir)  # fmt: skip
                print(json.dumps(asdict(result)), flush=True)
                results.append(result)
    print(format_table([asdict(r) for r in results], COLUMNS))
    machine = f"{os.cpu_count()} CPUs; every process on this machine; logs in {log_dir}"
    print(machine)
    write_json(
        json_out,
        {"machine": machine, "nodes": nodes, "cameras": cameras, "fps_per_camera": fps,
         "seconds": seconds, "results": [asdict(r) for r in results]},
    )  # fmt: skip
    return results
