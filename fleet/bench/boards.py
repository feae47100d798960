"""`edvit bench boards`: the method's claim under board constraints.

The original model served whole on ONE emulated board (the monolithic bundle, as in
`bench e2e`) against the split bundle on N emulated boards of the same type, one sub-model
each (N = the bundle's sub-model count), every board made by `edvit fleet up`'s code
(fleet/boards/boards.py): its own network namespace, CPU quota, memory limit, rate-limited and
delayed link. The broker, the aggregator and the cameras run on the host, unshaped.

Per pipeline: latency (p50/p95, capture to prediction) with one camera at a rate every
board keeps up with; throughput (complete predictions per second) under a saturating load,
the nodes dropping stale frames as they do by default; per board its node's peak RSS, the
cgroup's peak memory and the CPU it used (cores, against its quota); and whether the model
fits the board: a node the memory limit kills is reported as "does not fit".
"""

from __future__ import annotations

import multiprocessing
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edvit.broker.local import LocalBroker
from edvit.bundle import Bundle
from edvit.datasets import load_dataset
from edvit.errors import ConfigError, EdvitError
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
from edvit.fleet.boards import boards, emulation
from edvit.fleet.boards.boards import BoardOutOfMemory, BoardSpec, FleetSpec, RunState
from edvit.fleet.ops.deploy import deploy
from edvit.fleet.ops.local import LocalFleet
from edvit.fleet.ops.watch import PredictionStream
from edvit.process import rss_mb
from edvit.schemas import PredictionMsg
from edvit.topics import Topics

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

SATURATE_CAMERAS = 4


@dataclass
class BoardResult:
    id: str
    model_mb: float  # the ONNX files it serves
    peak_rss_mb: float | None  # its node's VmHWM
    cgroup_peak_mb: float | None  # everything charged to the board's memory limit
    cpu_cores: float | None  # CPU used under the saturating load, in cores
    cpu_quota: float


@dataclass
class PipelineResult:
    pipeline: str
    boards: int
    fits: bool
    note: str = ""
    sent: int = 0
    answered: int = 0
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    offered_fps: float = 0.0
    served_fps: float = 0.0  # complete (not degraded) predictions per second
    degraded: int = 0
    per_board: list[BoardResult] = field(default_factory=list)


def _camera_run(broker_url: str, topics: Topics, cameras: int, fps: float, seconds: float,
                samples: list[Sample], stream: PredictionStream,
                fleet: LocalFleet) -> tuple[int, list[PredictionMsg]]:  # fmt: skip
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    sent: Synchronized[int] = context.Value("i", 0)
    generator = context.Process(
        target=generate_load, args=(broker_url, topics.prefix, cameras, fps, [samples], stop, sent)
    )
    generator.start()
    try:
        stop.wait(seconds)
    finally:
        stop.set()
        generator.join(timeout=10)
    return sent.value, collect_predictions(stream, sent.value, fleet)


def _model_mb(bundle: Bundle, submodel_ids: tuple[str, ...]) -> float:
    files = {s.id: s.file for s in bundle.manifest.submodels}
    return round(sum(bundle.path(files[sid]).stat().st_size for sid in submodel_ids) / 2**20, 2)


def run_pipeline(pipeline: str, bundle: Bundle, board: BoardSpec, broker: LocalBroker,
                 samples: list[Sample], fps: float, saturate_fps: float, seconds: float,
                 work_dir: Path) -> PipelineResult:  # fmt: skip
    count = len(bundle.manifest.submodels)
    topics = Topics(f"boards-{pipeline}")
    fleet_spec = FleetSpec(
        boards=tuple(replace(board, id=f"node-{i}") for i in range(count)),
        broker_host=broker.host, broker_port=broker.port, prefix=topics.prefix,
    )  # fmt: skip
    result = PipelineResult(pipeline=pipeline, boards=count, fits=True)
    run_dir = work_dir / pipeline
    state: RunState | None = None
    try:
        state = boards.up(fleet_spec, run_dir)
        plan = deploy(bundle, broker.url, topics=topics)
        with LocalFleet(broker.url, run_dir / "host", topics) as fleet:
            fleet.spawn("aggregator", "aggregator")
            stream = PredictionStream(broker.url, topics=topics)
            stream.start()
            try:

                def check() -> None:
                    for b in state.boards:  # type: ignore[union-attr]
                        boards.check_board(b)

                fleet.wait_ready(plan, timeout=90, check=check)
                warm_up(broker.url, topics, samples, stream, fleet)
                sent, predictions = _camera_run(
                    broker.url, topics, 1, fps, seconds, samples, stream, fleet
                )
                check()
                latencies = [p.latency_ms for p in predictions]
                result.sent, result.answered = sent, len({p.seq for p in predictions})
                result.p50_ms, result.p95_ms = (
                    percentile(latencies, 50),
                    percentile(latencies, 95),
                )
                cpu_before = {b.spec.id: boards.board_status(b)["cpu_s"] for b in state.boards}
                started = time.monotonic()
                offered, predictions = _camera_run(
                    broker.url, topics, SATURATE_CAMERAS, saturate_fps, seconds, samples,
                    stream, fleet,
                )  # fmt: skip
                elapsed = time.monotonic() - started
                check()
                complete = {(p.camera, p.seq) for p in predictions if not p.degraded}
                result.offered_fps = round(offered / seconds, 1)
                result.served_fps = round(len(complete) / seconds, 1)
                result.degraded = sum(p.degraded for p in predictions)
                for b in state.boards:
                    row = boards.board_status(b)
                    used = (row["cpu_s"] or 0.0) - (cpu_before[b.spec.id] or 0.0)
                    peak = row["cgroup_peak_mb"]
                    result.per_board.append(BoardResult(
                        id=b.spec.id, model_mb=_model_mb(bundle, plan.assignments[b.spec.id]),
                        peak_rss_mb=_round(rss_mb(b.node_pid, "VmHWM")),
                        cgroup_peak_mb=_round(peak), cpu_cores=round(used / elapsed, 3),
                        cpu_quota=b.spec.cpu,
                    ))  # fmt: skip
            finally:
                stream.stop()
    except BoardOutOfMemory as exc:
        result.fits = False
        result.note = f"does not fit: {exc}"
    finally:
        if state is not None or boards.load_state(run_dir) is not None:
            boards.down(run_dir)
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def format_report(board: BoardSpec, results: list[PipelineResult], fps: float) -> str:
    lines = [
        f"board: {board.preset or 'custom'}: {board.cpu:g} core, {board.memory_mb} MB, "
        f"{board.rate_mbit:g} Mbit/s, +{board.delay_ms:g} ms each way",
        "",
        f"| pipeline | boards | fits | p50 ms ({fps:g} fps) | p95 ms | served fps | offered fps "
        "| degraded | peak RSS MB per board | CPU cores per board (quota) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        if not r.fits:
            lines.append(f"| {r.pipeline} | {r.boards} | no: {r.note} | | | | | | | |")
            continue
        rss = ", ".join(f"{b.peak_rss_mb}" for b in r.per_board)
        cpu = ", ".join(f"{b.cpu_cores:g}" for b in r.per_board if b.cpu_cores is not None)
        lines.append(
            f"| {r.pipeline} | {r.boards} | yes | {r.p50_ms:g} | {r.p95_ms:g} | {r.served_fps:g} "
            f"| {r.offered_fps:g} | {r.degraded} | {rss} | {cpu} ({board.cpu:g}) |"
        )
    return "\n".join(lines)


def bench_boards(bundle_dir: Path, board: BoardSpec, fps: float, saturate_fps: float,
                 seconds: float, json_out: Path | None = None,
                 make_monolithic: MakeMonolithic | None = None) -> dict[str, Any]:  # fmt: skip
    if not (fps > 0 and saturate_fps > 0 and seconds > 0):
        raise ConfigError("--fps, --saturate-fps and --seconds must be positive")
    missing = emulation.missing_features()
    if missing:
        raise EdvitError(boards.unavailable_message(missing))
    bundle = Bundle.load(bundle_dir)
    samples = frame_samples(load_dataset(bundle.manifest.dataset, "test"))

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    count = len(bundle.manifest.submodels)
    say(f"boards: {bundle.manifest.name} has {count} sub-models: the split runs on {count} "
        f"boards (a bundle built with --num-devices N for N)")  # fmt: skip
    skipped = None if make_monolithic else ONNX_MISSING
    work_dir = Path(tempfile.mkdtemp(prefix="edvit-bench-boards-"))
    results = []
    with LocalBroker(kind="mosquitto") as broker, tempfile.TemporaryDirectory() as tmp:
        bundles = {"split": bundle}
        if make_monolithic:
            bundles = {"monolithic": make_monolithic(bundle, Path(tmp))} | bundles
        else:
            say(f"boards: monolithic row skipped: {skipped}")
        for pipeline, pipeline_bundle in bundles.items():
            say(f"boards: {pipeline} ...")
            result = run_pipeline(pipeline, pipeline_bundle, board, broker, samples, fps,
                                  saturate_fps, seconds, work_dir)  # fmt: skip
            say(f"  fits: {result.fits} {result.note}; p50 {result.p50_ms:g} ms, "
                f"served {result.served_fps:g} fps")  # fmt: skip
            results.append(result)
    say(f"boards: logs in {work_dir}")
    print(format_report(board, results, fps))
    report = {
        "bundle": bundle.manifest.name,
        "board": asdict(board),
        "settings": {
            "fps": fps,
            "saturate_fps": saturate_fps,
            "saturate_cameras": SATURATE_CAMERAS,
            "seconds": seconds,
        },  # fmt: skip
        "monolithic_skipped": skipped,
        "runs": [asdict(r) for r in results],
    }
    write_json(json_out, report)
    return report
