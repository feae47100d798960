"""An amqtt broker (MQTT 3.1.1) run as its own process: `python -m edvit.broker.embedded`.

It exists for machines without mosquitto. It runs in a separate process, not in a thread of
the caller, so that tests can kill and restart it exactly like mosquitto.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

log = logging.getLogger(__name__)


def broker_config(host: str, port: int) -> dict[str, Any]:
    """One TCP listener, anonymous clients allowed, no $SYS or packet-logging plugins.

    amqtt 0.12 has no message size limit of its own (packets are read with readexactly), so
    multi-MB retained model files pass; the plugin table replaces the defaults entirely.
    """
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


async def serve(host: str, port: int) -> None:
    """Run the broker until SIGINT or SIGTERM, then shut it down."""
    # Imported here so that `--help` and config building stay cheap.
    from amqtt.broker import Broker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    broker = Broker(broker_config(host, port))
    await broker.start()
    log.info("amqtt broker listening on %s:%d", host, port)
    try:
        await stop.wait()
    finally:
        await broker.shutdown()
        log.info("amqtt broker stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edvit.broker.embedded")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(message)s")
    # amqtt's state machine library logs every transition at INFO.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
