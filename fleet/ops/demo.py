"""`edvit demo`: a broker, a deployed bundle, N nodes, the aggregator and a dataset camera
as separate processes on this machine; live predictions and a summary at the end."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import queue
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edvit.broker.local import LocalBroker
from edvit.bundle import REPORT_NAME, Bundle
from edvit.command import positive_float, positive_int
from edvit.errors import ConfigError
from edvit.fleet.ops import secure
from edvit.fleet.ops.deploy import bundle_assignments, deploy
from edvit.fleet.ops.local import LocalFleet
from edvit.fleet.ops.watch import PredictionStream, format_prediction
from edvit.mqtt import Connection
from edvit.schemas import STAGES, PredictionMsg

log = logging.getLogger("edvit.fleet.ops.demo")

DEFAULT_BUNDLE = Path(__file__).parents[1] / "bundles" / "fashion-mnist-3"
CAMERA_ID = "cam0"


@dataclass
class Summary:
    frames_sent: int
    transport: str = "plain"
    predictions: list[PredictionMsg] = field(default_factory=list)

    @property
    def unique_frames(self) -> int:
        return len({p.seq for p in self.predictions})

    @property
    def accuracy(self) -> float | None:
        labelled = [p for p in self.predictions if p.true_label is not None]
        if not labelled:
            return None
        return sum(p.label == p.true_label for p in labelled) / len(labelled)

    def latency_percentile(self, q: float) -> float:
        return float(np.percentile([p.latency_ms for p in self.predictions], q))

    def render(self) -> str:
        lines = [
            "",
            f"summary ({self.transport})",
            f"  frames sent          {self.frames_sent}",
            f"  predictions received {len(self.predictions)}"
            f" ({self.unique_frames} distinct frames)",
            f"  degraded             {sum(p.degraded for p in self.predictions)}",
        ]
        if self.accuracy is not None:
            lines.append(f"  accuracy             {self.accuracy:.2%}")
        if self.predictions:
            lines.append(
                f"  latency end-to-end   p50 {self.latency_percentile(50):.1f} ms, "
                f"p95 {self.latency_percentile(95):.1f} ms"
            )
            stages = self.stage_medians()
            if stages:
                text = ", ".join(f"{name} {ms:.2f}" for name, ms in stages.items())
                lines.append(f"  median per stage     {text} (ms)")
        return "\n".join(lines)

    def stage_medians(self) -> dict[str, float]:
        """Median ms per stage over the predictions that carry timings."""
        return {
            stage: float(np.median(values))
            for stage in STAGES
            if (values := [p.timings[stage] for p in self.predictions if stage in p.timings])
        }


def bundle_summary(bundle_dir: Path) -> str:
    """Which bundle the demo runs and what its report says it cuts (size, latency, accuracy)."""
    manifest = Bundle.load(bundle_dir).manifest
    text = f"{manifest.name} at {bundle_dir}: {len(manifest.submodels)} sub-models"
    try:
        report = json.loads((bundle_dir / REPORT_NAME).read_text())
        ratios, acc = report["ratios"], report["accuracy"]
        return (
            f"{text}, each at least {ratios['size']:.1f}x smaller and "
            f"{ratios['latency']:.1f}x faster than the original; accuracy "
            f"{acc['fused']:.2%} fused vs {acc['original']:.2%}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return f"{text} (no readable {REPORT_NAME})"


@dataclass(frozen=True)
class Access:
    """How the demo's processes reach the broker: all anonymously over plain MQTT, or each
    with its own identity from a `secure init` folder over TLS (README, "Security")."""

    url: str
    secrets: Path | None = None

    def connection(self, identity: str) -> str | Connection:
        return self.url if self.secrets is None else secure.login(self.secrets, identity, self.url)

    def env(self, identity: str) -> dict[str, str]:
        return {} if self.secrets is None else secure.login_env(self.secrets, identity)


@contextlib.contextmanager
def demo_broker(
    broker_kind: str, nodes: list[str], workdir: Path, tls: bool = False
) -> Iterator[tuple[LocalBroker, Access]]:
    """A local broker for the demo; with `tls`, a TLS-only mosquitto with accounts and the
    ACL from a fresh `secure init` in workdir/secrets, for these nodes and the camera."""
    if not tls:
        with LocalBroker(kind=broker_kind) as broker:  # type: ignore[arg-type]
            yield broker, Access(broker.url)
        return
    if broker_kind == "embedded":
        raise ConfigError("--secure needs mosquitto: the embedded broker has no TLS or ACL")
    secrets = workdir / "secrets"
    secure.init(secrets, secure.parse_identities(nodes, [CAMERA_ID]), port=0)
    config = secrets / "broker" / "mosquitto.conf"
    with LocalBroker(kind="mosquitto", secure_config=config) as broker:
        yield broker, Access(broker.url, secrets)


def run_demo(
    bundle_dir: Path = DEFAULT_BUNDLE,
    *,
    frames: int = 200,
    fps: float = 25.0,
    broker_kind: str = "auto",
    log_dir: Path | None = None,
    quiet: bool = False,
    tls: bool = False,
    timings: bool = False,
) -> Summary:
    """The whole fleet on this machine. `tls`: over TLS, every process with its own account
    and only the topics the ACL grants it."""
    if not (bundle_dir / "manifest.json").is_file():
        raise ConfigError(
            f"no bundle at {bundle_dir}; build one with "
            "`edvit build --dataset fashion-mnist --num-devices 3 --out DIR` and pass --bundle DIR"
        )
    # Imported here: the datasets bring cv2, which the CLI does not load to build its parser.
    from edvit.datasets import load_dataset

    bundle = Bundle.load(bundle_dir)
    manifest = bundle.manifest
    # A missing dataset fails here, with its fix, rather than inside the camera process.
    frames = min(frames, len(load_dataset(manifest.dataset, "test")))
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="edvit-demo-"))
    say = (lambda *_: None) if quiet else print

    say(f"bundle    {bundle_summary(bundle_dir)}")
    nodes = list(bundle_assignments(bundle, None))
    with demo_broker(broker_kind, nodes, log_dir, tls) as (broker, access):
        logins = "TLS, one account per process, the ACL" if tls else "plain, anonymous"
        say(f"broker    {broker.kind} at {broker.url} ({logins})")
        plan = deploy(bundle, access.connection("deploy"))
        say(f"deployed  {manifest.name}: plan {plan.plan_id}, {dict(plan.assignments)}")
        with LocalFleet(access.connection("dashboard"), log_dir) as fleet:
            for node in plan.assignments:
                # Replay scores every test image, so no frame may be replaced by a newer one.
                fleet.spawn(node, "node", "--id", node, "--keep-all-frames", env=access.env(node))
            fleet.spawn("aggregator", "aggregator", env=access.env("aggregator"))
            stream = PredictionStream(access.connection("dashboard"))
            stream.start()
            try:
                fleet.wait_ready(plan)
                say(
                    f"ready     {len(plan.assignments)} nodes and the aggregator; logs in {log_dir}"
                )
                started = time.monotonic()
                camera = fleet.spawn(
                    "camera", "camera", "--id", CAMERA_ID,
                    "--source", f"dataset:{manifest.dataset}",
                    "--count", str(frames), "--fps", str(fps), env=access.env(CAMERA_ID),
                )  # fmt: skip
                summary = Summary(frames_sent=frames, transport="TLS" if tls else "plain")
                quiet_since = None
                while len(summary.predictions) < frames:
                    fleet.check_alive()
                    try:
                        prediction = stream.queue.get(timeout=0.25)
                    except queue.Empty:
                        if camera.poll() is None:
                            continue
                        quiet_since = quiet_since or time.monotonic()
                        if time.monotonic() - quiet_since > 5.0:
                            break  # the camera is done and nothing more is coming
                        continue
                    quiet_since = None
                    summary.predictions.append(prediction)
                    say(format_prediction(prediction, timings))
                camera.wait(timeout=10)
                say(f"streamed  {frames} frames in {time.monotonic() - started:.1f} s")
            finally:
                stream.stop()
    say(summary.render())
    return summary


def compare(summaries: list[Summary]) -> str:
    """One line per run: what `edvit demo --secure --compare-plain` ends with."""
    lines = ["", "transport  frames  answered  p50 ms  p95 ms"]
    for s in summaries:
        p50, p95 = (
            (f"{s.latency_percentile(50):6.1f}", f"{s.latency_percentile(95):6.1f}")
            if s.predictions else ("     -", "     -")
        )  # fmt: skip
        lines.append(f"{s.transport:<9}  {s.frames_sent:6d}  {s.unique_frames:8d}  {p50}  {p95}")
    return "\n".join(lines)


def bundle_option(parser: argparse.ArgumentParser) -> None:
    """--bundle, for the commands that default to the shipped bundle (see bundle_path)."""
    parser.add_argument(
        "--bundle", help="bundle folder (default: the shipped Fashion-MNIST bundle)"
    )


def bundle_path(bundle: str | None) -> Path:
    """The --bundle given, else the shipped Fashion-MNIST bundle."""
    return Path(bundle) if bundle else DEFAULT_BUNDLE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bundle_option(parser)
    parser.add_argument("--frames", type=positive_int, default=200)
    parser.add_argument("--fps", type=positive_float, default=25.0)
    parser.add_argument("--broker-kind", choices=["auto", "mosquitto", "embedded"], default="auto")
    parser.add_argument("--log-dir", help="where the processes' logs go (default a temp folder)")
    parser.add_argument(
        "--secure", action="store_true",
        help="over TLS, each process with its own account and the ACL (a fresh `secure init` "
        "in the log folder; needs mosquitto)",
    )  # fmt: skip
    parser.add_argument(
        "--compare-plain", action="store_true",
        help="with --secure: run the same frames over plain MQTT first and compare latencies",
    )  # fmt: skip
    parser.add_argument(
        "--timings", action="store_true", help="show each prediction's ms per stage"
    )
    parser.set_defaults(log_level="WARNING")  # the demo's own output is the story; logs go to files


def run(args: argparse.Namespace) -> int:
    if args.compare_plain and not args.secure:
        raise ConfigError("--compare-plain compares a --secure run with a plain one: add --secure")
    log_dir = Path(args.log_dir) if args.log_dir else None
    runs = [False, True] if args.compare_plain else [args.secure]
    summaries = [
        run_demo(
            bundle_path(args.bundle),
            frames=args.frames,
            fps=args.fps,
            broker_kind=args.broker_kind,
            log_dir=log_dir / ("tls" if tls else "plain") if log_dir and len(runs) > 1 else log_dir,
            tls=tls,
            timings=args.timings,
        )  # fmt: skip
        for tls in runs
    ]
    if len(summaries) > 1:
        print(compare(summaries))
    complete = all(s.unique_frames == len(s.predictions) == s.frames_sent for s in summaries)
    if not complete:
        print("edvit demo: not every frame got exactly one prediction", file=sys.stderr)
    return 0 if complete else 1
