"""`edvit bench e2e`: the pipeline's latency against its floor, split and monolithic.

The floor is measured here, from first principles on this machine: each model of the bundle
at batch 1 on one ONNX Runtime thread, the broker's one-way latency between two clients on
the same local mosquitto, and a frame's decode as the node does it. The split pipeline's
floor is camera -> node hop + decode + slowest sub-model + node -> aggregator hop + fusion;
the monolithic one's is hop + decode + original + hop.

Then simulated cameras (at several counts, a fixed rate each) go through two real fleets on
that broker, each a process per service: the split fleet (one node per sub-model and the
aggregator, as `edvit demo` runs it) and the monolithic baseline (the original served whole
by one node, through the same aggregator, from a bundle made in a temp folder by
edvit.models.monolithic, which edvit/cli.py passes in: onnx is imported in models/ only). Per
run: frames sent and answered, p50/p95 latency (capture to prediction), the floor, and the
median of every stage of the predictions' `timings` next to that stage's part of the floor.
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edvit.broker.local import LocalBroker
from edvit.bundle import Bundle
from edvit.datasets import load_dataset
from edvit.errors import BrokerError, ConfigError, EdvitError
from edvit.fleet.bench.common import (
    ONNX_MISSING,
    MakeMonolithic,
    Sample,
    collect_predictions,
    frame_samples,
    generate_load,
    percentile,
    warm_up,
    write_json,
)
from edvit.fleet.ops.deploy import deploy
from edvit.fleet.ops.local import LocalFleet
from edvit.fleet.ops.watch import PredictionStream
from edvit.inference import measure_latency_ms
from edvit.mqtt import MqttClient, unique_client_id
from edvit.preprocess import frame_to_model_input
from edvit.schemas import STAGES, FrameMsg, PredictionMsg, decode, encode
from edvit.topics import Topics

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

PIPELINES = ("split", "monolithic")
HOP_MESSAGES = 300
HOP_WARMUP = 20  # messages before the subscription surely holds and the path is warm
HOP_SPACING_S = 0.002  # apart, so no message queues behind the one before
DECODE_REPEATS = 5  # passes over the sample frames
MODEL_RUNS = 200
IDLE_RUNS = 30  # runs of each part of the floor at a camera's rate


@dataclass(frozen=True)
class Floor:
    """ms, measured on this machine."""

    hop_ms: float  # one broker hop, publish -> receive
    decode_ms: float  # a frame message -> the model's input tensor
    submodel_ms: dict[str, float]  # each sub-model at batch 1, one thread
    fusion_ms: float
    original_ms: float

    def stages(self, pipeline: str) -> dict[str, float]:
        """Each stage's part of the floor (schemas.STAGES order); queue, wait and other: 0.
        The monolithic fleet's fusion is the identity, no work the pipeline needs: 0."""
        split = pipeline == "split"
        parts = {
            "to_node": self.hop_ms,
            "decode": self.decode_ms,
            "infer": max(self.submodel_ms.values()) if split else self.original_ms,
            "to_aggregator": self.hop_ms,
            "fusion": self.fusion_ms if split else 0.0,
        }
        return {stage: round(parts.get(stage, 0.0), 3) for stage in STAGES}

    def total(self, pipeline: str) -> float:
        return round(sum(self.stages(pipeline).values()), 3)


@dataclass
class RunResult:
    pipeline: str
    cameras: int
    fps: float
    seconds: float
    sent: int
    answered: int  # distinct frames with a prediction
    degraded: int
    p50_ms: float
    p95_ms: float
    floor_ms: float
    over_floor_ms: float  # p50 - floor
    idle_floor_ms: float  # the floor with each part after 1/fps of idle, as the fleet meets it
    over_idle_floor_ms: float
    # stage -> {"median": ms, "floor": ms, "over": median - floor}
    stages: dict[str, dict[str, float]] = field(default_factory=dict)


def check_arguments(cameras: list[int], fps: float, seconds: float) -> None:
    if not cameras:
        raise ConfigError("--cameras needs at least one camera count")
    for count in cameras:
        if count < 1:
            raise ConfigError(f"--cameras: every count must be a positive integer, got {count}")
    if not fps > 0:
        raise ConfigError(f"--fps must be positive, got {fps:g}")
    if not seconds > 0:
        raise ConfigError(f"--seconds must be positive, got {seconds:g}")


# -- the floor ------------------------------------------------------------------------------


def measure_hop_ms(
    broker_url: str, messages: int = HOP_MESSAGES, spacing_s: float = HOP_SPACING_S,
    padding: int = 0,
) -> float:  # fmt: skip
    """Median one-way latency of a small message between two clients on this broker; the
    sender stamps time.time() in the payload (one machine, one clock). ``padding`` bytes
    make the message as large as, say, a frame."""
    topic = f"edvit-bench-e2e/hop/{unique_client_id('hop')}"
    delays: list[float] = []
    done = threading.Event()

    def on_message(_topic: str, payload: bytes) -> None:
        now = time.time()
        index, sent = payload.split(b" ")[:2]
        if int(index) >= HOP_WARMUP:
            delays.append((now - float(sent)) * 1000.0)
            if len(delays) >= messages:
                done.set()

    pad = b"x" * padding
    receiver = MqttClient(unique_client_id("e2e-hop-in"), broker_url)
    receiver.route(topic, on_message)
    sender = MqttClient(unique_client_id("e2e-hop-out"), broker_url)
    receiver.start(required=True)
    sender.start(required=True)
    deadline = time.monotonic() + 30.0
    try:
        index = 0
        while not done.is_set() and time.monotonic() < deadline:
            sender.publish(topic, f"{index} {time.time()!r} ".encode() + pad)
            index += 1
            time.sleep(spacing_s)
        done.wait(timeout=2.0)
    finally:
        sender.stop()
        receiver.stop()
    if not delays:
        raise BrokerError(f"no message came back through the broker at {broker_url}")
    return statistics.median(delays)


def frame_payloads(samples: list[Sample]) -> list[bytes]:
    return [
        encode(FrameMsg(camera="cam0", seq=i, ts=time.time(), enc="png", data=data, label=label))
        for i, (_, data, label) in enumerate(samples)
    ]


def measure_decode_ms(
    bundle: Bundle, payloads: list[bytes], repeats: int = DECODE_REPEATS, idle_s: float = 0.0
) -> float:
    """Median ms from a frame message's bytes to the model's input, as the node's decode
    stage counts it (edge_node/node.py `_on_frame`: the message, the image, the tensor)."""
    pp = bundle.manifest.preprocessing
    times = []
    for _ in range(repeats):
        for payload in payloads:
            if idle_s:
                time.sleep(idle_s)
            start = time.perf_counter()
            message = decode(FrameMsg, payload)
            assert message is not None
            frame_to_model_input(message, pp)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def measure_floor(
    bundle: Bundle, broker_url: str, payloads: list[bytes], model_runs: int = MODEL_RUNS,
    idle_s: float = 0.0,
) -> Floor:  # fmt: skip
    """Back to back (idle_s 0), or each part after `idle_s` of idle, as a node meets it when
    one camera's frames come 1/fps apart (fewer runs then: they take idle_s each)."""
    m = bundle.manifest
    if idle_s:
        model_runs = IDLE_RUNS

    def model_ms(relative: str) -> float:
        ms = measure_latency_ms(bundle.path(relative), runs=model_runs, idle_s=idle_s)
        return round(ms, 3)

    hop = measure_hop_ms(broker_url, IDLE_RUNS, idle_s) if idle_s else measure_hop_ms(broker_url)
    decode_args = {"repeats": 1, "idle_s": idle_s} if idle_s else {}
    return Floor(
        hop_ms=round(hop, 3),
        decode_ms=round(
            measure_decode_ms(bundle, payloads[:IDLE_RUNS] if idle_s else payloads, **decode_args),
            3,
        ),  # fmt: skip
        submodel_ms={s.id: model_ms(s.file) for s in m.submodels},
        fusion_ms=model_ms(m.fusion.file),
        original_ms=model_ms(m.original.file),
    )


# -- one pipeline run -----------------------------------------------------------------------


def run_pipeline(broker: LocalBroker, bundle: Bundle, pipeline: str, cameras: int, fps: float,
                 seconds: float, samples: list[Sample], floor: Floor, idle_floor: Floor,
                 log_dir: Path) -> RunResult:  # fmt: skip
    topics = Topics(f"e2e-{pipeline}-{cameras}")
    plan = deploy(bundle, broker.url, topics=topics)
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    sent: Synchronized[int] = context.Value("i", 0)
    with LocalFleet(broker.url, log_dir / topics.prefix, topics) as fleet:
        for node in plan.assignments:
            # As the demo: every frame is served, none replaced by a newer one, so each
            # frame's latency counts, however long it queued.
            fleet.spawn(node, "node", "--id", node, "--keep-all-frames")
        fleet.spawn("aggregator", "aggregator")
        stream = PredictionStream(broker.url, topics=topics)
        stream.start()
        generator = context.Process(
            target=generate_load,
            args=(broker.url, topics.prefix, cameras, fps, [samples], stop, sent),
        )
        try:
            fleet.wait_ready(plan, timeout=60)
            warm_up(broker.url, topics, samples, stream, fleet)
            generator.start()
            stop.wait(seconds)
            stop.set()
            generator.join(timeout=10)
            if generator.exitcode:
                raise EdvitError(f"the camera generator exited with code {generator.exitcode}")
            predictions = collect_predictions(stream, sent.value, fleet)
        finally:
            stop.set()
            if generator.is_alive():
                generator.join(timeout=10)
            stream.stop()
    return summarise(pipeline, cameras, fps, seconds, sent.value, predictions, floor, idle_floor)


def summarise(pipeline: str, cameras: int, fps: float, seconds: float, sent: int,
              predictions: list[PredictionMsg], floor: Floor,
              idle_floor: Floor) -> RunResult:  # fmt: skip
    latencies = [p.latency_ms for p in predictions]
    p50, floor_ms = percentile(latencies, 50), floor.total(pipeline)
    idle_ms = idle_floor.total(pipeline)
    stages = {}
    for stage, stage_floor in floor.stages(pipeline).items():
        values = [p.timings[stage] for p in predictions if stage in p.timings]
        median = round(statistics.median(values), 3) if values else float("nan")
        stages[stage] = {
            "median": median, "floor": stage_floor, "over": round(median - stage_floor, 3)
        }  # fmt: skip
    return RunResult(
        pipeline=pipeline,
        cameras=cameras,
        fps=fps,
        seconds=seconds,
        sent=sent,
        answered=len({(p.camera, p.seq) for p in predictions}),
        degraded=sum(p.degraded for p in predictions),
        p50_ms=p50,
        p95_ms=percentile(latencies, 95),
        floor_ms=floor_ms,
        over_floor_ms=round(p50 - floor_ms, 2),
        idle_floor_ms=idle_ms,
        over_idle_floor_ms=round(p50 - idle_ms, 2),
        stages=stages,
    )


# -- the report -----------------------------------------------------------------------------


def _floor_line(name: str, floor: Floor, pipelines: list[str]) -> list[str]:
    return [
        f"{name} (ms): broker hop {floor.hop_ms:g}, decode {floor.decode_ms:g}, "
        + ", ".join(f"{sid} {ms:g}" for sid, ms in floor.submodel_ms.items())
        + f", fusion {floor.fusion_ms:g}, original {floor.original_ms:g}",
        "  " + "; ".join(f"{p} floor {floor.total(p):g}" for p in pipelines),
    ]


def format_report(floor: Floor, idle_floor: Floor, fps: float, results: list[RunResult],
                  pipelines: list[str]) -> str:  # fmt: skip
    lines = [
        *_floor_line("floor, back to back", floor, pipelines),
        *_floor_line(f"floor, each part after {1000 / fps:g} ms idle", idle_floor, pipelines),
        "",
        "| pipeline | cameras | fps | sent | answered | degraded | p50 ms | p95 ms | floor ms "
        "| p50 - floor ms | idle floor ms | p50 - idle floor ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.pipeline} | {r.cameras} | {r.fps:g} | {r.sent} | {r.answered} | "
            f"{r.degraded} | {r.p50_ms:g} | {r.p95_ms:g} | {r.floor_ms:g} | {r.over_floor_ms:g} "
            f"| {r.idle_floor_ms:g} | {r.over_idle_floor_ms:g} |"
        )
    lines += [
        "",
        "median ms per stage, (+ over the stage's floor); the floor rows are each stage's part",
        "",
        "| pipeline | cameras | " + " | ".join(STAGES) + " |",
        "|---|---:|" + "---:|" * len(STAGES),
    ]
    for pipeline in pipelines:
        parts = floor.stages(pipeline)
        cells = (f"{parts[s]:g}" for s in STAGES)
        lines.append(f"| {pipeline} | floor | " + " | ".join(cells) + " |")
        idle_parts = idle_floor.stages(pipeline)
        cells = (f"{idle_parts[s]:g}" for s in STAGES)
        lines.append(f"| {pipeline} | idle floor | " + " | ".join(cells) + " |")
        for r in (r for r in results if r.pipeline == pipeline):
            cells = (f"{r.stages[s]['median']:g} (+{r.stages[s]['over']:g})" for s in STAGES)
            lines.append(f"| {pipeline} | {r.cameras} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_e2e(bundle_dir: Path, cameras: list[int], fps: float, seconds: float,
              json_out: Path | None = None,
              make_monolithic: MakeMonolithic | None = None) -> dict[str, Any]:  # fmt: skip
    """Measure the floor, then run every camera count through each pipeline; print the
    table and return the report (also written to `json_out`). Without `make_monolithic`
    (no onnx here) only the split fleet runs."""
    check_arguments(cameras, fps, seconds)
    bundle = Bundle.load(bundle_dir)
    samples = frame_samples(load_dataset(bundle.manifest.dataset, "test"))

    def say(text: str, end: str = "\n") -> None:
        print(text, end=end, file=sys.stderr, flush=True)

    skipped = None if make_monolithic else ONNX_MISSING
    pipelines = ["split"] if skipped else list(PIPELINES)
    if skipped:
        say(f"e2e: monolithic rows skipped: {skipped}")
    log_dir = Path(tempfile.mkdtemp(prefix="edvit-bench-e2e-"))
    results: list[RunResult] = []
    with LocalBroker(kind="mosquitto") as broker, tempfile.TemporaryDirectory() as tmp:
        bundles = {"split": bundle}
        if make_monolithic:
            bundles["monolithic"] = make_monolithic(bundle, Path(tmp))
        say("e2e: measuring the floor ...", end="")
        payloads = frame_payloads(samples)
        floor = measure_floor(bundle, broker.url, payloads)
        idle_floor = measure_floor(bundle, broker.url, payloads, idle_s=1.0 / fps)
        say(f" split {floor.total('split'):g} ms, monolithic {floor.total('monolithic'):g} ms; "
            f"after {1000 / fps:g} ms idle: split {idle_floor.total('split'):g}, monolithic "
            f"{idle_floor.total('monolithic'):g}")  # fmt: skip
        runs = [(pipeline, count) for count in cameras for pipeline in pipelines]
        for i, (pipeline, count) in enumerate(runs, start=1):
            say(f"e2e [{i}/{len(runs)}] {pipeline}, {count} cameras at {fps:g} fps for "
                f"{seconds:g} s ...", end="")  # fmt: skip
            result = run_pipeline(broker, bundles[pipeline], pipeline, count, fps, seconds,
                                  samples, floor, idle_floor, log_dir)  # fmt: skip
            say(f" answered {result.answered}/{result.sent}, p50 {result.p50_ms:g} ms, "
                f"p95 {result.p95_ms:g} ms")  # fmt: skip
            results.append(result)
    say(f"e2e: logs in {log_dir}")
    print(format_report(floor, idle_floor, fps, results, pipelines))
    report = {
        "bundle": bundle.manifest.name,
        "settings": {"cameras": cameras, "fps": fps, "seconds": seconds},
        "monolithic_skipped": skipped,
        "floor": asdict(floor) | {f"{p}_ms": floor.total(p) for p in PIPELINES},
        "floor_stages": {p: floor.stages(p) for p in PIPELINES},
        "idle_floor": asdict(idle_floor) | {f"{p}_ms": idle_floor.total(p) for p in PIPELINES},
        "idle_floor_stages": {p: idle_floor.stages(p) for p in PIPELINES},
        "runs": [asdict(r) for r in results],
    }
    write_json(json_out, report)
    return report
