"""`edvit node`: an edge node that runs its assigned sub-models and publishes feature vectors."""

from __future__ import annotations

import argparse
import socket

from edvit.command import (
    connection,
    metrics_options,
    non_negative_float,
    plan_keys,
    positive_float,
    positive_int,
    run_services,
    serve_metrics,
    state_dir,
    state_dir_option,
    trust_key_option,
)
from edvit.topics import Topics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    metrics_options(parser)
    parser.add_argument(
        "--id", required=True,
        help="this node's id, as the plan names it; `auto`: node-HOSTNAME (in a container the "
        "hostname is the container id: distinct per replica, kept across restarts)",
    )  # fmt: skip
    trust_key_option(parser)
    state_dir_option(parser)
    parser.add_argument("--threads", type=positive_int, default=1, help="ONNX Runtime threads")
    parser.add_argument(
        "--queue-size", type=positive_int, default=64,
        help="frames waiting at most; the oldest is dropped beyond this",
    )  # fmt: skip
    parser.add_argument(
        "--max-batch", type=positive_int, default=4,
        help="run a batch when this many frames wait (1 = batching off)",
    )  # fmt: skip
    parser.add_argument(
        "--max-wait-ms", type=non_negative_float, default=1.0,
        help="or when the oldest waiting frame has waited this long",
    )  # fmt: skip
    parser.add_argument(
        "--batch-wait", choices=["adaptive", "fixed"], default="adaptive",
        help="adaptive: wait --max-wait-ms only while frames arrive closer together than "
        "that (an idle node serves a lone frame at once); fixed: always wait",
    )  # fmt: skip
    parser.add_argument(
        "--strategy", choices=["per-entry", "merged"], default="per-entry",
        help="sliced bundles: one stem session per entry block (faster, more memory) or one "
        "per block with late entries joining the running batch (less memory)",
    )  # fmt: skip
    parser.add_argument(
        "--memory-mb", type=positive_float,
        help="memory this node offers for model files; plans needing more are refused and "
        "the planner places nothing beyond it (default: the memory available at start)",
    )  # fmt: skip
    parser.add_argument(
        "--speed", type=positive_float, default=1.0,
        help="relative speed, for the planner (default %(default)g)",
    )  # fmt: skip
    parser.add_argument(
        "--keep-all-frames", action="store_true",
        help="queue every frame instead of keeping only each camera's newest waiting one",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from edvit.edge_node.node import EdgeNode

    node_id = f"node-{socket.gethostname()}" if args.id == "auto" else args.id
    node = EdgeNode(
        node_id, connection(args), topics=Topics(args.prefix), threads=args.threads,
        queue_size=args.queue_size, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        newest_only=not args.keep_all_frames, batch_wait=args.batch_wait, strategy=args.strategy,
        memory_mb=args.memory_mb, speed=args.speed, trust_key=plan_keys(args)[0],
        stats_interval_s=args.stats_interval_s, state_dir=state_dir(args, "node", node_id),
    )  # fmt: skip
    serve_metrics(node.metrics, args)
    return run_services(node)
