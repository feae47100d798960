"""The `edvit` command: one subcommand per part of the system.

Errors a user can fix (bad arguments, files, datasets, an unreachable broker) print one
line and exit 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edvit import __version__
from edvit.errors import ConfigError, EdvitError
from edvit.metrics import STATS_INTERVAL_S, Metrics
from edvit.mqtt import DEFAULT_BROKER, MQTT_VERSIONS, Connection
from edvit.service import (
    configure_logging,
    ignore_stop_signals,
    stop_on_signals,
    wait_for_stop_signal,
)
from edvit.topics import DEFAULT_HA_PREFIX, DEFAULT_PREFIX, Topics

if TYPE_CHECKING:
    from edvit.fleet.bench_e2e import MakeMonolithic
    from edvit.signing import SigningKey, TrustKey

log = logging.getLogger("edvit")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def _common() -> argparse.ArgumentParser:
    # A new parser per subcommand: argparse parents share their Action objects, so one
    # subcommand's set_defaults would otherwise change every subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--broker",
        default=os.environ.get("EDVIT_BROKER", DEFAULT_BROKER),
        help="MQTT broker address, mqtt://HOST:PORT or mqtts://HOST:PORT for TLS; several, "
        "comma-separated, for a cluster: the first that answers, the next when it is lost "
        "(env EDVIT_BROKER; default %(default)s)",
    )
    # The login and TLS files (README, "Security"); a password only ever comes from a file.
    for option, env, text in (
        ("--ca", "EDVIT_CA", "CA certificate the broker's certificate must chain to"),
        ("--cert", "EDVIT_CERT", "this client's certificate (with --key)"),
        ("--key", "EDVIT_KEY", "this client's private key"),
        ("--username", "EDVIT_USERNAME", "MQTT username (a node's or camera's is its id)"),
        ("--password-file", "EDVIT_PASSWORD_FILE", "file holding the MQTT password"),
    ):
        common.add_argument(option, default=os.environ.get(env) or None, help=f"{text} (env {env})")
    common.add_argument(
        "--mqtt-version", choices=MQTT_VERSIONS,
        default=os.environ.get("EDVIT_MQTT_VERSION") or "auto",
        help="MQTT protocol: 5, 3.1.1, or auto: 5 unless the broker refuses it "
        "(env EDVIT_MQTT_VERSION; default %(default)s)",
    )  # fmt: skip
    common.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help="topic prefix (default %(default)s)"
    )
    common.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return common


def connection(args: argparse.Namespace) -> Connection:
    """The broker address and login every command's --broker and friends describe."""
    settings = Connection(
        args.broker, ca=args.ca, cert=args.cert, key=args.key, username=args.username,
        password_file=args.password_file, mqtt_version=args.mqtt_version,
    )  # fmt: skip
    settings.check()
    return settings


def _keys(args: argparse.Namespace) -> tuple[TrustKey | None, SigningKey | None]:
    """The plan keys a command was given (README, "Security"): ConfigError names a bad file.
    Holding the sign key means trusting its public half."""
    from edvit.signing import SigningKey, TrustKey

    sign = SigningKey.load(args.sign_key) if getattr(args, "sign_key", None) else None
    trust = TrustKey.load(args.trust_key) if getattr(args, "trust_key", None) else None
    if sign is not None and trust is not None and sign.key_id != trust.key_id:
        raise ConfigError(
            f"--sign-key {args.sign_key} is not the pair of --trust-key {args.trust_key}: "
            "the plans it signs would be refused"
        )
    return trust or (sign.trust if sign is not None else None), sign


def _metrics_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port", type=int, metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)",
    )  # fmt: skip
    parser.add_argument(
        "--metrics-host", default="0.0.0.0", help="address for --metrics-port (default %(default)s)"
    )
    parser.add_argument(
        "--stats-interval-s", type=_non_negative_float, default=STATS_INTERVAL_S,
        help="publish counters and stage times on the retained {prefix}/stats/... topic this "
        "often (0: never; default %(default)s)",
    )  # fmt: skip


def _serve_metrics(metrics: Metrics, args: argparse.Namespace) -> None:
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port, args.metrics_host)


def _run_service(*services: object) -> int:
    for service in services:
        service.start()  # type: ignore[attr-defined]
    try:
        wait_for_stop_signal()
    finally:
        for service in reversed(services):
            service.stop()  # type: ignore[attr-defined]
        ignore_stop_signals()  # stopped: a late stop signal must not turn exit 0 into -2
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from edvit.edge_node.node import EdgeNode

    node_id = f"node-{socket.gethostname()}" if args.id == "auto" else args.id
    node = EdgeNode(
        node_id, connection(args), topics=Topics(args.prefix), threads=args.threads,
        queue_size=args.queue_size, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        newest_only=not args.keep_all_frames, batch_wait=args.batch_wait, strategy=args.strategy,
        memory_mb=args.memory_mb, speed=args.speed, trust_key=_keys(args)[0],
        stats_interval_s=args.stats_interval_s,
    )  # fmt: skip
    _serve_metrics(node.metrics, args)
    return _run_service(node)


def _ha_prefix(args: argparse.Namespace) -> str | None:
    """The discovery prefix to announce under (None: no discovery)."""
    if not args.ha_discovery:
        if args.ha_prefix is not None:
            raise ConfigError("--ha-prefix without --ha-discovery announces nothing")
        return None
    return DEFAULT_HA_PREFIX if args.ha_prefix is None else args.ha_prefix


def cmd_aggregator(args: argparse.Namespace) -> int:
    from edvit.aggregator.service import Aggregator, DeadlinePolicy, Shard

    trust_key, sign_key = _keys(args)
    deadline = DeadlinePolicy(
        floor_s=args.deadline_floor_ms / 1000.0, cap_s=args.timeout_ms / 1000.0,
        factor=args.deadline_factor,
    )  # fmt: skip
    aggregator = Aggregator(
        connection(args), topics=Topics(args.prefix), deadline=deadline, topk=args.topk,
        instance=args.id, lease_ttl_s=args.lease_ttl_s, trust_key=trust_key,
        ha_prefix=_ha_prefix(args),
        stats_interval_s=args.stats_interval_s,
        shard=Shard.parse(args.shard) if args.shard else None,
    )  # fmt: skip
    _serve_metrics(aggregator.metrics, args)
    services: list[object] = []
    # One planner for the fleet: shard 0's (each shard holds a lease of its own).
    if not args.no_planner and (aggregator.shard is None or aggregator.shard.index == 0):
        from edvit.fleet.planner import Planner

        # The planner shares the aggregator's connection and lease: only the aggregator
        # that answers plans, so exactly one plans and its standby takes over both.
        services.append(
            Planner(
                aggregator.client, aggregator.topics, instance=aggregator.instance,
                is_active=lambda: aggregator.answering, suspects=aggregator.suspect_nodes,
                hold_off_s=args.hold_off_s, trust_key=trust_key, sign_key=sign_key,
            )
        )  # fmt: skip
    return _run_service(*services, aggregator)  # the aggregator connects, last


def cmd_camera(args: argparse.Namespace) -> int:
    from edvit.camera_source.camera import Camera

    camera = Camera(
        args.id, connection(args), args.source, fps=args.fps, count=args.count, loop=args.loop,
        enc=args.enc, data_dir=args.data_dir, topics=Topics(args.prefix),
        head_slices=args.head_slices, tokens_dtype=args.tokens_dtype, trust_key=_keys(args)[0],
        stats_interval_s=args.stats_interval_s,
    )  # fmt: skip
    _serve_metrics(camera.metrics, args)
    try:
        camera.run(stop_on_signals())
    finally:
        ignore_stop_signals()  # done: a late stop signal must not turn exit 0 into -2
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from edvit.bundle import Bundle
    from edvit.fleet.deploy import clear, deploy

    bundle = Bundle.load(args.bundle)
    topics = Topics(args.prefix)
    if args.clear:
        clear(bundle, connection(args), topics)
        print(f"cleared the plan and models of {args.bundle} from {args.broker}")
        return 0
    nodes = [n.strip() for n in args.nodes.split(",")] if args.nodes else None
    sign_key = _keys(args)[1]
    plan = deploy(
        bundle, connection(args), nodes, topics, sign_key=sign_key, replicas=args.replicas,
        wait_nodes=args.wait_nodes, wait_timeout=args.wait_timeout,
    )  # fmt: skip
    signed = f", signed by key {sign_key.key_id}" if sign_key is not None else ""
    print(f"deployed plan {plan.plan_id} to {args.broker}{signed}")
    for node, ids in plan.assignments.items():
        print(f"  {node}: {', '.join(ids) or '(nothing)'}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from edvit.fleet.watch import watch

    watch(
        connection(args), camera=args.camera, count=args.count, as_json=args.json,
        timings=args.timings, topics=Topics(args.prefix), stop=stop_on_signals(),
    )  # fmt: skip
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from edvit.fleet.dashboard import Dashboard, listen, require_web, serve

    require_web()
    sock = listen(args.host, args.port)
    dashboard = Dashboard(connection(args), topics=Topics(args.prefix), frames=args.frames)
    dashboard.start()
    try:
        print(f"edvit dashboard on http://{args.host}:{args.port}/", flush=True)
        serve(dashboard, sock)
    finally:
        dashboard.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edvit.fleet.demo import DEFAULT_BUNDLE, compare, run_demo

    if args.compare_plain and not args.secure:
        raise ConfigError("--compare-plain compares a --secure run with a plain one: add --secure")
    log_dir = Path(args.log_dir) if args.log_dir else None
    runs = [False, True] if args.compare_plain else [args.secure]
    summaries = [
        run_demo(
            Path(args.bundle) if args.bundle else DEFAULT_BUNDLE,
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


def cmd_broker(args: argparse.Namespace) -> int:
    from edvit.broker import cli as broker_cli

    return broker_cli.run(args)


def cmd_secure(args: argparse.Namespace) -> int:
    from edvit.fleet import secure

    return secure.run(args)


def cmd_build(args: argparse.Namespace) -> int:
    from edvit.models import cli as build_cli

    return build_cli.run(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from edvit.fleet import plan

    return plan.run(args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from edvit.models import evaluate

    return evaluate.run(args)


def cmd_bench_batching(args: argparse.Namespace) -> int:
    from edvit.fleet.bench import bench_batching
    from edvit.fleet.demo import DEFAULT_BUNDLE

    bench_batching(
        Path(args.bundle) if args.bundle else DEFAULT_BUNDLE, args.cameras, args.fps,
        args.seconds, Path(args.json) if args.json else None,
    )  # fmt: skip
    return 0


def cmd_bench_slicing(args: argparse.Namespace) -> int:
    from edvit.fleet.bench import bench_slicing

    bench_slicing(
        Path(args.bundle), args.cameras, args.fps, args.seconds,
        Path(args.json) if args.json else None, args.mixed_cameras, args.mixed_fps, args.rounds,
    )  # fmt: skip
    return 0


def _monolithic_maker() -> MakeMonolithic | None:
    """models/monolithic.py's bundle maker, or None without the onnx package (the
    benchmarks then say the monolithic rows are skipped, and why)."""
    try:
        from edvit.models.monolithic import monolithic_bundle
    except ModuleNotFoundError as exc:
        if exc.name != "onnx":
            raise
        return None
    return monolithic_bundle


def cmd_bench_e2e(args: argparse.Namespace) -> int:
    from edvit.fleet.bench_e2e import bench_e2e
    from edvit.fleet.demo import DEFAULT_BUNDLE

    bench_e2e(
        Path(args.bundle) if args.bundle else DEFAULT_BUNDLE, args.cameras, args.fps,
        args.seconds, Path(args.json) if args.json else None, _monolithic_maker(),
    )  # fmt: skip
    return 0


def cmd_bench_boards(args: argparse.Namespace) -> int:
    from edvit.fleet.bench_boards import bench_boards
    from edvit.fleet.boards import board_spec
    from edvit.fleet.demo import DEFAULT_BUNDLE

    make_monolithic = _monolithic_maker()
    overrides = {
        key: getattr(args, key) for key in ("cpu", "memory_mb", "rate_mbit", "delay_ms")
        if getattr(args, key) is not None
    }  # fmt: skip
    board = board_spec({"id": "node-0", "preset": args.preset, **overrides}, "bench boards")
    bench_boards(
        Path(args.bundle) if args.bundle else DEFAULT_BUNDLE, board, args.fps,
        args.saturate_fps, args.seconds, Path(args.json) if args.json else None, make_monolithic,
    )  # fmt: skip
    return 0


def cmd_bench_scale(args: argparse.Namespace) -> int:
    from edvit.fleet.bench_scale import bench_scale
    from edvit.fleet.demo import DEFAULT_BUNDLE

    bench_scale(
        Path(args.bundle) if args.bundle else DEFAULT_BUNDLE,
        [n.strip() for n in args.nodes.split(",")], args.replicas, args.shards, args.cameras,
        args.fps, args.seconds, Path(args.json) if args.json else None,
    )  # fmt: skip
    return 0


def cmd_bench_chaos(args: argparse.Namespace) -> int:
    from edvit.fleet.chaos import run_chaos
    from edvit.fleet.demo import DEFAULT_BUNDLE

    run_chaos(
        Path(args.bundle) if args.bundle else DEFAULT_BUNDLE, scenarios=tuple(args.scenarios),
        fps=args.fps, hold_off_s=args.hold_off_s, json_path=Path(args.json) if args.json else None,
        soak_s=args.soak_s,
    )  # fmt: skip
    return 0


def cmd_fleet_up(args: argparse.Namespace) -> int:
    from edvit.fleet import boards

    state = boards.up(boards.load_fleet(Path(args.boards)), Path(args.run_dir))
    print(boards.format_status([boards.board_status(b) for b in state.boards]))
    print(f"edvit fleet: {len(state.boards)} boards up on {state.broker} (run folder "
          f"{args.run_dir}); `edvit fleet down` takes them down")  # fmt: skip
    return 0


def cmd_fleet_down(args: argparse.Namespace) -> int:
    from edvit.fleet import boards

    taken = boards.down(Path(args.run_dir))
    print(f"edvit fleet: took down {', '.join(taken)}" if taken else "no emulated boards are up")
    return 0


def cmd_fleet_status(args: argparse.Namespace) -> int:
    import json

    from edvit.fleet import boards

    rows = boards.status(Path(args.run_dir))
    print(json.dumps(rows, indent=2) if args.json else boards.format_status(rows))
    return 0


def cmd_fleet_proxy(args: argparse.Namespace) -> int:
    from edvit.fleet import boards

    boards.serve_proxy(args.listen, args.target, args.delay_ms)
    return 0


def _trust_key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-key", default=os.environ.get("EDVIT_TRUST_KEY") or None, metavar="FILE",
        help="serve only plans signed by this Ed25519 public key (PEM, `secure init`'s "
        "signing/plan.pub); others are refused and the old plan keeps serving "
        "(env EDVIT_TRUST_KEY)",
    )  # fmt: skip


def _sign_key_option(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument(
        "--sign-key", default=os.environ.get("EDVIT_SIGN_KEY") or None, metavar="FILE",
        help=f"{text} (PEM, `secure init`'s signing/plan.key; env EDVIT_SIGN_KEY)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from edvit.broker import cli as broker_cli
    from edvit.fleet import plan, secure
    from edvit.models import cli as build_cli
    from edvit.models import evaluate

    parser = argparse.ArgumentParser(
        prog="edvit", description="Vision Transformers split across IoT boards over MQTT."
    )
    parser.add_argument("--version", action="version", version=f"edvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int], text: str):
        p = sub.add_parser(name, parents=[_common()], help=text, description=text)
        p.set_defaults(handler=handler)
        return p

    p = add("broker", cmd_broker, "start a local MQTT broker (mosquitto, else embedded amqtt)")
    broker_cli.add_arguments(p)

    p = add("secure", cmd_secure, "CA, certificates, passwords and ACL for a TLS broker")
    secure.add_arguments(p)

    p = add("build", cmd_build, "train a ViT, make class-wise sub-models and fusion, export ONNX")
    build_cli.add_arguments(p)

    p = add("plan", cmd_plan, "place a bundle's sub-models on a device inventory (no retraining)")
    plan.add_arguments(p)

    p = add("evaluate", cmd_evaluate, "size, FLOPs, latency and accuracy figures of a bundle")
    evaluate.add_arguments(p)

    p = add("deploy", cmd_deploy, "publish a bundle's plan and model files as retained messages")
    p.add_argument("bundle", help="bundle folder written by `edvit build`")
    p.add_argument(
        "--nodes",
        help="comma-separated node ids, sub-models round-robin (default: the bundle's "
        "assignment.json, else node-0..node-N-1)",
    )
    p.add_argument(
        "--replicas", type=int, default=1,
        help="nodes per share (default 1): NODE-r1, NODE-r2, ... get NODE's sub-models and "
        "split its frames through shared subscriptions (README, \"Scale-out\")",
    )  # fmt: skip
    p.add_argument(
        "--wait-nodes", type=_positive_int, metavar="N",
        help="wait until N nodes have announced themselves (a retained status that is not "
        "offline), then place the sub-models round-robin over every node announced by then "
        "(nodes beyond the sub-model count become replicas); for nodes started with "
        "`--id auto` (compose's `--scale node=N`)",
    )  # fmt: skip
    p.add_argument(
        "--wait-timeout", type=_positive_float, default=120.0, metavar="S",
        help="give up waiting for the nodes after S seconds (default 120)",
    )  # fmt: skip
    p.add_argument("--clear", action="store_true", help="remove the plan and models instead")
    _sign_key_option(p, "sign the plan (it pins every model by sha256) with this Ed25519 key")

    p = add("node", cmd_node, "edge node: run assigned sub-models, publish feature vectors")
    _metrics_options(p)
    p.add_argument(
        "--id", required=True,
        help="this node's id, as the plan names it; `auto`: node-HOSTNAME (in a container the "
        "hostname is the container id: distinct per replica, kept across restarts)",
    )  # fmt: skip
    _trust_key_option(p)
    p.add_argument("--threads", type=_positive_int, default=1, help="ONNX Runtime threads")
    p.add_argument(
        "--queue-size", type=_positive_int, default=64,
        help="frames waiting at most; the oldest is dropped beyond this",
    )  # fmt: skip
    p.add_argument(
        "--max-batch", type=_positive_int, default=4,
        help="run a batch when this many frames wait (1 = batching off)",
    )  # fmt: skip
    p.add_argument(
        "--max-wait-ms", type=_non_negative_float, default=1.0,
        help="or when the oldest waiting frame has waited this long",
    )  # fmt: skip
    p.add_argument(
        "--batch-wait", choices=["adaptive", "fixed"], default="adaptive",
        help="adaptive: wait --max-wait-ms only while frames arrive closer together than "
        "that (an idle node serves a lone frame at once); fixed: always wait",
    )  # fmt: skip
    p.add_argument(
        "--strategy", choices=["per-entry", "merged"], default="per-entry",
        help="sliced bundles: one stem session per entry block (faster, more memory) or one "
        "per block with late entries joining the running batch (less memory)",
    )  # fmt: skip
    p.add_argument(
        "--memory-mb", type=_positive_float,
        help="memory this node offers for model files; plans needing more are refused and "
        "the planner places nothing beyond it (default: the memory available at start)",
    )  # fmt: skip
    p.add_argument(
        "--speed", type=_positive_float, default=1.0,
        help="relative speed, for the planner (default %(default)g)",
    )  # fmt: skip
    p.add_argument(
        "--keep-all-frames", action="store_true",
        help="queue every frame instead of keeping only each camera's newest waiting one",
    )  # fmt: skip

    p = add("aggregator", cmd_aggregator, "fuse features into predictions")
    _metrics_options(p)
    p.add_argument(
        "--timeout-ms", type=_positive_float, default=250.0,
        help="the longest a frame waits for a serving node's features before it is answered "
        "with what arrived (degraded); the adaptive deadline's cap (default %(default)g)",
    )  # fmt: skip
    p.add_argument(
        "--deadline-floor-ms", type=_positive_float, default=20.0,
        help="the adaptive deadline's floor (default %(default)g)",
    )  # fmt: skip
    p.add_argument(
        "--deadline-factor", type=_positive_float, default=4.0,
        help="deadline = factor x the 95th percentile of recent feature arrival spreads "
        "(default %(default)g)",
    )  # fmt: skip
    p.add_argument(
        "--id",
        help="this instance's id among several aggregators (default HOST-N: the lowest N no "
        "other aggregator on this host holds, so the same after a restart)",
    )  # fmt: skip
    p.add_argument(
        "--no-planner", action="store_true",
        help="do not re-place the sub-models of nodes that go down",
    )  # fmt: skip
    p.add_argument(
        "--hold-off-s", type=_non_negative_float, default=5.0,
        help="a node that was down gets its sub-models back after being up this long "
        "(default %(default)g)",
    )  # fmt: skip
    p.add_argument(
        "--lease-ttl-s", type=_positive_float, default=3.0,
        help="a standby takes over after hearing nothing from the serving aggregator for "
        "this long (default %(default)g)",
    )  # fmt: skip
    p.add_argument("--topk", type=_positive_int, default=3)
    p.add_argument(
        "--shard", metavar="I/N",
        help="answer only the cameras whose id hashes (crc32) to shard I of N; each shard has "
        "its own lease, and only shard 0 runs the planner (README, \"Scale-out\")",
    )  # fmt: skip
    p.add_argument(
        "--ha-discovery", action="store_true",
        help="announce each camera to Home Assistant (MQTT discovery) as a sensor whose "
        "state is the predicted class; README, \"Home Assistant\"",
    )  # fmt: skip
    p.add_argument(
        "--ha-prefix",
        help=f"Home Assistant's discovery prefix (default {DEFAULT_HA_PREFIX})",
    )  # fmt: skip
    _trust_key_option(p)
    _sign_key_option(
        p, "sign the plans the planner re-places with this Ed25519 key (needed to heal a "
        "fleet that takes signed plans; trusts its public half)",
    )  # fmt: skip

    p = add("camera", cmd_camera, "publish frames from a video, device, stream or dataset")
    _metrics_options(p)
    p.add_argument("--id", required=True, help="camera id")
    p.add_argument(
        "--source", required=True,
        help="dataset:NAME (test split with labels), a video or image FILE, a DEVICE_INDEX "
        "or an rtsp://… URL",
    )  # fmt: skip
    p.add_argument("--fps", type=_positive_float, default=10.0)
    p.add_argument("--count", type=_positive_int, help="stop after this many frames")
    p.add_argument("--loop", action="store_true", help="start the source again at its end")
    p.add_argument("--enc", choices=["jpeg", "png", "raw"], help="default png for datasets")
    p.add_argument("--data-dir", help="dataset folder (e.g. Fashion-MNIST IDX files)")
    p.add_argument(
        "--head-slices", type=int, default=0, metavar="J",
        help="run the first J shared stem blocks here and send tokens (sliced bundles)",
    )  # fmt: skip
    p.add_argument("--tokens-dtype", choices=["float32", "float16"], default="float32")
    _trust_key_option(p)

    p = add("watch", cmd_watch, "print live predictions")
    p.add_argument("--camera", default="+", help="only this camera")
    p.add_argument("--count", type=_positive_int, help="exit after this many predictions")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--timings", action="store_true",
        help="under each prediction, where its milliseconds went (ms per stage)",
    )  # fmt: skip

    p = add("dashboard", cmd_dashboard, "the fleet live in a browser (needs the dashboard extra)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default %(default)s)")
    p.add_argument(
        "--frames", action="store_true",
        help="also show each camera's latest frame (off by default: the most sensitive data; "
        "the identity must be allowed to read frames, `secure init --dashboard-sees-frames`)",
    )  # fmt: skip

    p = add(
        "bench", cmd_bench_batching,
        "benchmarks: `batching`, `slicing`, `scale`, `chaos`, `e2e` (latency against its floor) "
        "or `boards` (emulated boards)",
    )  # fmt: skip
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    p = benches.add_parser(
        "batching", parents=[_common()], help="K simulated cameras against one node",
        description="K simulated cameras against one node, batching off and on",
    )  # fmt: skip
    p.set_defaults(handler=cmd_bench_batching)
    p.add_argument("--bundle", help="bundle folder (default: the shipped Fashion-MNIST bundle)")
    p.add_argument("--cameras", type=_positive_int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--fps", type=_positive_float, default=30.0, help="frames per second per camera")
    p.add_argument("--seconds", type=_positive_float, default=8.0, help="measured time per run")
    p.add_argument("--json", help="also write the results here")
    p = benches.add_parser(
        "slicing", parents=[_common()], help="head slices J = 0..K on the cameras, one node",
        description="bytes on the wire and node CPU per frame for J = 0..K head slices, "
        "for both node strategies",
    )  # fmt: skip
    p.set_defaults(handler=cmd_bench_slicing)
    p.add_argument("bundle", help="a bundle built with --shared-blocks K")
    p.add_argument("--cameras", type=_positive_int, default=4)
    p.add_argument("--fps", type=_positive_float, default=25.0, help="frames per second per camera")
    p.add_argument("--seconds", type=_positive_float, default=6.0, help="measured time per run")
    p.add_argument("--json", help="also write the results here")
    p.add_argument(
        "--mixed-cameras", type=_non_negative_int, default=16,
        help="then this many cameras spread over J = 0..K, for both strategies (0: skip)",
    )  # fmt: skip
    p.add_argument("--mixed-fps", type=_positive_float, default=100.0, help="per mixed camera")
    p.add_argument(
        "--rounds", type=_positive_int, default=3,
        help="runs per J and strategy, interleaved; the table keeps the least node CPU (default 3)",
    )  # fmt: skip

    p = benches.add_parser(
        "scale", parents=[_common()], help="node replicas and aggregator shards under load",
        description="served fps of nodes, aggregator and predictions with R replicas of every "
        "node and S aggregator shards, every process on this machine (README, \"Scale-out\")",
    )  # fmt: skip
    p.set_defaults(handler=cmd_bench_scale)
    p.add_argument("--bundle", help="bundle folder (default: the shipped Fashion-MNIST bundle)")
    p.add_argument(
        "--nodes", default="node-0",
        help="the nodes before replicas, sub-models round-robin (default: one node runs all)",
    )  # fmt: skip
    p.add_argument("--replicas", type=_positive_int, nargs="+", default=[1, 2, 4])
    p.add_argument("--shards", type=_positive_int, nargs="+", default=[1, 2])
    p.add_argument("--cameras", type=_positive_int, default=16)
    p.add_argument("--fps", type=_positive_float, default=100.0, help="per camera (default 100)")
    p.add_argument("--seconds", type=_positive_float, default=5.0, help="measured time per run")
    p.add_argument("--json", help="also write the results here")

    p = benches.add_parser(
        "chaos", parents=[_common()], help="kill, freeze and restart parts of a 3-node fleet",
        description="a 3-node fleet on a local mosquitto with a camera at 20 fps; kills, "
        "freezes and restarts nodes, the serving aggregator and the broker, and measures how "
        "the fleet answers",
    )  # fmt: skip
    p.set_defaults(handler=cmd_bench_chaos)
    p.add_argument("--bundle", help="bundle folder (default: the shipped Fashion-MNIST bundle)")
    p.add_argument(
        "--scenarios", nargs="+",
        choices=["kill", "freeze", "cut", "failover", "broker", "hostile", "soak"],
        default=["kill", "freeze", "cut", "failover", "broker", "hostile"],
    )  # fmt: skip
    p.add_argument(
        "--soak-s", type=_positive_float, default=600.0,
        help="length of the soak scenario (opt-in: --scenarios soak)",
    )  # fmt: skip
    p.add_argument("--fps", type=_positive_float, default=20.0)
    p.add_argument("--hold-off-s", type=_non_negative_float, default=3.0)
    p.add_argument("--json", help="also write the results here")

    p = benches.add_parser(
        "boards", parents=[_common()], help="whole on one emulated board vs split on N",
        description="the original served whole on one emulated board against the split bundle "
        "on N boards of the same type (N: the bundle's sub-model count; the shipped bundle has "
        "3, --bundle for another): latency, served fps under saturation, memory, CPU, and "
        "whether the model fits the board (needs root; README, \"Emulated boards\")",
    )  # fmt: skip
    p.set_defaults(handler=cmd_bench_boards)
    p.add_argument("--bundle", help="bundle folder (default: the shipped Fashion-MNIST bundle)")
    p.add_argument("--preset", default="rpi4", help="the board type (default %(default)s)")
    p.add_argument("--cpu", type=float, help="override: cores of this machine")
    p.add_argument("--memory-mb", type=int, help="override: the board's memory limit")
    p.add_argument("--rate-mbit", type=float, help="override: link rate")
    p.add_argument("--delay-ms", type=float, help="override: added latency, each way")
    p.add_argument("--fps", type=float, default=5.0, help="the latency run's one camera")
    p.add_argument(
        "--saturate-fps", type=float, default=50.0,
        help="per camera, 4 cameras, for the throughput run (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--seconds", type=float, default=5.0, help="camera time per run")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(log_level="WARNING")

    p = benches.add_parser(
        "e2e", parents=[_common()], help="pipeline latency against its floor, split and whole",
        description="the floor (each model at batch 1, one thread; the broker's one-way "
        "latency; decode), then simulated cameras through the split fleet and through the "
        "original served whole by one node: p50/p95 and the median per stage, against the floor",
    )  # fmt: skip
    p.set_defaults(handler=cmd_bench_e2e)
    p.add_argument(
        "bundle", nargs="?", help="bundle folder (default: the shipped Fashion-MNIST bundle)"
    )
    # Checked by the benchmark (ConfigError), so the command and the function agree.
    p.add_argument("--cameras", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--fps", type=float, default=10.0, help="frames per second per camera")
    p.add_argument("--seconds", type=float, default=5.0, help="camera time per run")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(log_level="WARNING")  # its progress lines are the story; logs go to files

    _fleet_commands(sub)

    p = add("demo", cmd_demo, "run broker, nodes, aggregator and a camera locally")
    p.add_argument("--bundle", help="bundle folder (default: the shipped Fashion-MNIST bundle)")
    p.add_argument("--frames", type=_positive_int, default=200)
    p.add_argument("--fps", type=_positive_float, default=25.0)
    p.add_argument("--broker-kind", choices=["auto", "mosquitto", "embedded"], default="auto")
    p.add_argument("--log-dir", help="where the processes' logs go (default a temp folder)")
    p.add_argument(
        "--secure", action="store_true",
        help="over TLS, each process with its own account and the ACL (a fresh `secure init` "
        "in the log folder; needs mosquitto)",
    )  # fmt: skip
    p.add_argument(
        "--compare-plain", action="store_true",
        help="with --secure: run the same frames over plain MQTT first and compare latencies",
    )  # fmt: skip
    p.add_argument("--timings", action="store_true", help="show each prediction's ms per stage")
    p.set_defaults(log_level="WARNING")  # the demo's own output is the story; logs go to files
    return parser


def _fleet_commands(sub: argparse._SubParsersAction) -> None:
    from edvit.fleet.boards import DEFAULT_RUN_DIR, PRESETS

    text = "edge nodes on emulated boards: `up BOARDS.yaml`, `status`, `down` (needs root)"
    fleet = sub.add_parser("fleet", help=text, description=text)
    commands = fleet.add_subparsers(dest="fleet", required=True, metavar="ACTION")

    def add(name: str, handler: Callable[[argparse.Namespace], int], text: str):
        # Not _common(): the broker and prefix of the boards come from BOARDS.yaml.
        p = commands.add_parser(name, help=text, description=text)
        p.set_defaults(handler=handler, prefix=DEFAULT_PREFIX)
        p.add_argument(
            "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
        )
        p.add_argument(
            "--run-dir", default=str(DEFAULT_RUN_DIR),
            help="where the fleet's state and logs live (default %(default)s)",
        )  # fmt: skip
        return p

    p = add(
        "up", cmd_fleet_up,
        "each board a node in its own network namespace with a CPU quota, a memory limit, "
        f"a rate-limited link and added latency; presets: {', '.join(PRESETS)}",
    )  # fmt: skip
    p.add_argument("boards", metavar="BOARDS.yaml")
    add("down", cmd_fleet_down, "stop the boards' nodes, remove namespaces, links and cgroups")
    p = add("status", cmd_fleet_status, "each board: its shape, its node, RSS, CPU, OOM kills")
    p.add_argument("--json", action="store_true", help="as JSON")
    p = add("proxy", cmd_fleet_proxy, "a board's link proxy (what `up` runs, one per board)")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="the broker")
    p.add_argument("--delay-ms", type=_non_negative_float, default=0.0, help="each way")


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
