"""`edvit dashboard`: the fleet live in a browser (needs the dashboard extra)."""

from __future__ import annotations

import argparse

from edvit.command import connection
from edvit.topics import Topics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8080, help="port to serve on (default %(default)s)"
    )
    parser.add_argument(
        "--frames", action="store_true",
        help="also show each camera's latest frame (off by default: the most sensitive data; "
        "the identity must be allowed to read frames, `secure init --dashboard-sees-frames`)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from edvit.fleet.dashboard.app import Dashboard, listen, require_web, serve

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
