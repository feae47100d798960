"""`edvit aggregator`: fuse the nodes' features into predictions; shard 0's instance also runs
the planner that re-places the sub-models of nodes that go down."""

from __future__ import annotations

import argparse
import socket

from edvit.aggregator.planner import DOWN_CONFIRM_S, RECONNECT_GRACE_S
from edvit.command import (
    Service,
    connection,
    metrics_options,
    non_negative_float,
    plan_keys,
    positive_float,
    positive_int,
    run_services,
    serve_metrics,
    sign_key_option,
    state_dir,
    state_dir_option,
    trust_key_option,
)
from edvit.errors import ConfigError
from edvit.topics import DEFAULT_HA_PREFIX, Topics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    metrics_options(parser)
    parser.add_argument(
        "--timeout-ms", type=positive_float, default=250.0,
        help="the longest a frame waits for a serving node's features before it is answered "
        "with what arrived (degraded); the adaptive deadline's cap (default %(default)g)",
    )  # fmt: skip
    parser.add_argument(
        "--deadline-floor-ms", type=positive_float, default=20.0,
        help="the adaptive deadline's floor (default %(default)g)",
    )  # fmt: skip
    parser.add_argument(
        "--deadline-factor", type=positive_float, default=4.0,
        help="deadline = factor x the 95th percentile of recent feature arrival spreads "
        "(default %(default)g)",
    )  # fmt: skip
    parser.add_argument(
        "--id",
        help="this instance's id among several aggregators (default HOST-N: the lowest N no "
        "other aggregator on this host holds, so the same after a restart)",
    )  # fmt: skip
    parser.add_argument(
        "--no-planner", action="store_true",
        help="do not re-place the sub-models of nodes that go down",
    )  # fmt: skip
    parser.add_argument(
        "--hold-off-s", type=non_negative_float, default=5.0,
        help="a node that was down gets its sub-models back after being up this long "
        "(default %(default)g)",
    )  # fmt: skip
    parser.add_argument(
        "--reconnect-grace-s", type=non_negative_float, default=RECONNECT_GRACE_S,
        help="after this aggregator reconnects to the broker, judge no node down for this "
        "long while nodes announce themselves again (default %(default)g)",
    )  # fmt: skip
    parser.add_argument(
        "--down-confirm-s", type=non_negative_float, default=DOWN_CONFIRM_S,
        help="move a node's sub-models once its status has said offline this long, the "
        "aggregator connected throughout (default %(default)g)",
    )  # fmt: skip
    parser.add_argument(
        "--lease-ttl-s", type=positive_float, default=3.0,
        help="a standby takes over after hearing nothing from the serving aggregator for "
        "this long (default %(default)g)",
    )  # fmt: skip
    parser.add_argument("--topk", type=positive_int, default=3)
    parser.add_argument(
        "--shard", metavar="I/N",
        help="answer only the cameras whose id hashes (crc32) to shard I of N; each shard has "
        "its own lease, and only shard 0 runs the planner (README, \"Scale-out\")",
    )  # fmt: skip
    parser.add_argument(
        "--ha-discovery", action="store_true",
        help="announce each camera to Home Assistant (MQTT discovery) as a sensor whose "
        "state is the predicted class; README, \"Home Assistant\"",
    )  # fmt: skip
    parser.add_argument(
        "--ha-prefix",
        help=f"Home Assistant's discovery prefix (default {DEFAULT_HA_PREFIX})",
    )  # fmt: skip
    trust_key_option(parser)
    state_dir_option(parser)
    sign_key_option(
        parser, "sign the plans the planner re-places with this Ed25519 key (needed to heal a "
        "fleet that takes signed plans; trusts its public half)",
    )  # fmt: skip


def ha_prefix(args: argparse.Namespace) -> str | None:
    """The discovery prefix to announce under (None: no discovery)."""
    if not args.ha_discovery:
        if args.ha_prefix is not None:
            raise ConfigError("--ha-prefix without --ha-discovery announces nothing")
        return None
    return DEFAULT_HA_PREFIX if args.ha_prefix is None else args.ha_prefix


def run(args: argparse.Namespace) -> int:
    from edvit.aggregator.service import Aggregator, DeadlinePolicy, Shard

    trust_key, sign_key = plan_keys(args)
    deadline = DeadlinePolicy(
        floor_s=args.deadline_floor_ms / 1000.0, cap_s=args.timeout_ms / 1000.0,
        factor=args.deadline_factor,
    )  # fmt: skip
    aggregator = Aggregator(
        connection(args), topics=Topics(args.prefix), deadline=deadline, topk=args.topk,
        instance=args.id, lease_ttl_s=args.lease_ttl_s, trust_key=trust_key,
        ha_prefix=ha_prefix(args),
        stats_interval_s=args.stats_interval_s,
        shard=Shard.parse(args.shard) if args.shard else None,
        state_dir=state_dir(args, "aggregator", args.id or socket.gethostname()),
    )  # fmt: skip
    serve_metrics(aggregator.metrics, args)
    services: list[Service] = []
    # One planner for the fleet: shard 0's (each shard holds a lease of its own).
    if not args.no_planner and (aggregator.shard is None or aggregator.shard.index == 0):
        from edvit.aggregator.planner import Planner

        # The planner shares the aggregator's connection and lease: only the aggregator
        # that answers plans, so exactly one plans and its standby takes over both.
        services.append(
            Planner(
                aggregator.client, aggregator.topics, instance=aggregator.instance,
                is_active=lambda: aggregator.answering, suspects=aggregator.suspect_nodes,
                hold_off_s=args.hold_off_s, trust_key=trust_key, sign_key=sign_key,
                reconnect_grace_s=args.reconnect_grace_s, down_confirm_s=args.down_confirm_s,
                sequence=aggregator.follower.sequence,
            )
        )  # fmt: skip
    return run_services(*services, aggregator)  # the aggregator connects, last
