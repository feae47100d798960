"""`edvit fleet up|down|status|proxy`: edge nodes on emulated boards (needs root).

Not the shared broker options: the broker and prefix of the boards come from BOARDS.yaml.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from edvit.command import LOG_LEVELS, non_negative_float
from edvit.fleet.boards import boards
from edvit.fleet.boards.boards import DEFAULT_RUN_DIR, PRESETS
from edvit.topics import DEFAULT_PREFIX


def up(args: argparse.Namespace) -> int:
    state = boards.up(boards.load_fleet(Path(args.boards)), Path(args.run_dir))
    print(boards.format_status([boards.board_status(b) for b in state.boards]))
    print(f"edvit fleet: {len(state.boards)} boards up on {state.broker} (run folder "
          f"{args.run_dir}); `edvit fleet down` takes them down")  # fmt: skip
    return 0


def down(args: argparse.Namespace) -> int:
    taken = boards.down(Path(args.run_dir))
    print(f"edvit fleet: took down {', '.join(taken)}" if taken else "no emulated boards are up")
    return 0


def status(args: argparse.Namespace) -> int:
    rows = boards.status(Path(args.run_dir))
    print(json.dumps(rows, indent=2) if args.json else boards.format_status(rows))
    return 0


def proxy(args: argparse.Namespace) -> int:
    boards.serve_proxy(args.listen, args.target, args.delay_ms)
    return 0


ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": up, "down": down, "status": status, "proxy": proxy
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="fleet", required=True, metavar="ACTION")

    def add(name: str, text: str) -> argparse.ArgumentParser:
        action = actions.add_parser(name, help=text, description=text)
        action.set_defaults(prefix=DEFAULT_PREFIX)
        action.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS)
        action.add_argument(
            "--run-dir", default=str(DEFAULT_RUN_DIR),
            help="where the fleet's state and logs live (default %(default)s)",
        )  # fmt: skip
        return action

    action = add(
        "up",
        "each board a node in its own network namespace with a CPU quota, a memory limit, "
        f"a rate-limited link and added latency; presets: {', '.join(PRESETS)}",
    )  # fmt: skip
    action.add_argument("boards", metavar="BOARDS.yaml")
    add("down", "stop the boards' nodes, remove namespaces, links and cgroups")
    action = add("status", "each board: its shape, its node, RSS, CPU, OOM kills")
    action.add_argument("--json", action="store_true", help="as JSON")
    action = add("proxy", "a board's link proxy (what `up` runs, one per board)")
    action.add_argument("--listen", required=True, metavar="HOST:PORT")
    action.add_argument("--target", required=True, metavar="HOST:PORT", help="the broker")
    action.add_argument("--delay-ms", type=non_negative_float, default=0.0, help="each way")


def run(args: argparse.Namespace) -> int:
    return ACTIONS[args.fleet](args)
