"""`edvit bench batching`: many simulated cameras against one node on a local broker.

For each configuration the node runs as its own process (so its RSS is its own) and
serves every sub-model of the bundle. A load generator publishes frames for K cameras at
a fixed rate per camera; a collector records each feature message. Reported per K:
frames served per second (frames whose features came out for every sub-model), p50/p95
latency (frame capture to the last feature message), mean batch size, node RSS.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from tempfile import mkdtemp

import cv2
import msgpack
import numpy as np

from edvit.broker.local import LocalBroker
from edvit.bundle import Bundle
from edvit.datasets import load_dataset
from edvit.deploy import deploy
from edvit.fleet import LocalFleet
from edvit.mqtt import MqttClient
from edvit.schemas import FrameMsg, encode
from edvit.topics import Topics

NODE_ID = "bench-node"
WARMUP_S = 2.0


@dataclass(frozen=True)
class BatchingConfig:
    name: str
    node_args: tuple[str, ...]


BATCHING_CONFIGS = (
    BatchingConfig("off", ("--max-batch", "1", "--max-wait-ms", "0")),
    BatchingConfig("on", ()),  # the node's defaults
)


@dataclass
class Result:
    config: str
    cameras: int
    offered_fps: float
    served_fps: float
    p50_ms: float
    p95_ms: float
    mean_batch: float
    node_cpu_ms_per_frame: float
    node_rss_mb: float


class _Collector:
    def __init__(self, submodels: int) -> None:
        self.submodels = submodels
        self.lock = threading.Lock()
        self.seen: dict[tuple[str, int], list[float]] = {}
        self.batches: list[int] = []
        self.done: dict[tuple[str, int], float] = {}

    def on_features(self, _topic: str, payload: bytes) -> None:
        now = time.time()
        # Only the fields needed, without validation: the collector must stay cheap so the
        # benchmark measures the node, not itself.
        msg = msgpack.unpackb(payload)
        key = (msg["camera"], msg["seq"])
        with self.lock:
            arrivals = self.seen.setdefault(key, [])
            arrivals.append(now)
            self.batches.append(msg["batch"])
            if len(arrivals) == self.submodels:
                self.done[key] = (now - msg["ts"]) * 1000.0


def _frames_payloads(dataset: str, count: int = 64) -> list[tuple[bytes, int]]:
    test = load_dataset(dataset, "test")
    out = []
    for image, label in zip(test.images[:count], test.labels[:count], strict=True):
        ok, png = cv2.imencode(".png", image if image.ndim == 2 else image[..., ::-1])
        assert ok
        out.append((png.tobytes(), int(label)))
    return out


def _generate(broker_url: str, prefix: str, cameras: int, fps: float,
              images: list[tuple[bytes, int]], stop: EventType) -> None:  # fmt: skip
    """Runs in its own process. Cameras are not synchronised: their frames are spread
    evenly over each period."""
    topics = Topics(prefix)
    client = MqttClient(f"bench-cams-{os.getpid()}", broker_url)
    client.start(required=True)
    try:
        _publish_frames(client, topics, cameras, fps, images, stop)
    finally:
        client.stop()


def _publish_frames(client: MqttClient, topics: Topics, cameras: int, fps: float,
                    images: list[tuple[bytes, int]], stop: EventType) -> None:  # fmt: skip
    step = 1.0 / (fps * cameras)
    next_at = time.monotonic()
    for tick in itertools.count():
        if stop.is_set():
            return
        cam, seq = tick % cameras, tick // cameras
        data, label = images[tick % len(images)]
        frame = FrameMsg(camera=f"cam{cam}", seq=seq, ts=time.time(), enc="png",
                         data=data, label=label)  # fmt: skip
        client.publish(topics.frame(f"cam{cam}"), encode(frame))
        next_at += step
        delay = next_at - time.monotonic()
        if delay > 0.0005:
            stop.wait(delay)
        elif delay < -0.1:
            next_at = time.monotonic()  # far behind: do not burst to catch up


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def run_one(broker: LocalBroker, bundle: Bundle, config: BatchingConfig, cameras: int,
            fps: float, seconds: float, images: list[tuple[bytes, int]],
            log_dir: Path) -> Result:  # fmt: skip
    topics = Topics(f"bench{cameras}{config.name}")
    plan = deploy(bundle, broker.url, nodes=[NODE_ID], topics=topics)
    collector = _Collector(len(plan.submodels))
    with LocalFleet(broker.url, log_dir / f"{config.name}-{cameras}", topics) as fleet:
        node = fleet.spawn(NODE_ID, "node", "--id", NODE_ID, *config.node_args)
        probe = MqttClient(f"bench-probe-{cameras}-{config.name}", broker.url)
        probe.route(topics.all_features(), collector.on_features)
        probe.start(required=True)
        stop = multiprocessing.Event()
        generator = multiprocessing.Process(
            target=_generate, args=(broker.url, topics.prefix, cameras, fps, images, stop)
        )
        try:
            fleet.wait_ready(plan, timeout=60, include_aggregator=False)  # no aggregator here
            generator.start()
            time.sleep(WARMUP_S)
            with collector.lock:
                start_count, started = len(collector.done), time.monotonic()
            cpu_before = _cpu_seconds(node.pid)
            time.sleep(seconds)
            with collector.lock:
                end_count, elapsed = len(collector.done), time.monotonic() - started
            node_cpu = _cpu_seconds(node.pid) - cpu_before
            with collector.lock:
                latencies = list(collector.done.values())[start_count:end_count]
                batches = collector.batches[len(collector.batches) // 4 :]
            rss = _rss_mb(node.pid)
        finally:
            stop.set()
            if generator.is_alive():
                generator.join(timeout=10)
            probe.stop()
    return Result(
        config=config.name,
        cameras=cameras,
        offered_fps=cameras * fps,
        served_fps=round((end_count - start_count) / elapsed, 1),
        p50_ms=round(float(np.percentile(latencies, 50)), 2) if latencies else float("nan"),
        p95_ms=round(float(np.percentile(latencies, 95)), 2) if latencies else float("nan"),
        mean_batch=round(statistics.fmean(batches), 2) if batches else float("nan"),
        node_cpu_ms_per_frame=round(1000.0 * node_cpu / max(1, end_count - start_count), 3),
        node_rss_mb=round(rss, 1),
    )


def format_results(results: list[Result]) -> str:
    lines = [
        "| batching | cameras | offered fps | served fps | p50 ms | p95 ms | mean batch "
        "| node CPU ms/frame | node RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.config} | {r.cameras} | {r.offered_fps:g} | {r.served_fps:g} | {r.p50_ms:g} "
            f"| {r.p95_ms:g} | {r.mean_batch:g} | {r.node_cpu_ms_per_frame:g} | {r.node_rss_mb:g} |"
        )
    return "\n".join(lines)


def bench_batching(bundle_dir: Path, cameras: list[int], fps: float, seconds: float,
                   json_out: Path | None = None) -> list[Result]:  # fmt: skip
    bundle = Bundle.load(bundle_dir)
    images = _frames_payloads(bundle.manifest.dataset)
    log_dir = Path(mkdtemp(prefix="edvit-bench-"))
    results = []
    with LocalBroker() as broker:
        for k in cameras:
            for config in BATCHING_CONFIGS:
                result = run_one(broker, bundle, config, k, fps, seconds, images, log_dir)
                print(json.dumps(asdict(result)), flush=True)
                results.append(result)
    print(format_results(results))
    if json_out:
        json_out.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return results
