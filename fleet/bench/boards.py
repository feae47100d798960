"""`edvit bench boards`: the method's claim under board constraints, at any scale.

Three ways to serve a bundle's model on emulated boards of one type, each made by `edvit
fleet up`'s code (fleet/boards/boards.py): its own network namespace, CPU quota, memory
limit, rate-limited and delayed link. The broker, the aggregator and the cameras run on the
host, unshaped.

- `whole`: the original served whole on ONE board (the monolithic bundle, as in `bench e2e`);
  once per distinct original among the bundles.
- `split`: the bundle's N sub-models on N boards, one each (N = its sub-model count).
- `replicas`: the whole original on N boards, every one a replica (a shared subscription:
  the broker hands each frame to one of them), N as for the split.

Per run: latency (p50/p95, capture to prediction) with one camera at a rate every pipeline
keeps up with; throughput (complete predictions per second) under a saturating load, the
nodes dropping stale frames as they do by default; per board its node's peak RSS, the
cgroup's peak memory and failure count, the CPU it used (cores, against its quota), and
whether the memory limit killed the node. A run whose model cannot be deployed or loaded,
or whose node the limit kills, is a row that says so; the other runs go on.

The runs are sequential and each takes its boards down before the next: the boards' quotas
of one run must add up to at most this machine's cores, checked before anything starts.
"""

from __future__ import annotations

import multiprocessing
import os
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
from edvit.fleet.boards.boards import BoardOutOfMemory, BoardSpec, BoardState, FleetSpec
from edvit.fleet.ops.deploy import deploy
from edvit.fleet.ops.local import LocalFleet
from edvit.fleet.ops.watch import PredictionStream
from edvit.mqtt import MqttClient, unique_client_id
from edvit.process import rss_mb
from edvit.schemas import PredictionMsg, StatusMsg, decode
from edvit.topics import Topics

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

SATURATE_CAMERAS = 4
PIPELINES = ("whole", "split", "replicas")
NEEDS_MONOLITHIC = ("whole", "replicas")
# The aggregator's own default: how long a frame waits for the features of the split's
# slowest board before it is answered degraded (whole and replicas send one feature each).
AGGREGATOR_TIMEOUT_MS = 250.0


@dataclass
class BoardResult:
    id: str
    model_mb: float  # the ONNX files it serves
    peak_rss_mb: float | None  # its node's VmHWM (None once the node is gone)
    cgroup_peak_mb: float | None  # everything charged to the board's memory limit
    cpu_cores: float | None  # CPU used under the saturating load, in cores
    cpu_quota: float
    memory_mb: int = 0
    failcnt: int | None = None  # times the cgroup hit its memory limit
    oom_killed: bool = False  # the memory limit killed the node


@dataclass
class PipelineResult:
    pipeline: str  # whole, split or replicas
    bundle: str  # the bundle the run is of (whole: its original)
    boards: int
    fits: bool
    note: str = ""
    sent: int = 0
    answered: int = 0
    answered_degraded: int = 0  # of the latency run's answers
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    offered_fps: float = 0.0
    served_fps: float = 0.0  # complete (not degraded) predictions per second
    degraded: int = 0
    oom_killed: list[str] = field(default_factory=list)  # boards whose limit killed the node
    # A run that did not serve for another reason (a model the broker or the node refused):
    # its largest model file loaded alone on one board (boards.load_on_board).
    load_probe: dict[str, Any] | None = None
    per_board: list[BoardResult] = field(default_factory=list)


@dataclass(frozen=True)
class Run:
    """One pipeline of one bundle: `served` is what its boards load (the bundle itself for
    the split, its monolithic bundle otherwise), `nodes` one board each."""

    pipeline: str
    bundle: Bundle
    nodes: tuple[str, ...]

    @property
    def replicas(self) -> int:
        return len(self.nodes) if self.pipeline == "replicas" else 1


def plan_runs(bundles: list[Bundle], pipelines: tuple[str, ...]) -> list[Run]:
    """The runs, in order: `whole` once per distinct original, then per bundle its split and
    its replicas."""
    runs: list[Run] = []
    if "whole" in pipelines:
        originals: set[str] = set()
        for bundle in bundles:
            digest = bundle.file_sha256(bundle.manifest.original.file)
            if digest not in originals:
                originals.add(digest)
                runs.append(Run("whole", bundle, ("node-0",)))
    for bundle in bundles:
        count = len(bundle.manifest.submodels)
        if "split" in pipelines:
            runs.append(Run("split", bundle, tuple(f"node-{i}" for i in range(count))))
        if "replicas" in pipelines:
            ids = ("node-0", *(f"node-0-r{k}" for k in range(1, count)))
            runs.append(Run("replicas", bundle, ids))
    return runs


def check_cores(runs: list[Run], board: BoardSpec, cores: int) -> None:
    """ConfigError, one line, when one run's boards have more CPU quota than `cores`."""
    largest = max(runs, key=lambda r: len(r.nodes))
    need = len(largest.nodes) * board.cpu
    if need > cores + 1e-9:
        fit = int(cores // board.cpu)
        raise ConfigError(
            f"the {largest.pipeline} run of {largest.bundle.manifest.name} needs "
            f"{len(largest.nodes)} boards x {board.cpu:g} core = {need:g} cores of quota, "
            f"over this machine's {cores}: at most {fit} boards of this type (a bundle with "
            f"fewer sub-models, or a smaller --cpu)"
        )


def parse_pipelines(text: str) -> tuple[str, ...]:
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PIPELINES]
    if not chosen or unknown:
        raise ConfigError(
            f"--pipelines: unknown {unknown or text!r}; choose from {','.join(PIPELINES)}"
        )
    return chosen


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


def _node_errors(broker_url: str, topics: Topics, seconds: float = 1.0) -> list[str]:
    """What the nodes' retained statuses say went wrong (a refused plan, a model that did
    not load), one entry per node that says anything."""
    errors: dict[str, str] = {}

    def on_status(topic: str, payload: bytes) -> None:
        status = decode(StatusMsg, payload)
        if status is not None and status.error:
            errors[topics.node_of(topic)] = status.error

    client = MqttClient(unique_client_id("bench-boards-status"), broker_url)
    client.route(topics.all_node_statuses(), on_status, qos=1)
    client.start(required=True)
    try:
        time.sleep(seconds)
    finally:
        client.stop()
    return [f"{node}: {error}" for node, error in sorted(errors.items())]


def board_row(board: BoardState, model_mb: float, cpu_cores: float | None = None) -> BoardResult:
    """A board's memory figures as they stand, and whether its limit killed the node."""
    row = boards.board_status(board)
    folders = [Path(f) for f in board.cgroups]
    failcnt = emulation.memory_failcnt(folders) if all(f.exists() for f in folders) else None
    return BoardResult(
        id=board.spec.id, model_mb=model_mb, peak_rss_mb=_round(rss_mb(board.node_pid, "VmHWM")),
        cgroup_peak_mb=_round(row["cgroup_peak_mb"]), cpu_cores=cpu_cores,
        cpu_quota=board.spec.cpu, memory_mb=board.spec.memory_mb, failcnt=failcnt,
        oom_killed=boards.killed_by_memory_limit(board),
    )  # fmt: skip


def run_pipeline(run: Run, served: Bundle, board: BoardSpec, broker: LocalBroker,
                 samples: list[Sample], fps: float, saturate_fps: float, seconds: float,
                 ready_timeout: float, work_dir: Path,
                 aggregator_timeout_ms: float = AGGREGATOR_TIMEOUT_MS,
                 ) -> PipelineResult:  # fmt: skip
    name = f"{run.pipeline}-{run.bundle.manifest.name}-{len(run.nodes)}"
    topics = Topics(f"boards-{run.pipeline}-{len(run.nodes)}-{os.getpid()}")
    fleet_spec = FleetSpec(
        boards=tuple(replace(board, id=node) for node in run.nodes),
        broker_host=broker.host, broker_port=broker.port, prefix=topics.prefix,
    )  # fmt: skip
    result = PipelineResult(
        pipeline=run.pipeline, bundle=run.bundle.manifest.name, boards=len(run.nodes), fits=True
    )
    run_dir = work_dir / name
    state = None
    try:
        state = boards.up(fleet_spec, run_dir)
        nodes = list(run.nodes[: len(run.nodes) // run.replicas])
        plan = deploy(served, broker.url, nodes=nodes, topics=topics, replicas=run.replicas)
        placed = {node: _model_mb(served, ids) for node, ids in plan.assignments.items()}
        with LocalFleet(broker.url, run_dir / "host", topics) as fleet:
            fleet.spawn("aggregator", "aggregator", "--timeout-ms", f"{aggregator_timeout_ms:g}")
            stream = PredictionStream(broker.url, topics=topics)
            stream.start()
            try:

                def check() -> None:
                    for b in state.boards:  # type: ignore[union-attr]
                        boards.check_board(b)

                try:
                    fleet.wait_ready(plan, timeout=ready_timeout, check=check)
                except BoardOutOfMemory:
                    raise
                except EdvitError as exc:
                    said = _node_errors(broker.url, topics)
                    raise EdvitError(f"{exc}; " + "; ".join(said) if said else str(exc)) from None
                warm_up(broker.url, topics, samples, stream, fleet)
                sent, predictions = _camera_run(
                    broker.url, topics, 1, fps, seconds, samples, stream, fleet
                )
                check()
                latencies = [p.latency_ms for p in predictions]
                result.sent, result.answered = sent, len({p.seq for p in predictions})
                result.answered_degraded = sum(p.degraded for p in predictions)
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
                    used = (boards.board_status(b)["cpu_s"] or 0.0) - (cpu_before[b.spec.id] or 0.0)
                    result.per_board.append(
                        board_row(b, placed[b.spec.id], round(used / elapsed, 3))
                    )
            finally:
                stream.stop()
    except BoardOutOfMemory as exc:
        result.fits = False
        result.oom_killed.append(exc.board_id)
        result.note = str(exc)
    except EdvitError as exc:
        result.fits = False
        result.note = f"did not serve: {' '.join(str(exc).split())}"
    finally:
        if state is not None and not result.fits:  # what the boards went through
            result.per_board = [board_row(b, 0.0) for b in state.boards]
            killed = {b.id for b in result.per_board if b.oom_killed}
            result.oom_killed = sorted(killed | set(result.oom_killed))
        if state is not None or boards.load_state(run_dir) is not None:
            boards.down(run_dir)
    if not result.fits and not result.oom_killed:
        files = [served.path(sm.file) for sm in served.manifest.submodels]
        largest = max(files, key=lambda f: f.stat().st_size)
        probe = boards.load_on_board(board, largest, ready_timeout)
        result.load_probe = asdict(probe)
        result.note += f"; {largest.name} alone on one board: {probe.detail}"
        if probe.oom_killed:
            result.oom_killed = [f"{largest.name} loaded alone"]
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def format_report(board: BoardSpec, results: list[PipelineResult], fps: float) -> str:
    lines = [
        f"board: {board.preset or 'custom'}: {board.cpu:g} core, {board.memory_mb} MB, "
        f"{board.rate_mbit:g} Mbit/s, +{board.delay_ms:g} ms each way",
        "",
        f"| pipeline | bundle | boards | fits | p50 ms ({fps:g} fps) | p95 ms | served fps "
        "| offered fps | degraded | peak RSS MB per board | cgroup peak MB per board "
        "| CPU cores per board (quota) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        cgroup = ", ".join(f"{b.cgroup_peak_mb}" for b in r.per_board)
        if not r.fits:
            what = f"no, OOM-killed ({', '.join(r.oom_killed)})" if r.oom_killed else "no"
            lines.append(
                f"| {r.pipeline} | {r.bundle} | {r.boards} | {what}: {r.note} | | | | | | "
                f"| {cgroup} | |"
            )
            continue
        rss = ", ".join(f"{b.peak_rss_mb}" for b in r.per_board)
        cpu = ", ".join(f"{b.cpu_cores:g}" for b in r.per_board if b.cpu_cores is not None)
        lines.append(
            f"| {r.pipeline} | {r.bundle} | {r.boards} | yes | {r.p50_ms:g} | {r.p95_ms:g} "
            f"| {r.served_fps:g} | {r.offered_fps:g} | {r.degraded} | {rss} | {cgroup} "
            f"| {cpu} ({board.cpu:g}) |"
        )
    return "\n".join(lines)


def bench_boards(bundle_dirs: list[Path], board: BoardSpec, fps: float, saturate_fps: float,
                 seconds: float, json_out: Path | None = None,
                 make_monolithic: MakeMonolithic | None = None,
                 pipelines: tuple[str, ...] = PIPELINES, ready_timeout: float = 120.0,
                 aggregator_timeout_ms: float = AGGREGATOR_TIMEOUT_MS,
                 ) -> dict[str, Any]:  # fmt: skip
    if not all(v > 0 for v in (fps, saturate_fps, seconds, ready_timeout, aggregator_timeout_ms)):
        raise ConfigError(
            "--fps, --saturate-fps, --seconds, --ready-timeout and --aggregator-timeout-ms "
            "must be positive"
        )
    missing = emulation.missing_features()
    if missing:
        raise EdvitError(boards.unavailable_message(missing))
    bundles = [Bundle.load(d) for d in bundle_dirs]
    skipped = None
    if make_monolithic is None and any(p in NEEDS_MONOLITHIC for p in pipelines):
        skipped = ONNX_MISSING
        pipelines = tuple(p for p in pipelines if p not in NEEDS_MONOLITHIC)
    runs = plan_runs(bundles, pipelines)
    if not runs:
        raise ConfigError(f"no run left: the whole and replicas pipelines need {skipped}")
    check_cores(runs, board, os.cpu_count() or 1)
    samples = frame_samples(load_dataset(bundles[0].manifest.dataset, "test"))

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if skipped:
        say(f"boards: whole and replicas rows skipped: {skipped}")
    work_dir = Path(tempfile.mkdtemp(prefix="edvit-bench-boards-"))
    results = []
    with LocalBroker(kind="mosquitto") as broker, tempfile.TemporaryDirectory() as tmp:
        monolithic: dict[str, Bundle] = {}
        for run in runs:
            served = run.bundle
            if run.pipeline in NEEDS_MONOLITHIC:
                key = run.bundle.file_sha256(run.bundle.manifest.original.file)
                if key not in monolithic:
                    assert make_monolithic is not None
                    folder = Path(tmp) / f"monolithic-{len(monolithic)}"
                    monolithic[key] = make_monolithic(run.bundle, folder)
                served = monolithic[key]
            say(f"boards: {run.pipeline} of {run.bundle.manifest.name} on {len(run.nodes)} "
                f"board(s) ...")  # fmt: skip
            result = run_pipeline(run, served, board, broker, samples, fps, saturate_fps,
                                  seconds, ready_timeout, work_dir,
                                  aggregator_timeout_ms)  # fmt: skip
            say(f"  fits: {result.fits} {result.note}; p50 {result.p50_ms:g} ms, "
                f"served {result.served_fps:g} fps")  # fmt: skip
            results.append(result)
    say(f"boards: logs in {work_dir}")
    print(format_report(board, results, fps))
    report = {
        "bundles": [b.manifest.name for b in bundles],
        "board": asdict(board),
        "settings": {
            "pipelines": list(pipelines),
            "fps": fps,
            "saturate_fps": saturate_fps,
            "saturate_cameras": SATURATE_CAMERAS,
            "seconds": seconds,
            "ready_timeout": ready_timeout,
            "aggregator_timeout_ms": aggregator_timeout_ms,
        },
        "monolithic_skipped": skipped,
        "runs": [asdict(r) for r in results],
    }
    write_json(json_out, report)
    return report
