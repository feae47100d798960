"""`edvit camera`: publish frames from a video, device, stream or dataset."""

from __future__ import annotations

import argparse

from edvit.command import (
    connection,
    frame_size,
    metrics_options,
    plan_keys,
    positive_float,
    positive_int,
    serve_metrics,
    state_dir,
    state_dir_option,
    trust_key_option,
)
from edvit.service import ignore_stop_signals, stop_on_signals
from edvit.topics import Topics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    metrics_options(parser)
    parser.add_argument("--id", required=True, help="camera id")
    parser.add_argument(
        "--source", required=True,
        help="dataset:NAME (test split with labels), a video or image FILE, a DEVICE_INDEX "
        "or an rtsp://… URL",
    )  # fmt: skip
    parser.add_argument("--fps", type=positive_float, default=10.0)
    parser.add_argument("--count", type=positive_int, help="stop after this many frames")
    parser.add_argument("--loop", action="store_true", help="start the source again at its end")
    parser.add_argument("--enc", choices=["jpeg", "png", "raw"], help="default png for datasets")
    parser.add_argument("--data-dir", help="dataset folder (e.g. Fashion-MNIST IDX files)")
    parser.add_argument(
        "--size", type=frame_size, metavar="WxH",
        help="resize every frame to this before encoding it; the model's input size (e.g. "
        "224x224) leaves the nodes nothing to resize and a small JPEG to decode",
    )  # fmt: skip
    parser.add_argument(
        "--head-slices", type=int, default=0, metavar="J",
        help="run the first J shared stem blocks here and send tokens (sliced bundles)",
    )  # fmt: skip
    parser.add_argument("--tokens-dtype", choices=["float32", "float16"], default="float32")
    trust_key_option(parser)
    state_dir_option(parser)


def run(args: argparse.Namespace) -> int:
    from edvit.camera_source.camera import Camera

    camera = Camera(
        args.id, connection(args), args.source, fps=args.fps, count=args.count, loop=args.loop,
        enc=args.enc, data_dir=args.data_dir, topics=Topics(args.prefix),
        head_slices=args.head_slices, tokens_dtype=args.tokens_dtype,
        trust_key=plan_keys(args)[0], stats_interval_s=args.stats_interval_s,
        state_dir=state_dir(args, "camera", args.id),
        size=args.size,
    )  # fmt: skip
    serve_metrics(camera.metrics, args)
    try:
        camera.run(stop_on_signals())
    finally:
        ignore_stop_signals()  # done: a late stop signal must not turn exit 0 into -2
    return 0
