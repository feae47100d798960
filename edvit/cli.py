"""The `edvit` command: one subcommand per part of the system.

Every command is wired one way: a module that exports `add_arguments(parser)` and
`run(args) -> int`, named in COMMANDS below. A command module imports at its top only what
its options need and the rest inside `run`, so that every process builds this whole parser
without loading cv2, torch or a web server. edvit/command.py holds the options commands share.

This is the composition root: the one module of edvit/ that imports the other folders.

Errors a user can fix (bad arguments, files, datasets, an unreachable broker) print one
line and exit 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edvit import __version__
from edvit.command import shared_options
from edvit.errors import ConfigError, EdvitError
from edvit.service import configure_logging
from edvit.topics import Topics

if TYPE_CHECKING:
    from edvit.bundle import Bundle
    from edvit.fleet.bench.common import MakeMonolithic
    from edvit.placement.slo import Board, Calibration


def monolithic_maker() -> MakeMonolithic | None:
    """models/monolithic.py's bundle maker, or None without the onnx package (the
    benchmarks then say the monolithic rows are skipped, and why)."""
    try:
        from edvit.models.monolithic import monolithic_bundle
    except ModuleNotFoundError as exc:
        if exc.name != "onnx":
            raise
        return None
    return monolithic_bundle


def fleet_boards(path: str) -> list[Board]:
    """BOARDS.yaml's boards for `edvit plan --boards` (fleet/boards reads the file)."""
    from edvit.fleet.boards.calibrate import fleet_boards as read

    return read(path)


def calibrate_fleet(bundle: Bundle, path: str, runs: int, existing: Calibration) -> Calibration:
    """`edvit plan --calibrate --boards`: each board type measured under its CPU quota."""
    from edvit.fleet.boards.calibrate import calibrate_fleet as measure

    return measure(bundle, path, runs, existing)


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # exports add_arguments(parser) and run(args) -> int
    help: str
    shared: bool = True  # takes edvit.command.shared_options (broker, TLS, login, logging)
    defaults: dict[str, Any] = field(default_factory=dict)  # what the module may not import


COMMANDS = (
    Command(
        "broker", "edvit.broker.cli", "start a local MQTT broker (mosquitto, else embedded amqtt)"
    ),
    Command(
        "secure", "edvit.fleet.ops.secure", "CA, certificates, passwords and ACL for a TLS broker"
    ),
    Command(
        "build", "edvit.models.cli",
        "train a ViT, make class-wise sub-models and fusion, export ONNX",
    ),
    Command(
        "plan", "edvit.placement.plan",
        "place a bundle's sub-models on a device inventory (no retraining), or with "
        "--slo-ms choose between split and replicas for a latency target",
        defaults={"fleet_boards": fleet_boards, "calibrate_fleet": calibrate_fleet},
    ),
    Command(
        "evaluate", "edvit.models.evaluate",
        "size, FLOPs, latency and accuracy figures of a bundle",
    ),
    Command(
        "deploy", "edvit.fleet.ops.deploy",
        "publish a bundle's plan and model files as retained messages",
    ),
    Command(
        "node", "edvit.edge_node.cli",
        "edge node: run assigned sub-models, publish feature vectors",
    ),
    Command("aggregator", "edvit.aggregator.cli", "fuse features into predictions"),
    Command(
        "camera", "edvit.camera_source.cli",
        "publish frames from a video, device, stream or dataset",
    ),
    Command("watch", "edvit.fleet.ops.watch", "print live predictions"),
    Command(
        "dashboard", "edvit.fleet.dashboard.cli",
        "the fleet live in a browser (needs the dashboard extra)",
    ),
    Command(
        "bench", "edvit.fleet.bench.cli",
        "benchmarks: `batching`, `slicing`, `scale`, `chaos`, `e2e` (latency against its floor) "
        "or `boards` (emulated boards)",
        defaults={"monolithic_maker": monolithic_maker},
    ),
    Command(
        "fleet", "edvit.fleet.boards.cli",
        "edge nodes on emulated boards: `up BOARDS.yaml`, `status`, `down` (needs root)",
        shared=False,  # the boards' broker and prefix come from BOARDS.yaml
    ),
    Command("demo", "edvit.fleet.ops.demo", "run broker, nodes, aggregator and a camera locally"),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edvit", description="Vision Transformers split across IoT boards over MQTT."
    )
    parser.add_argument("--version", action="version", version=f"edvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        module = importlib.import_module(command.module)
        parents = [shared_options()] if command.shared else []
        p = sub.add_parser(
            command.name, parents=parents, help=command.help, description=command.help
        )
        p.set_defaults(handler=module.run, **command.defaults)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        try:
            Topics(args.prefix)
        except ValueError as exc:
            raise ConfigError(f"--prefix: {exc}") from None
        return args.handler(args)
    except ConfigError as exc:
        print(f"edvit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except EdvitError as exc:
        print(f"edvit {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
