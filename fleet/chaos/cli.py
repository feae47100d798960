"""`edvit bench chaos`: kill, freeze and restart parts of a 3-node fleet and measure how it
answers (the scenarios are in scenarios.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edvit.command import non_negative_float, positive_float
from edvit.fleet.chaos.catalog import DEFAULT_SCENARIO_NAMES, SCENARIO_NAMES
from edvit.fleet.ops.demo import bundle_option, bundle_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bundle_option(parser)
    parser.add_argument(
        "--scenarios", nargs="+", choices=SCENARIO_NAMES, default=DEFAULT_SCENARIO_NAMES,
        help="scenarios to run; `partitions` is the partition matrix (broker restarts, links "
        "cut, a cluster node lost); default %(default)s",
    )  # fmt: skip
    parser.add_argument(
        "--soak-s", type=positive_float, default=600.0,
        help="length of the soak scenario (opt-in: --scenarios soak)",
    )  # fmt: skip
    parser.add_argument("--fps", type=positive_float, default=20.0)
    parser.add_argument("--hold-off-s", type=non_negative_float, default=3.0)
    parser.add_argument("--json", help="also write the results here")


def run(args: argparse.Namespace) -> int:
    from edvit.fleet.chaos.scenarios import run_chaos

    run_chaos(
        bundle_path(args.bundle), scenarios=tuple(args.scenarios),
        fps=args.fps, hold_off_s=args.hold_off_s, json_path=Path(args.json) if args.json else None,
        soak_s=args.soak_s,
    )  # fmt: skip
    return 0
