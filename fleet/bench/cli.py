"""`edvit bench BENCH`: the benchmarks, each on this machine.

`args.monolithic_maker`, for `e2e` and `boards`, comes from edvit/cli.py: it returns
models/'s monolithic bundle maker, or None without onnx (fleet/ never imports models/).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edvit.command import (
    frame_size,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    shared_options,
)
from edvit.fleet.bench import WARMUP_S
from edvit.fleet.chaos import cli as chaos_cli
from edvit.fleet.ops.demo import bundle_option, bundle_path


def _json_path(args: argparse.Namespace) -> Path | None:
    return Path(args.json) if args.json else None


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="also write the results here")


def _warmup_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--warmup-s", type=non_negative_float, default=WARMUP_S,
        help="seconds of camera load before each run starts counting (default %(default)g)",
    )  # fmt: skip


def _batching_arguments(parser: argparse.ArgumentParser) -> None:
    bundle_option(parser)
    parser.add_argument("--cameras", type=positive_int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument(
        "--fps", type=positive_float, default=30.0, help="frames per second per camera"
    )
    parser.add_argument("--seconds", type=positive_float, default=8.0, help="measured time per run")
    _warmup_option(parser)
    _json_option(parser)


def _batching(args: argparse.Namespace) -> int:
    from edvit.fleet.bench.batching import bench_batching

    bench_batching(
        bundle_path(args.bundle), args.cameras, args.fps, args.seconds, _json_path(args),
        args.warmup_s,
    )  # fmt: skip
    return 0


def _slicing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="a bundle built with --shared-blocks K")
    parser.add_argument("--cameras", type=positive_int, default=4)
    parser.add_argument(
        "--fps", type=positive_float, default=25.0, help="frames per second per camera"
    )
    parser.add_argument("--seconds", type=positive_float, default=6.0, help="measured time per run")
    _warmup_option(parser)
    _json_option(parser)
    parser.add_argument(
        "--mixed-cameras", type=non_negative_int, default=16,
        help="then this many cameras spread over J = 0..K, for both strategies (0: skip)",
    )  # fmt: skip
    parser.add_argument("--mixed-fps", type=positive_float, default=100.0, help="per mixed camera")
    parser.add_argument(
        "--rounds", type=positive_int, default=3,
        help="runs per J and strategy, interleaved; the table keeps the least node CPU (default 3)",
    )  # fmt: skip


def _slicing(args: argparse.Namespace) -> int:
    from edvit.fleet.bench.batching import bench_slicing

    bench_slicing(
        Path(args.bundle), args.cameras, args.fps, args.seconds, _json_path(args),
        args.mixed_cameras, args.mixed_fps, args.rounds, args.warmup_s,
    )  # fmt: skip
    return 0


def _scale_arguments(parser: argparse.ArgumentParser) -> None:
    bundle_option(parser)
    parser.add_argument(
        "--nodes", default="node-0",
        help="the nodes before replicas, sub-models round-robin (default: one node runs all)",
    )  # fmt: skip
    parser.add_argument("--replicas", type=positive_int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shards", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--cameras", type=positive_int, default=16)
    parser.add_argument(
        "--fps", type=positive_float, default=100.0, help="per camera (default 100)"
    )
    parser.add_argument("--seconds", type=positive_float, default=5.0, help="measured time per run")
    _json_option(parser)


def _scale(args: argparse.Namespace) -> int:
    from edvit.fleet.bench.scale import bench_scale

    bench_scale(
        bundle_path(args.bundle), [n.strip() for n in args.nodes.split(",")], args.replicas,
        args.shards, args.cameras, args.fps, args.seconds, _json_path(args),
    )  # fmt: skip
    return 0


def _boards_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle", action="append",
        help="bundle folder, repeatable: a split and a replicas run of each (default: the "
        "shipped Fashion-MNIST bundle)",
    )  # fmt: skip
    parser.add_argument(
        "--pipelines", default="whole,split,replicas",
        help="comma-separated, run in this order: whole (the original on one board), split "
        "(N sub-models on N boards), replicas (the original on N boards sharing the frames); "
        "default %(default)s",
    )  # fmt: skip
    parser.add_argument("--preset", default="rpi4", help="the board type (default %(default)s)")
    parser.add_argument("--cpu", type=float, help="override: cores of this machine")
    parser.add_argument("--memory-mb", type=int, help="override: the board's memory limit")
    parser.add_argument("--rate-mbit", type=float, help="override: link rate")
    parser.add_argument("--delay-ms", type=float, help="override: added latency, each way")
    parser.add_argument("--fps", type=float, default=5.0, help="the latency run's one camera")
    parser.add_argument(
        "--saturate-fps", type=float, default=50.0,
        help="per camera, 4 cameras, for the throughput run (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=5.0, help="camera time per run")
    parser.add_argument(
        "--ready-timeout", type=float, default=120.0,
        help="seconds for the boards to load their models (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--aggregator-timeout-ms", type=float, default=250.0,
        help="the aggregator's --timeout-ms: how long a frame waits for the split's slowest "
        "board before it is answered degraded (default %(default)s, the aggregator's)",
    )  # fmt: skip
    _json_option(parser)
    parser.set_defaults(log_level="WARNING")


def _boards(args: argparse.Namespace) -> int:
    from edvit.fleet.bench.boards import bench_boards, parse_pipelines
    from edvit.fleet.boards.boards import board_spec

    pipelines = parse_pipelines(args.pipelines)
    overrides = {
        key: getattr(args, key) for key in ("cpu", "memory_mb", "rate_mbit", "delay_ms")
        if getattr(args, key) is not None
    }  # fmt: skip
    board = board_spec({"id": "node-0", "preset": args.preset, **overrides}, "bench boards")
    bench_boards(
        [bundle_path(b) for b in args.bundle or [None]], board, args.fps, args.saturate_fps,
        args.seconds, _json_path(args), args.monolithic_maker(), pipelines, args.ready_timeout,
        args.aggregator_timeout_ms,
    )  # fmt: skip
    return 0


# Camera frame sizes of `bench frame`: the model's input, VGA, 720p, 1080p.
FRAME_SIZES = ((224, 224), (640, 480), (1280, 720), (1920, 1080))


def _frame_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", type=frame_size, nargs="+", default=list(FRAME_SIZES), metavar="WxH",
        help="camera frame sizes (default: "
        + " ".join(f"{w}x{h}" for w, h in FRAME_SIZES) + ")",
    )  # fmt: skip
    parser.add_argument(
        "--bundle",
        help="take the model's input from this bundle (default: 224x224 RGB) and measure its "
        "slowest sub-model in the same run",
    )
    parser.add_argument(
        "--inference-ms", type=float, nargs="*", default=[], metavar="MS",
        help="sub-model latencies to give each frame path's share of",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per figure")
    parser.add_argument("--no-mqtt", action="store_true", help="skip the broker trip")
    _json_option(parser)
    parser.set_defaults(log_level="WARNING")


def _frame(args: argparse.Namespace) -> int:
    from edvit.fleet.bench.frame import bench_frame

    bench_frame(
        args.sizes, Path(args.bundle) if args.bundle else None,
        args.inference_ms, args.repeats, not args.no_mqtt, _json_path(args),
    )  # fmt: skip
    return 0


def _e2e_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "bundle", nargs="?", help="bundle folder (default: the shipped Fashion-MNIST bundle)"
    )
    # Checked by the benchmark (ConfigError), so the command and the function agree.
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--fps", type=float, default=10.0, help="frames per second per camera")
    parser.add_argument("--seconds", type=float, default=5.0, help="camera time per run")
    _json_option(parser)
    parser.set_defaults(log_level="WARNING")  # its progress lines are the story; logs go to files


def _e2e(args: argparse.Namespace) -> int:
    from edvit.fleet.bench.e2e import bench_e2e

    bench_e2e(
        bundle_path(args.bundle), args.cameras, args.fps, args.seconds, _json_path(args),
        args.monolithic_maker(),
    )  # fmt: skip
    return 0


@dataclass(frozen=True)
class Bench:
    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


BENCHES = (
    Bench(
        "batching", "K simulated cameras against one node",
        "K simulated cameras against one node, batching off and on",
        _batching_arguments, _batching,
    ),
    Bench(
        "slicing", "head slices J = 0..K on the cameras, one node",
        "bytes on the wire and node CPU per frame for J = 0..K head slices, "
        "for both node strategies",
        _slicing_arguments, _slicing,
    ),
    Bench(
        "scale", "node replicas and aggregator shards under load",
        "served fps of nodes, aggregator and predictions with R replicas of every "
        "node and S aggregator shards, every process on this machine (README, \"Scale-out\")",
        _scale_arguments, _scale,
    ),
    Bench(
        "chaos", "kill, freeze and restart parts of a 3-node fleet",
        "a 3-node fleet on a local mosquitto with a camera at 20 fps; kills, "
        "freezes and restarts nodes, the serving aggregator and the broker, and measures how "
        "the fleet answers",
        chaos_cli.add_arguments, chaos_cli.run,
    ),
    Bench(
        "boards", "whole on one emulated board vs split on N vs N replicas",
        "the original served whole on one emulated board, the split bundle on N boards of "
        "the same type and the original on N replica boards (N: the bundle's sub-model count; "
        "the shipped bundle has 3, --bundle for others): latency, served fps under "
        "saturation, memory, CPU, and whether the model fits the board (needs root; README, "
        "\"Emulated boards\")",
        _boards_arguments, _boards,
    ),
    Bench(
        "frame", "what decoding one camera JPEG frame costs a node",
        "per camera frame size: the message, the JPEG decode, resize and normalisation into "
        "the model's input in full and on the node's path (large JPEGs decoded only as large "
        "as the input needs), and the frame's one-way trip through a local mosquitto",
        _frame_arguments, _frame,
    ),
    Bench(
        "e2e", "pipeline latency against its floor, split and whole",
        "the floor (each model at batch 1, one thread; the broker's one-way "
        "latency; decode), then simulated cameras through the split fleet and through the "
        "original served whole by one node: p50/p95 and the median per stage, against the floor",
        _e2e_arguments, _e2e,
    ),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for bench in BENCHES:
        sub = benches.add_parser(
            bench.name, parents=[shared_options()], help=bench.help,
            description=bench.description,
        )  # fmt: skip
        bench.add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    return next(b for b in BENCHES if b.name == args.bench).run(args)
